"""`LedgerFedAvg`, the round every strategy runs (`server.strategy` picks one, `aggregation`): the train messages
(sampled under central DP), the replies screened (`server.screening`), the valid updates merged (fedavg's weighted
mean by num-examples; ffa and svd override `frozen_keys` and `merge`), the ledger rows and metrics recorded
(`server.recorder`), the federated evaluation pooled.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from server.aggregation import Arrays, combine, fixed_denominator_mean, numpy_of, payload_bytes, record_of, server_step
from server.central_dp import CentralAccount
from server.identity import merchant_names, merchant_of
from server.recorder import RunRecorder
from server.screening import evaluation_metrics, failures, rejection_reason, screen, too_few
from shared.config import FedShopConfig
from shared.ledger import STATUS_DECLINED, STATUS_RELEASED
from shared.metrics import pool_metrics
from shared.privacy import PRIVACY_RECORD
from shared.rundir import RunDirectory

log = logging.getLogger("fedshop")


# train-reply metrics kept per merchant only: a mean weighted by num-examples means nothing for these
PER_MERCHANT_ONLY = ("partition-id", "declined", "train-seconds", "message-seconds")


class LedgerFedAvg(FedAvg):
    """Weighted mean of every adapter tensor by `num-examples` (fedavg), skipping merchants that declined and
    updates that fail validation.

    Each train reply becomes one `privacy.csv` row; each round's train and evaluate results become `metrics.jsonl`
    records with the per-merchant values beside the weighted means, the rejected updates and the bytes on the wire
    (`self.recorder`). Subclasses change `frozen_keys` (what stays at the server) and `merge` (how valid updates
    combine). Under central DP `self.central` is the server's privacy account (None without central DP).
    """

    def __init__(self, run_dir: RunDirectory, config: FedShopConfig, initial: ArrayRecord | None = None, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.central = CentralAccount(config) if config.central else None
        self.recorder = RunRecorder(run_dir, config, self.central)
        self._current: ArrayRecord | None = initial  # the arrays sent in this round's train messages
        # a run resuming its own directory numbers its rounds on after the last recorded one: every entry point
        # (configure_train, aggregate_train, aggregate_evaluate) turns Flower's round into that run-wide round,
        # which the ledger, the metrics and the merchants' seeds ("server-round") see
        self.round_offset = 0
        self.merchant_names = merchant_names(config)  # deployment with authentication: node id -> merchant
        self._train_sent: float | None = None  # perf_counter when this round's train messages left (round-seconds)
        self._train_nodes: list[int] = []  # the nodes this round's train messages went to (a missing reply: failed)
        self.node_merchants: dict[int, str] = dict(self.merchant_names or {})  # node id -> merchant, as learned
        self.secure = None  # secure-aggregation: the `server.secure.SecureGrid` this round's replies came through

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        # Flower's start loop sends what this returns at once and hands the replies to aggregate_train: the round's
        # wall time runs from here (the nodes already sampled) to the end of the aggregation
        messages = list(self._train_messages(server_round, arrays, config, grid))
        self._train_sent = time.perf_counter()
        self._train_nodes = [m.metadata.dst_node_id for m in messages]
        return messages

    def _train_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        server_round += self.round_offset
        self._current = arrays
        if self.central is None:
            return super().configure_train(server_round, arrays, config, grid)
        if not self.central.admits_release():
            budget = self.central.budget
            log.warning("round %d: skipped, one more release would exceed the merchant-level epsilon %g (spent %.3f "
                        "at delta %g, %s)", server_round, budget.epsilon, self.central.epsilon_spent(), budget.delta,
                        budget.accountant)
            self.recorder.central_row(server_round, STATUS_DECLINED)
            return []
        if self.central.sample_rate >= 1.0:
            return super().configure_train(server_round, arrays, config, grid)
        _, nodes = sample_nodes(grid, self.min_available_nodes, 0)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node)
                for node in self.central.sample(nodes)]

    # --- what travels, and how updates merge (overridden by LedgerFFA / LedgerSVD) --------------------------
    def frozen_keys(self, keys: Iterable[str]) -> set[str]:
        """Adapter tensors that stay at the server (never sent back, never noised): none for fedavg."""
        return set()

    def merge(self, updates: list[Arrays], weights: list[float]) -> tuple[Arrays, dict[str, float]]:
        """(merged tensors, extra train metrics) from the validated updates (the tensors merchants send back); with
        `server-learning-rate` η the global adapter moves η times the merged update from what was sent."""
        merged = combine(updates, weights, self.config.robust, self.config.trim_fraction)
        sent = self.uplink_reference()
        if self.config.server_learning_rate == 1.0 or sent is None:
            return merged, {}
        return server_step(sent, merged, self.config.server_learning_rate), {}

    def final_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The complete adapter to save from what the last round produced."""
        return arrays

    # --- validation --------------------------------------------------------------------------------------------
    def uplink_reference(self) -> Arrays | None:
        """The arrays sent this round, less the frozen ones: what a valid reply must match (None if unknown)."""
        if self._current is None:
            return None
        sent = numpy_of(self._current)
        frozen = self.frozen_keys(sent)
        return {k: v for k, v in sent.items() if k not in frozen}

    def check_reply(self, msg: Message) -> str | None:
        """None for a reply whose update may be aggregated this round, else why not (no side effects)."""
        return rejection_reason(msg, self.arrayrecord_key, self.weighted_by_key, self.uplink_reference(),
                                self.config.update_norm_bound)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        trained, merchants = [], {}
        downlink = None if self._current is None else payload_bytes(numpy_of(self._current))
        failed, answered = failures(self._train_nodes, replies, self._merchant_at, self.config.round_timeout)
        # secure-aggregation: what the SecAgg+ protocol cost this round (the replies' arrays are then the mean)
        traffic = self.secure.traffic[-1] if self.secure is not None and self.secure.traffic else None
        self._train_nodes = []
        for msg in answered:
            metrics = msg.content["metrics"]
            merchant = self._learn(msg)
            self.recorder.merchant_row(server_round, merchant, metrics, msg.content.config_records[PRIVACY_RECORD])
            entry = {k: v for k, v in metrics.items() if k != "partition-id"}
            sent = msg.content.array_records.get(self.arrayrecord_key)
            entry["uplink-bytes"] = 0 if sent is None else payload_bytes(numpy_of(sent))
            if downlink is not None:
                entry["downlink-bytes"] = downlink
            if traffic is not None:  # the arrays are the mean: count the protocol's bytes
                entry["uplink-bytes"] = traffic["bytes-received"] / max(1, traffic["merchants"])
                entry["downlink-bytes"] = traffic["bytes-sent"] / max(1, traffic["merchants"])
            merchants[merchant] = entry
            if bool(metrics["declined"]):
                log.warning("round %d: merchant %s declined: one more round would exceed epsilon %g",
                            server_round, merchant, self.config.target_epsilon)
            else:
                trained.append((merchant, msg))
        trained.sort(key=lambda pair: pair[0])  # merged in merchant order, not reply order: reruns are bit-exact
        failed.sort(key=lambda f: f["merchant"])
        for failure in failed:  # after the replies' rows: a failed row reads the merchant's earlier rounds only
            self.recorder.failed_row(server_round, failure["merchant"])
            log.warning("round %d: merchant %s failed: %s", server_round, failure["merchant"], failure["reason"])
        valid, rejected = screen(server_round, trained, self.arrayrecord_key, self.weighted_by_key,
                                 self.uplink_reference(), self.config.update_norm_bound)
        summary: dict = {}
        arrays = metrics = None
        if (rejected or failed) and len(valid) < self.config.min_merchants:
            self._stamp_round_seconds(summary)
            self.recorder.train_record(server_round, summary, merchants, trained, valid, rejected, failed)
            raise too_few(server_round, self.config.min_merchants, valid, rejected, failed)
        if valid:
            updates = [numpy_of(msg.content[self.arrayrecord_key]) for _, msg in valid]
            weights = [float(msg.content["metrics"][self.weighted_by_key]) for _, msg in valid]
            if self.central is not None:
                # the wrapper adds the Gaussian noise to what this returns: that release is accounted here
                merged, extra = self._fixed_denominator(updates), {}
                self.central.release()
                self.recorder.central_row(server_round, STATUS_RELEASED)
            else:
                merged, extra = self.merge(updates, weights)
            arrays = self._complete(merged)
            metrics = self.train_metrics_aggr_fn([msg.content for _, msg in valid], self.weighted_by_key)
            summary.update({k: v for k, v in metrics.items() if k not in PER_MERCHANT_ONLY})
            summary.update(extra)
        if traffic is not None:
            summary.update({f"secure-{k}": float(traffic[k])
                            for k in ("bytes-sent", "bytes-received", "arrays-received", "seconds")})
        self._stamp_round_seconds(summary)
        self.recorder.train_record(server_round, summary, merchants, trained, valid, rejected, failed)
        return arrays, metrics

    def _learn(self, msg: Message) -> str:
        """The merchant of a reply that names its partition, remembered by node id for the replies that do not
        (an error reply names no merchant; a missing one has only the node it was sent to)."""
        merchant = merchant_of(msg, self.merchant_names)
        self.node_merchants.setdefault(msg.metadata.src_node_id, merchant)
        return merchant

    def _merchant_at(self, node: int) -> str:
        """The merchant at `node`, once any of its replies named it (round 0's evaluation does for every merchant
        that answered it), else `node-<id>`."""
        return self.node_merchants.get(node, f"node-{node}")

    def _stamp_round_seconds(self, summary: dict) -> None:
        """`round-seconds`: wall time from sending this round's train messages to the aggregate (left out when
        aggregate_train is called without configure_train)."""
        if self._train_sent is not None:
            summary["round-seconds"] = time.perf_counter() - self._train_sent
            self._train_sent = None

    def _fixed_denominator(self, updates: list[Arrays]) -> Arrays:
        """current + (sum of the clipped updates) / m, m the expected number of merchants: every merchant weighs
        the same whatever its size, so one merchant moves the aggregate by at most C / m (before the noise)."""
        reference = self.uplink_reference()
        assert reference is not None and self.central is not None
        return fixed_denominator_mean(updates, reference, self.central.expected_merchants)

    def _complete(self, merged: Arrays) -> ArrayRecord:
        """The full adapter: the merged tensors plus the frozen ones the server kept, in the order it sent them."""
        if self._current is None:
            return record_of(merged, sorted(merged))
        sent = numpy_of(self._current)
        return record_of({**{k: sent[k] for k in self.frozen_keys(sent)}, **merged}, sent)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Every metric pooled over the merchants that report it (`pool_metrics`). Flower's own aggregation refuses
        replies whose metric keys differ (InconsistentMessageReplies), yet merchants report different families:
        next-new only with new test targets, a baseline only where it can be fitted, churn only with churn examples."""
        server_round += self.round_offset
        merchants = {}
        for msg in replies:
            metrics = evaluation_metrics(server_round, msg, self.weighted_by_key)
            if metrics is not None:
                merchants[self._learn(msg)] = {k: v for k, v in metrics.items() if k != "partition-id"}
        # pooled in merchant order: in reply order (Flower's) two runs of the same rounds differ in the last digits;
        # for replies that arrive in merchant order the figures are Flower's own, bit for bit
        summary = pool_metrics([merchants[m] for m in sorted(merchants)], self.weighted_by_key)
        self.recorder.evaluate_record(server_round, summary, merchants)
        self.recorder.progress(server_round, self.round_offset + self.config.num_rounds, summary)
        return MetricRecord(summary) if merchants else None

    def evaluate_initial(self, grid: Grid, arrays: ArrayRecord) -> None:
        """Federated evaluation of the starting adapter (the pretrained base alone) as round 0."""
        messages = self.configure_evaluate(0, arrays, ConfigRecord(), grid)
        self.aggregate_evaluate(0, grid.send_and_receive(messages))
