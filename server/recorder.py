"""What the server records while a run goes: a `privacy.csv` row per merchant per round (and per central-DP
release), a `metrics.jsonl` record per round and scope, and the progress line in the log."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ConfigRecord, MetricRecord

from shared.config import FedShopConfig
from shared.ledger import STATUS_DECLINED, STATUS_FAILED, STATUS_TRAINED, history_from_ledger, last_round_step
from shared.privacy import PRIVACY_ACCOUNTANT_KEY, PRIVACY_UNIT_KEY, PrivacyBudget
from shared.rundir import RunDirectory

if TYPE_CHECKING:
    from server.central_dp import CentralAccount

log = logging.getLogger("fedshop")


class RunRecorder:
    def __init__(self, run_dir: RunDirectory, config: FedShopConfig, central: CentralAccount | None = None):
        self.run_dir = run_dir
        self.config = config
        self.central = central
        self.started = time.perf_counter()
        self.last_train: dict = {}

    # --- privacy.csv ---------------------------------------------------------------------------------------------
    def merchant_row(self, server_round: int, merchant: str, metrics: MetricRecord, privacy: ConfigRecord) -> None:
        """The ledger row of a merchant's train reply, in the unit and accountant the reply names."""
        declined = bool(metrics["declined"])
        self._ledger(server_round, merchant, float(metrics["noise-multiplier"]), float(metrics["sample-rate"]),
                     int(metrics["steps"]), float(metrics["epsilon"]), str(privacy[PRIVACY_UNIT_KEY]),
                     str(privacy[PRIVACY_ACCOUNTANT_KEY]), STATUS_DECLINED if declined else STATUS_TRAINED)

    def failed_row(self, server_round: int, merchant: str) -> None:
        """The ledger row of a merchant that sent no usable reply in time (raised, exited, timed out).

        Conservative rule: the merchant may have failed after it started training, so its round is charged as if it
        finished: the steps, noise multiplier and sample rate of its last trained round (its schedule does not
        change between rounds) and the epsilon of its history with that round added. A merchant with no trained
        round yet has no schedule the server could know: its row says so, epsilon NaN and 0 steps."""
        budget = PrivacyBudget.for_merchants(self.config)
        rows = self.run_dir.read_privacy() if budget.private else []  # read once for the step and the history
        step = last_round_step(rows, merchant, server_round)
        if step is None:
            self._ledger(server_round, merchant, math.nan, math.nan, 0, math.nan if budget.private else math.inf,
                         budget.unit, budget.ledger_accountant, STATUS_FAILED)
            return
        _, history = history_from_ledger(self.run_dir.path, merchant, before_round=server_round, rows=rows)
        self._ledger(server_round, merchant, *step, budget.spent([*history, step]), budget.unit,
                     budget.ledger_accountant, STATUS_FAILED)

    def central_row(self, server_round: int, status: str) -> None:
        assert self.central is not None
        self.run_dir.append_privacy(self.central.ledger_row(server_round, status))

    def _ledger(self, server_round: int, merchant: str, noise: float, rate: float, steps: int, epsilon: float,
                unit: str, accountant: str, status: str) -> None:
        self.run_dir.append_privacy({
            "merchant": merchant, "round": server_round, "noise_multiplier": noise, "sample_rate": rate,
            "steps": steps, "epsilon": epsilon, "delta": self.config.target_delta, "unit": unit,
            "accountant": accountant, "status": status,
        })

    # --- metrics.jsonl -------------------------------------------------------------------------------------------
    def train_record(self, server_round: int, summary: dict, merchants: dict, trained: list, valid: list,
                     rejected: list[dict[str, str]], failed: list[dict[str, str]] | None = None) -> None:
        failed = failed or []
        epsilons = [float(m["epsilon"]) for m in merchants.values()]
        summary["epsilon-max"] = max(epsilons) if epsilons else math.nan
        summary["merchants-trained"] = len(trained)
        summary["merchants-rejected"] = len(rejected)
        summary["merchants-aggregated"] = len(valid)
        summary["merchants-failed"] = len(failed)
        uplink = [merchants[m]["uplink-bytes"] for m, _ in trained]
        summary["uplink-bytes-mean"] = float(np.mean(uplink)) if uplink else math.nan
        downlink = [m["downlink-bytes"] for m in merchants.values() if "downlink-bytes" in m]
        summary["downlink-bytes-mean"] = float(np.mean(downlink)) if downlink else math.nan
        if self.central is not None:
            summary["epsilon-merchant"] = self.central.epsilon_spent()
        self.run_dir.append_metrics({"round": server_round, "scope": "train", "aggregation": self.config.aggregation,
                                     "metrics": summary, "merchants": dict(sorted(merchants.items())),
                                     "rejected": rejected, "failed": failed})
        self.last_train = summary

    def evaluate_record(self, server_round: int, summary: dict, merchants: dict) -> None:
        self.run_dir.append_metrics({"round": server_round, "scope": "evaluate", "metrics": summary,
                                     "merchants": dict(sorted(merchants.items()))})

    def stopped_record(self, server_round: int, message: str) -> None:
        """The record of a run that stopped in `server_round` (too few merchants): `fedshop simulate` reads it back
        to exit with the message; the last complete round is the one before."""
        self.run_dir.append_metrics({"round": server_round, "scope": "stopped", "metrics": {}, "reason": message,
                                     "last-complete-round": server_round - 1})

    # --- the log ---------------------------------------------------------------------------------------------------
    def progress(self, server_round: int, last_round: int, evaluation: dict) -> None:
        if not self.config.progress:
            return
        parts = [f"round {server_round}/{last_round}"]
        if server_round and self.last_train:
            parts.append(f"train loss {self.last_train.get('train-loss', math.nan):.3f}")
            if self.config.local_dp:
                parts.append(f"eps max {self.last_train['epsilon-max']:.2f} (delta {self.config.target_delta:g}, "
                             f"{self.config.privacy_unit}, {self.config.accountant})")
            if self.central is not None:
                parts.append(f"eps {self.central.epsilon_spent():.2f} (delta {self.config.target_delta:g}, merchant, "
                             f"{self.config.accountant})")
        for key, label in (("intent-auc", "intent AUC"), ("next-hr@10", "next HR@10")):
            if key in evaluation:
                parts.append(f"{label} {evaluation[key]:.3f}")
        parts.append(f"{time.perf_counter() - self.started:.0f} s")
        log.info(" | ".join(parts))
