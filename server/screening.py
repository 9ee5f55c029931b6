"""Which of a round's train replies the strategy may merge (`server.strategy`), and the stop when too few remain.

A merchant that replied with an error, without its privacy record, or not within `round-timeout` is failed (the
strategy then writes its ledger row, charged as if its round finished: `RunRecorder.failed_row`). Every update of a
merchant that trained is validated before any aggregation (`rejection_reason`: one ArrayRecord, a positive weight,
then names, shapes, dtypes, finiteness and the update norm against the arrays sent this round, `max-update-norm`);
rejected updates are logged and counted in metrics.jsonl. A round where failures or rejections leave fewer than
`min-merchants` valid updates ends the run with `TooFewMerchants`. An evaluate reply is pooled only if it carries
its metrics with a partition-id and a positive weight (`evaluation_metrics`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable

from flwr.app import Message, MetricRecord

from server.aggregation import Arrays, numpy_of, validate_update
from shared.privacy import PRIVACY_RECORD

log = logging.getLogger("fedshop")


class TooFewMerchants(RuntimeError):
    """A round whose failed merchants and rejected updates left fewer than `min-merchants` valid updates: the run
    stops (its message names the round, who failed and why, and the last complete checkpoint)."""

    def __init__(self, message: str, server_round: int):
        super().__init__(message)
        self.server_round = server_round


def compact(reason: str, limit: int = 200) -> str:
    """An error reply's reason on one line, shortened: the merchant's own exception message where Flower wrapped one
    (`ClientAppException ... Message: <it>`), else the error's class and message (a dead actor's Ray error)."""
    text = " ".join(reason.split())
    if "occurred. Message: " in text:
        text = text.rsplit("occurred. Message: ", 1)[1].removesuffix("'>")
    else:
        wrapped = re.match(r"<class '([\w.()]+)'>:<'(.*)'>$", text)
        if wrapped:
            text = f"{wrapped[1].rsplit('.', 1)[-1]}: {wrapped[2]}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def failures(sent: Iterable[int], replies: list[Message], merchant_at: Callable[[int], str], round_timeout: float
             ) -> tuple[list[dict[str, str]], list[Message]]:
    """(failed, answered): a failure ({merchant, reason}) for each node sent a train message that did not reply
    (Flower's timeout) and each error reply or reply without its privacy record, in that order; the other replies
    in reply order. `merchant_at` names the merchant at a node."""
    replied = {msg.metadata.src_node_id for msg in replies}
    failed = [{"merchant": merchant_at(node), "reason": f"no reply within round-timeout = {round_timeout:g} s"}
              for node in sent if node not in replied]
    answered = []
    for msg in replies:
        if msg.has_error() or PRIVACY_RECORD not in msg.content.config_records:
            failed.append({"merchant": merchant_at(msg.metadata.src_node_id),
                           "reason": compact(msg.error.reason) if msg.has_error()
                           else f"no {PRIVACY_RECORD!r} record in its reply"})
        else:
            answered.append(msg)
    return failed, answered


def rejection_reason(msg: Message, array_key: str, weight_key: str, reference: Arrays | None, bound: float | None
                     ) -> str | None:
    """None if `msg` carries one ArrayRecord `array_key`, a positive weight `weight_key` and tensors that pass
    `validate_update` against `reference` with the norm `bound` (tensors unchecked when `reference` is None), else
    the reason."""
    records = list(msg.content.array_records.keys())
    if records != [array_key]:
        return f"expected one ArrayRecord {array_key!r}, got {records}"
    weight = msg.content["metrics"].get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        return f"{weight_key} = {weight!r} is not a positive number"
    if reference is None:
        return None
    return validate_update(numpy_of(msg.content[array_key]), reference, max_norm=bound)


def screen(server_round: int, replies: list[tuple[str, Message]], array_key: str, weight_key: str,
           reference: Arrays | None, bound: float | None) -> tuple[list[tuple[str, Message]], list[dict[str, str]]]:
    """(valid, rejected) among the trained merchants' (merchant, reply) pairs; each rejection logged with merchant
    and round. `reference`: the arrays sent this round less the frozen ones, None when unknown."""
    if reference is None:
        # aggregate_train without configure_train (a direct call): no arrays were sent to compare with, so the
        # structure is checked against the first reply that has arrays, and there is no norm bound
        first = next((m.content[array_key] for _, m in replies if array_key in m.content.array_records), None)
        reference, bound = (None if first is None else numpy_of(first)), None
    valid, rejected = [], []
    for merchant, msg in replies:
        reason = rejection_reason(msg, array_key, weight_key, reference, bound)
        if reason is None:
            valid.append((merchant, msg))
        else:
            log.warning("round %d: rejected the update of merchant %s: %s", server_round, merchant, reason)
            rejected.append({"merchant": merchant, "reason": reason})
    return valid, rejected


def too_few(server_round: int, min_merchants: int, valid: list, rejected: list[dict[str, str]],
            failed: list[dict[str, str]]) -> TooFewMerchants:
    """The stop of a round left with fewer than `min-merchants` valid updates, naming who failed or was rejected
    and why, and the checkpoint a resume starts from."""
    why = "; ".join([f"{f['merchant']} failed: {f['reason']}" for f in failed]
                    + [f"{r['merchant']} rejected: {r['reason']}" for r in rejected])
    last = server_round - 1
    return TooFewMerchants(
        f"round {server_round}: {len(valid)} valid merchant update(s), fewer than min-merchants = {min_merchants} "
        f"({why}); the run stopped, checkpoints/round-{last} is the last complete round"
        + ("" if last < 1 else " (fedshop simulate --resume RUN_DIR continues from it)"), server_round)


def evaluation_metrics(server_round: int, msg: Message, weight_key: str) -> MetricRecord | None:
    """The metrics of an evaluate reply that may be pooled (a MetricRecord "metrics" with partition-id and a positive
    `weight_key`), else None: an error reply or one without them is logged and left out."""
    if msg.has_error():
        log.warning("round %d: evaluation failed at node %s: %s", server_round, msg.metadata.src_node_id,
                    msg.error.reason)
        return None
    metrics = msg.content.metric_records.get("metrics")
    weight = None if metrics is None else metrics.get(weight_key)
    if metrics is None or "partition-id" not in metrics or isinstance(weight, bool) \
            or not isinstance(weight, (int, float)) or not weight > 0:
        log.warning("round %d: evaluation reply of node %s left out: no MetricRecord 'metrics' with partition-id and "
                    "a positive %s", server_round, msg.metadata.src_node_id, weight_key)
        return None
    return metrics
