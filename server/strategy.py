"""FedAvg over LoRA adapters that also keeps the privacy ledger and the per-round metrics of the run directory."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.rundir import RunDirectory
from shared.config import FedShopConfig
from shared.data import merchant_id_for_partition
from shared.privacy import History, Uniform, epsilon_of, noise_for_budget, would_exceed

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
        self._current: ArrayRecord | None = None
        self.central_history: History = []
        self.central_noise = 0.0
        self.central_rate = config.fraction_train
        self._uniform = Uniform(config.seed + 0x5E4, secure=config.secure_mode)

    # --- merchant-level central DP --------------------------------------------------------------------------
    def expected_merchants(self) -> float:
        return self.central_rate * self.config.num_merchants

    def central_epsilon(self, history: History | None = None) -> float:
        return epsilon_of(self.central_history if history is None else history, self.config.target_delta,
                          self.config.accountant)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self._current = arrays
        if not self.config.central:
            return super().configure_train(server_round, arrays, config, grid)
        step = (self.central_noise, self.central_rate, 1)
        if would_exceed(self.central_history, step, self.config.central_epsilon, self.config.target_delta,
                        self.config.accountant):
            log.warning("round %d: skipped, one more release would exceed the merchant-level epsilon %g (spent %.3f "
                        "at delta %g, %s)", server_round, self.config.central_epsilon, self.central_epsilon(),
                        self.config.target_delta, self.config.accountant)
            self._central_row(server_round, "declined")
            return []
        if self.central_rate >= 1.0:
            return super().configure_train(server_round, arrays, config, grid)
        # Poisson sampling of merchants (each in with probability fraction-train), which the accountant assumes
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)
        chosen = [n for n, u in zip(sorted(nodes), self._uniform.draw(len(nodes)), strict=True)
                  if u < self.central_rate]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def _fixed_denominator(self, replies: list[Message]) -> ArrayRecord:
        """current + (sum of the clipped updates) / m, m the expected number of merchants: every merchant weighs
        the same whatever its size, so one merchant moves the aggregate by at most C / m (before the noise)."""
        assert self._current is not None
        current = self._current.to_numpy_ndarrays()
        total = [np.zeros_like(c, dtype=np.float64) for c in current]
        for msg in replies:
            for t, a, c in zip(total, msg.content["arrays"].to_numpy_ndarrays(), current, strict=True):
                t += a.astype(np.float64) - c
        m = self.expected_merchants()
        out = [(c + t / m).astype(c.dtype) for c, t in zip(current, total, strict=True)]
        return ArrayRecord(dict(zip(self._current.keys(), (Array(np.asarray(v)) for v in out), strict=True)))

    def _central_row(self, server_round: int, status: str) -> None:
        self.run_dir.append_privacy({
            "merchant": "all", "round": server_round, "noise_multiplier": self.central_noise,
            "sample_rate": self.central_rate, "steps": 1 if status == "released" else 0,
            "epsilon": self.central_epsilon(), "delta": self.config.target_delta, "unit": "merchant",
            "accountant": self.config.accountant, "status": status,
        })

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
        if self.config.central and arrays is not None:
            # the wrapper adds the Gaussian noise to what this returns: that release is accounted here
            arrays = self._fixed_denominator(kept)
            self.central_history.append((self.central_noise, self.central_rate, 1))
            self._central_row(server_round, "released")
        summary = {k: v for k, v in (metrics or {}).items() if k not in ("partition-id", "declined")}
        epsilons = [float(m["epsilon"]) for m in merchants.values()]
        summary["epsilon-max"] = max(epsilons) if epsilons else math.nan
        summary["merchants-trained"] = len(kept)
        if self.config.central:
            summary["epsilon-merchant"] = self.central_epsilon()
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
            "steps": steps, "epsilon": epsilon if self.config.local_dp else math.inf,
            "delta": self.config.target_delta, "unit": self.config.privacy_unit if self.config.local_dp else "none",
            "accountant": self.config.accountant if self.config.local_dp else "none", "status": status,
        })

    def _progress(self, server_round: int, evaluation: dict) -> None:
        if not self.config.progress:
            return
        parts = [f"round {server_round}/{self.config.num_rounds}"]
        if server_round and self._last_train:
            parts.append(f"train loss {self._last_train.get('train-loss', math.nan):.3f}")
            if self.config.local_dp:
                parts.append(f"eps max {self._last_train['epsilon-max']:.2f} (delta {self.config.target_delta:g}, "
                             f"{self.config.privacy_unit}, {self.config.accountant})")
            if self.config.central:
                parts.append(f"eps {self.central_epsilon():.2f} (delta {self.config.target_delta:g}, merchant, "
                             f"{self.config.accountant})")
        for key, label in (("intent-auc", "intent AUC"), ("next-hr@10", "next HR@10")):
            if key in evaluation:
                parts.append(f"{label} {evaluation[key]:.3f}")
        parts.append(f"{time.perf_counter() - self.started:.0f} s")
        log.info(" | ".join(parts))


class MerchantLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping and Gaussian noise, with one difference: an update of norm zero (a merchant
    that sent the adapter back unchanged) is kept as it is; flwr 1.42 divides by the norm and fails the round."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        event = self._pop_pending_event(server_round)
        if not validate_replies(replies, self.num_sampled_clients, strict=self.accountant is not None):
            return None, None
        current = self.current_arrays.to_numpy_ndarrays()
        for reply in replies:
            for name, record in list(reply.content.array_records.items()):
                arrays = record.to_numpy_ndarrays()
                update = [a - c for a, c in zip(arrays, current, strict=True)]
                norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update)))
                factor = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
                clipped = [(c + factor * u).astype(a.dtype) for a, c, u in zip(arrays, current, update, strict=True)]
                reply.content[name] = ArrayRecord(dict(zip(record.keys(), (Array(v) for v in clipped), strict=True)))
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
            self._compose_release(event)
        return arrays, metrics


def build_strategy(run_dir: RunDirectory, config: FedShopConfig) -> tuple[LedgerFedAvg, FedAvg]:
    """(the ledger strategy, the strategy to start): under central DP the latter wraps the former in Flower's
    server-side fixed clipping (`MerchantLevelDP`), with noise calibrated to the merchant-level budget."""
    ledger = LedgerFedAvg(run_dir, config, fraction_train=config.fraction_train, fraction_evaluate=1.0,
                          min_train_nodes=1, min_evaluate_nodes=1, min_available_nodes=config.num_merchants)
    if not config.central:
        return ledger, ledger
    ledger.central_noise = noise_for_budget(config.central_epsilon, config.target_delta, ledger.central_rate,
                                            config.num_rounds, config.accountant)
    wrapped = MerchantLevelDP(
        ledger, noise_multiplier=ledger.central_noise, clipping_norm=config.central_clip_norm,
        num_sampled_clients=ledger.expected_merchants(),  # type: ignore[arg-type]  # the fixed denominator m
    )
    return ledger, wrapped
