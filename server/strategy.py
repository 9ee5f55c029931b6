"""FedAvg over LoRA adapters that also keeps the privacy ledger and the per-round metrics of the run directory."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.rundir import RunDirectory
from shared.config import FedShopConfig
from shared.data import merchant_id_for_partition

log = logging.getLogger("fedshop")


class LedgerFedAvg(FedAvg):
    """Weighted mean of every adapter tensor by `num-examples` (Flower's FedAvg), skipping merchants that declined.

    Each train reply becomes one `privacy.csv` row; each round's train and evaluate results become `metrics.jsonl`
    records with the per-merchant values beside the weighted means.
    """

    def __init__(self, run_dir: RunDirectory, config: FedShopConfig, **kwargs):
        super().__init__(**kwargs)
        self.run_dir = run_dir
        self.config = config
        self.started = time.perf_counter()
        self._last_train: dict[str, float] = {}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        kept, merchants = [], {}
        for msg in replies:
            if msg.has_error():
                merchant = f"node-{msg.metadata.src_node_id}"
                self._ledger(server_round, merchant, math.nan, math.nan, 0, math.nan, "failed")
                log.warning("round %d: merchant %s failed: %s", server_round, merchant, msg.error.reason)
                continue
            metrics = msg.content["metrics"]
            merchant = merchant_id_for_partition(int(metrics["partition-id"]))
            declined = bool(metrics["declined"])
            self._ledger(server_round, merchant, float(metrics["noise-multiplier"]), float(metrics["sample-rate"]),
                         int(metrics["steps"]), float(metrics["epsilon"]), "declined" if declined else "trained")
            merchants[merchant] = {k: v for k, v in metrics.items() if k != "partition-id"}
            if declined:
                log.warning("round %d: merchant %s declined: one more round would exceed epsilon %g",
                            server_round, merchant, self.config.target_epsilon)
            else:
                kept.append(msg)
        arrays, metrics = super().aggregate_train(server_round, kept)
        summary = {k: v for k, v in (metrics or {}).items() if k not in ("partition-id", "declined")}
        epsilons = [float(m["epsilon"]) for m in merchants.values()]
        summary["epsilon-max"] = max(epsilons) if epsilons else math.nan
        summary["merchants-trained"] = len(kept)
        self.run_dir.append_metrics({"round": server_round, "scope": "train", "metrics": summary,
                                     "merchants": dict(sorted(merchants.items()))})
        self._last_train = summary
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        merchants = {}
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed at node %s: %s", server_round, msg.metadata.src_node_id,
                            msg.error.reason)
                continue
            metrics = msg.content["metrics"]
            merchants[merchant_id_for_partition(int(metrics["partition-id"]))] = {
                k: v for k, v in metrics.items() if k != "partition-id"}
        metrics = super().aggregate_evaluate(server_round, replies)
        summary = {k: v for k, v in (metrics or {}).items() if k != "partition-id"}
        self.run_dir.append_metrics({"round": server_round, "scope": "evaluate", "metrics": summary,
                                     "merchants": dict(sorted(merchants.items()))})
        self._progress(server_round, summary)
        return metrics

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord) -> None:
        """Federated evaluation of the starting adapter (the pretrained base alone) as round 0."""
        messages = self.configure_evaluate(0, arrays, ConfigRecord(), grid)
        self.aggregate_evaluate(0, grid.send_and_receive(messages))

    def _ledger(self, server_round: int, merchant: str, noise: float, rate: float, steps: int, epsilon: float,
                status: str) -> None:
        self.run_dir.append_privacy({
            "merchant": merchant, "round": server_round, "noise_multiplier": noise, "sample_rate": rate,
            "steps": steps, "epsilon": epsilon if self.config.dp else math.inf, "delta": self.config.target_delta,
            "unit": self.config.privacy_unit, "accountant": self.config.accountant if self.config.dp else "none",
            "status": status,
        })

    def _progress(self, server_round: int, evaluation: dict) -> None:
        if not self.config.progress:
            return
        parts = [f"round {server_round}/{self.config.num_rounds}"]
        if server_round and self._last_train:
            parts.append(f"train loss {self._last_train.get('train-loss', math.nan):.3f}")
            if self.config.dp:
                parts.append(f"eps max {self._last_train['epsilon-max']:.2f} (delta {self.config.target_delta:g}, "
                             f"{self.config.privacy_unit}, {self.config.accountant})")
        for key, label in (("intent-auc", "intent AUC"), ("next-hr@10", "next HR@10")):
            if key in evaluation:
                parts.append(f"{label} {evaluation[key]:.3f}")
        parts.append(f"{time.perf_counter() - self.started:.0f} s")
        log.info(" | ".join(parts))
