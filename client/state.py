"""A merchant's own privacy state and budget, held on the merchant's side (deployment).

A SuperNode started with `--node-config state-dir=DIR` keeps its accountant history in DIR/privacy-state.json,
written atomically after every round it trains. That file, not the server's ledger and not Flower's in-memory
`context.state`, is what the merchant composes its next round on: it survives a SuperNode restart, and continuing
or resuming a run on the same DIR carries the spent budget on. Without state-dir (simulation) the ClientApp keeps
today's behaviour (`context.state`, and the server's ledger on continuation and where the ledger charged a failed
round that `context.state` lost: `with_ledger_charges`).

The merchant's own budget cap (`--node-config target-epsilon=E`) is `client.merchant.within_own_budget`.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared.config import FedShopConfig
from shared.dptrain import PrivacyState
from shared.errors import UserError
from shared.files import reading, write_text_atomic
from shared.ledger import history_from_ledger
from shared.privacy import load_history, save_history

STATE_FILE = "privacy-state.json"


def state_file(node_config: dict) -> Path | None:
    directory = node_config.get("state-dir")
    return Path(str(directory)) / STATE_FILE if directory else None


def load_own_state(path: Path, merchant: str, accountant: str) -> PrivacyState:
    """The merchant's history from its state file (a fresh state if the file does not exist yet)."""
    if not path.is_file():
        return PrivacyState()
    with reading(path, "a merchant privacy state (merchant, noise-multiplier, accountant-state): this merchant's "
                 "record of its spent budget; restore it from a backup rather than deleting it"):
        saved = json.loads(path.read_text(encoding="utf-8"))
        owner, noise, state = saved["merchant"], saved["noise-multiplier"], saved["accountant-state"]
        history = load_history(json.dumps(state), accountant)
    if owner != merchant:
        raise UserError(f"{path} holds the privacy state of {owner}, not of {merchant}")
    return PrivacyState(noise_multiplier=noise, history=history)


def save_own_state(path: Path, merchant: str, state: PrivacyState, accountant: str) -> None:
    """Written atomically; the history as Opacus's accountant state dict (floats round-trip exactly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"merchant": merchant, "noise-multiplier": state.noise_multiplier,
                                        "accountant-state": json.loads(save_history(state.history, accountant))},
                                       indent=1))


def with_ledger_charges(state: PrivacyState, config: FedShopConfig, merchant: str, server_round: int
                        ) -> PrivacyState:
    """Without a state-dir: the larger of the merchant's history and what this run's ledger charged it.

    Flower's simulation engine keeps a ClientApp's `context.state` only from a handler that returned a reply (flwr
    1.42, `vce_api.worker` updates the context after `process_message` returns): a round that raised, or whose
    process exited, leaves the state of the round before, write-ahead included. The server's ledger charged such a
    round as if it finished (a failed row with steps), so the merchant composes on those rows when they hold more
    steps than its own history: its epsilon is never below the ledger's."""
    if not (Path(config.run_dir) / "privacy.csv").is_file():
        return state
    noise, history = history_from_ledger(config.run_dir, merchant, before_round=server_round)
    if sum(steps for _, _, steps in history) <= sum(steps for _, _, steps in state.history):
        return state
    return PrivacyState(noise_multiplier=state.noise_multiplier if state.noise_multiplier is not None else noise,
                        history=history)
