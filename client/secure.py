"""Secure aggregation on the merchant's side: Flower's SecAgg+ client mod around fedshop's train handler.

With `secure-aggregation = true` the server runs Flower's `SecAggPlusWorkflow` (`server.secure`): four train
messages a round (set-up, key sharing, masked vectors, unmasking). Flower's `secaggplus_mod` answers all of them; at
the third it calls the train handler and masks what that returns. That mod speaks the legacy FitIns/FitRes records,
fedshop's handler the Message API, so `secure_rounds` bridges the two:

- in: the FitIns parameters (a list) become the handler's `arrays` record, named by the key list the server put in
  the config (`LAYOUT_KEY`); the FitIns config becomes its `config` record;
- out: the handler's reply becomes a FitRes whose parameters are the *update* of every sent tensor (what the merchant
  trained minus what it received; zero for a tensor it keeps, such as ffa's frozen A), weighted by its num-examples.
  Updates, not weights, are masked (`shared.secure.masked_update`).
  The handler's `metrics` and privacy records travel beside the masked vector, as in a plain round.

Messages without SecAgg+'s record (evaluation, plain rounds) go to the handler untouched.
"""

from __future__ import annotations

import json
import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from shared.secure import LAYOUT_KEY, RETURNED_RECORD, masked_update


def secure_rounds(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    flower = logging.getLogger("flwr")
    if flower.getEffectiveLevel() < logging.INFO:  # SecAgg+ logs every stage of every merchant at DEBUG
        flower.setLevel(logging.INFO)
    return secaggplus_mod(msg, context, lambda inner, ctxt: _train_as_fit(inner, ctxt, call_next))


def _train_as_fit(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    keys = json.loads(str(config.pop(LAYOUT_KEY)))
    sent = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(sent):
        raise ValueError(f"secure aggregation: the server named {len(keys)} tensors ({LAYOUT_KEY}) but sent "
                         f"{len(sent)}")
    msg.content["arrays"] = ArrayRecord({k: Array(v) for k, v in zip(keys, sent, strict=True)})
    msg.content["config"] = ConfigRecord(config)
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    content = reply.content
    metrics = content["metrics"]
    trained = content.array_records.get("arrays")
    declined = trained is None
    weight = 0 if declined else int(metrics["num-examples"])
    limit = float(context.run_config.get("secure-max-weight", 0)) or None
    if limit is not None and weight > limit:
        raise ValueError(f"secure aggregation: this merchant's num-examples {weight} exceeds config key "
                         f"'secure-max-weight' = {limit:g}, the largest weight SecAgg+'s fixed-point sum encodes; "
                         "raise it")
    updates = masked_update(keys, sent, None if trained is None else {k: a.numpy() for k, a in trained.items()})
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(updates), weight, {})
    out = compat.fitres_to_recorddict(fitres, keep_input=True)
    for name, record in content.metric_records.items():
        out[name] = record
    for name, record in content.config_records.items():
        out[name] = record
    out[RETURNED_RECORD] = ConfigRecord({"keys": json.dumps([] if trained is None else list(trained.keys()))})
    return Message(out, reply_to=msg)
