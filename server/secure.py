"""Secure aggregation on the server's side: each train round through Flower's SecAgg+ protocol (`SecAggPlusWorkflow`),
so the server learns only the weighted mean of the merchants' updates, never one merchant's.

In flwr 1.42 SecAgg+ runs only as a legacy workflow (a `LegacyContext` with a legacy `Strategy`), while fedshop's
rounds are a Message-API strategy (`server.fedavg`). `SecureGrid` joins them where they meet, at the grid: the
strategy's train messages go to it as usual; it runs the four SecAgg+ stages for them (set-up, key sharing, masked
vectors, unmasking) through the real grid, and hands the strategy back the merchants' stage-3 replies (their metrics
and privacy records, which travel in the clear as in a plain round) with the arrays of each set to the *same*
securely aggregated mean: `sent + mean update` for the tensors the merchant trained. The strategy's weighted mean of
identical arrays is that mean, and its server step, ledger rows and metrics work unchanged.

What the server no longer sees, it cannot check: the update-norm bound and the finite-value screening apply to the
mean only; each merchant checks its own update before masking (`client.secure`). Merchants' DP is unchanged: every
update is already noised by its merchant's DP-SGD, and the mean is post-processing. Evaluate messages pass through.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from shared.secure import CLIPPING_RANGE, LAYOUT_KEY, RETURNED_RECORD, apply_mean

log = logging.getLogger("fedshop")

SHARES = 1.0  # every merchant of a round holds a share of every other's keys (a fraction of the sampled merchants)
THRESHOLD = 0.5  # shares needed to unmask a merchant that dropped out (fraction of SHARES, at least 2)


class SecureGrid:
    """A grid whose train rounds run SecAgg+; everything else goes to `grid` unchanged. `traffic` collects, per
    secure round, the bytes the server sent and received and the seconds the protocol took."""

    def __init__(self, grid: Grid, context: Context, max_weight: float):
        self._grid = grid
        self._context = context
        self._max_weight = max_weight
        self.traffic: list[dict] = []

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        if not messages or any(m.metadata.message_type != MessageType.TRAIN for m in messages):
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        return self._secure_round(messages, timeout)

    def _secure_round(self, messages: list[Message], timeout: float | None) -> list[Message]:
        started = time.perf_counter()
        content = messages[0].content
        arrays, config = content["arrays"], content["config"]
        keys = list(arrays.keys())
        sent = [arrays[k].numpy() for k in keys]
        server_round = int(config["server-round"])
        fitins = FitIns(ndarrays_to_parameters(sent), {**dict(config), LAYOUT_KEY: json.dumps(keys)})
        nodes = [m.metadata.dst_node_id for m in messages]
        recording = _RecordingGrid(self._grid)
        legacy = LegacyContext(Context(run_id=self._context.run_id, node_id=self._context.node_id,
                                       node_config=self._context.node_config, state=RecordDict(),
                                       run_config=self._context.run_config),
                               config=ServerConfig(num_rounds=1),
                               strategy=_OneRound(nodes, fitins, recording))
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(fitins.parameters, True)
        workflow = SecAggPlusWorkflow(SHARES, THRESHOLD, max_weight=self._max_weight, clipping_range=CLIPPING_RANGE,
                                      timeout=timeout)
        try:
            workflow(recording, legacy)
        except ZeroDivisionError:  # every merchant declined: a total weight of 0, nothing to unmask
            pass
        mean = legacy.strategy.mean
        replies = []
        for reply in recording.masked_replies:
            if reply.has_error():  # the strategy records the merchant as failed, with the error
                replies.append(reply)
                continue
            returned = json.loads(str(reply.content.config_records[RETURNED_RECORD]["keys"]))
            if returned and mean is None:  # the protocol halted (too few merchants left): no reply, it failed
                continue
            # the handler's own records, as in a plain reply (not the FitRes copies, the mask or the layout)
            own = {**reply.content.metric_records, **reply.content.config_records}
            skip = (RETURNED_RECORD, RECORD_KEY_CONFIGS)
            record = RecordDict({name: rec for name, rec in own.items()
                                 if not name.startswith("fitres.") and name not in skip})
            if returned:  # a merchant that declined sent a zero update with weight 0, and gets no arrays back
                record["arrays"] = ArrayRecord({k: Array(v) for k, v in apply_mean(keys, sent, mean, returned).items()})
            reply.content = record
            replies.append(reply)
        aggregated = sum(1 for r in replies if not r.has_error() and "arrays" in r.content.array_records)
        self.traffic.append({"round": server_round, "merchants": len(nodes), "aggregated": aggregated,
                             "seconds": time.perf_counter() - started, **recording.bytes})
        log.info("round %d: secure aggregation (SecAgg+) of %d of %d merchants' updates in %.1f s",
                 server_round, aggregated, len(nodes), time.perf_counter() - started)
        return replies


class _OneRound(Strategy):
    """The legacy strategy one SecAgg+ round needs: it hands out the round's FitIns to the strategy's nodes and
    keeps the unmasked mean (every result's parameters are that mean by the time `aggregate_fit` sees them)."""

    def __init__(self, nodes: list[int], fitins: FitIns, grid: Grid):
        self.nodes, self.fitins, self.grid = nodes, fitins, grid
        self.mean: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(GridClientProxy(node, self.grid, 0), self.fitins) for node in self.nodes]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = [np.asarray(a, dtype=np.float64) for a in parameters_to_ndarrays(results[0][1].parameters)]
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class _RecordingGrid:
    """The real grid, counting the bytes of every record sent and received (and the array records received: a
    merchant under SecAgg+ sends its update only masked, as bytes) and keeping the stage-3 replies (those that
    carry the handler's metrics beside the masked vector)."""

    def __init__(self, grid: Grid):
        self._grid = grid
        self.masked_replies: list[Message] = []
        self.bytes = {"bytes-sent": 0, "bytes-received": 0, "arrays-received": 0}

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.bytes["bytes-sent"] += sum(_size(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        answered = [r.content for r in replies if not r.has_error()]
        self.bytes["bytes-received"] += sum(_size(c) for c in answered)
        # tensors received: under SecAgg+ none (Flower's mod empties the handler's array record, leaving it empty)
        self.bytes["arrays-received"] += sum(len(rec) for c in answered for rec in c.array_records.values())
        self.masked_replies.extend(r for r in replies if r.has_error() or RETURNED_RECORD in r.content.config_records)
        return replies


def _size(content: RecordDict) -> int:
    """Payload bytes of a message: array data and the bytes, strings and numbers of its config records."""
    total = sum(a.numpy().nbytes for rec in content.array_records.values() for a in rec.values())
    for rec in content.config_records.values():
        for value in rec.values():
            for item in value if isinstance(value, list) else [value]:
                total += len(item) if isinstance(item, (bytes, str)) else 8
    return total + 8 * sum(len(rec) for rec in content.metric_records.values())
