"""Continuing training: from a finished run directory (`resume-from`) or from an export folder (`init-adapter`).

Both give the new run a starting adapter and every known merchant's accountant history, so the epsilon a merchant
reports composes over all runs. The new run records where it came from in `continued-from.json` (beside its
`privacy.csv`): the origin, its epsilon at its end, and the histories carried over, which `history_from_ledger`
prepends, so a chain of continued runs (and exports of them) keeps composing every step.

`init-adapter` takes an export (`fedshop export`), which is checked first: every file against its manifest, the
base this config loads against the export's base (sha256), the adapter's LoRA shape, targets and aggregation against
this config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from shared.config import FedShopConfig, load_config
from shared.errors import UserError
from shared.ledger import CONTINUED_FROM, LEDGER, MERCHANT_LEVEL, history_from_ledger, ledger_merchants, read_privacy
from shared.model import check_adapter_dir, read_json_object
from shared.privacy import PrivacyBudget, epsilon_of
from shared.wide import WIDE_FILE


def check_init_adapter(config: FedShopConfig) -> None:
    """UserError unless `config.init_adapter` is an intact export this config can continue."""
    from server.manifest import check_base, verify

    export = Path(config.init_adapter)
    problems = verify(export)
    if problems:
        raise UserError(f"init-adapter: {export} does not match its manifest (" + "; ".join(problems[:5])
                        + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "") + "): refusing to "
                        "continue from a changed export")
    for needed in ("adapter_config.json", "adapter_model.safetensors", "privacy.csv", "run-config.toml"):
        if not (export / needed).is_file():
            raise UserError(f"init-adapter: {export / needed} does not exist; re-export the run with this version of "
                            "`fedshop export` (an export now carries the ledger and run config continued training "
                            "needs)")
    check_base(export, Path(config.base_dir) / "model.safetensors", f"init-adapter: base-dir {config.base_dir}")
    check_adapter_dir(export)
    adapter = read_json_object(export / "adapter_config.json", "PEFT's adapter config")
    before = load_config(export / "run-config.toml")
    there = {"lora-r": adapter.get("r"), "lora-alpha": float(adapter.get("lora_alpha", math.nan)),
             "lora-targets": ",".join(sorted(adapter.get("target_modules") or [])),
             "aggregation": before.aggregation, "wide": (export / WIDE_FILE).is_file()}
    here = {"lora-r": config.lora_r, "lora-alpha": config.lora_alpha,
            "lora-targets": ",".join(sorted(config.lora_target_list)), "aggregation": config.aggregation,
            "wide": config.wide}
    different = [f"{k} = {there[k]!r} there, {here[k]!r} here" for k in here if there[k] != here[k]]
    if different:
        raise UserError(f"init-adapter: the adapter of {export} does not fit this config (" + "; ".join(different)
                        + "); set those keys to the export's values")


def starting_adapter(config: FedShopConfig) -> dict[str, torch.Tensor]:
    """The adapter tensors a continued run starts from (its origin's final, or the export's, adapter)."""
    from shared.model import read_adapter

    if config.resume_from:
        return read_adapter(config.resume_from)
    return read_adapter(config.init_adapter, ".")


def record_origin(run_path: Path, config: FedShopConfig) -> dict:
    """Write `continued-from.json` into the new run directory: the origin, its epsilon at its end (per merchant, at
    the origin's delta and accountant) and every accountant history carried over."""
    origin = Path(config.continued_from)
    kind = "run" if config.resume_from else "export"
    before = load_config(origin / ("config.toml" if kind == "run" else "run-config.toml"))
    from server.manifest import read_manifest

    manifest = read_manifest(origin) if kind == "export" else {}
    histories, epsilons = {}, {}
    rows = read_privacy(origin / LEDGER)  # read once for every merchant
    for merchant in ledger_merchants(origin):
        noise, history = history_from_ledger(origin, merchant, rows=rows)
        if not history:
            continue
        histories[merchant] = {"noise-multiplier": noise, "history": [list(h) for h in history]}
        epsilons[merchant] = epsilon_of(history, before.target_delta, before.accountant)
    record = {"kind": kind, "path": str(origin.resolve()), "source-run": manifest.get("source-run", str(origin)),
              "round": manifest.get("round"), "unit": PrivacyBudget.for_merchants(before).unit,
              "delta": before.target_delta, "accountant": before.accountant, "epsilon": epsilons,
              "histories": histories}
    (run_path / CONTINUED_FROM).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


def read_origin(path: str | Path) -> dict | None:
    file = Path(path) / CONTINUED_FROM
    return read_json_object(file, "the record of the run this one continued") if file.is_file() else None


def continuation_lines(path: str | Path) -> list[str]:
    """Report / model-card lines naming the run this one continued and its epsilon at its end (none for a fresh
    run)."""
    origin = read_origin(path)
    if origin is None:
        return []
    where = f"export `{origin['path']}`" if origin["kind"] == "export" else f"run directory `{origin['path']}`"
    if origin["kind"] == "export" and origin.get("round") is not None:
        where += f" (round {origin['round']} of run `{origin['source-run']}`)"
    local = [v for k, v in origin["epsilon"].items() if k != MERCHANT_LEVEL and math.isfinite(v)]
    words = f"- **Continued from {where}.** "
    if local:
        words += (f"There, epsilon per merchant ({origin['unit']} level) at delta {origin['delta']:g}, "
                  f"{origin['accountant']} accountant: max {max(local):.3f}, mean {sum(local) / len(local):.3f}")
    else:
        words += "There, no merchant had DP-SGD steps to carry over"
    if MERCHANT_LEVEL in origin["epsilon"]:
        words += f"; merchant-level epsilon {origin['epsilon'][MERCHANT_LEVEL]:.3f}"
    words += (". The epsilons above are the totals over both: each merchant's accountant continued from its history "
              "there, at the noise multiplier calibrated there (merchants new to the federation started from zero "
              "and calibrated for this run), so they compose every step of both runs.")
    return [words]
