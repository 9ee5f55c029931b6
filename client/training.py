"""One merchant's train handler (`client.client_app` calls it): receives the global adapter, trains it with DP-SGD
on its own events, replies.

Only LoRA tensors and scalar metrics leave the merchant (with aggregation = ffa only the B tensors: A stays frozen at
the server's initialisation, loaded from the message every round); with secure-aggregation, only its masked update
(`client.secure`). The accountant's history lives in `context.state` (and, deployed, in the merchant's own
state directory: `client.state`). The config, data and model come from `client.merchant.setup`, as for evaluation.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.faults import corrupted, strike
from client.merchant import merchant_name, setup
from client.state import load_own_state, save_own_state, state_file, with_ledger_charges
from shared.config import FedShopConfig
from shared.dptrain import STATUS_DECLINED, PrivacyState, charged_ahead, train_round
from shared.ledger import history_from_ledger
from shared.model import item_rows, uplink_state
from shared.modeling import encode_teaching
from shared.privacy import PRIVACY_RECORD, PrivacyBudget, load_history, save_history

PRIVACY_STATE_KEY = "fedshop-privacy"


def _load_state(context: Context, config: FedShopConfig, merchant_id: str, server_round: int) -> PrivacyState:
    own = state_file(context.node_config)
    if own is not None:  # deployment: the merchant's own record, whatever the server's ledger says
        return load_own_state(own, merchant_id, config.accountant)
    if PRIVACY_STATE_KEY not in context.state:
        if config.continued_from:  # resume-from / init-adapter: this merchant's earlier steps count on
            # in place, the ledger is this run's own: every row before this round is a step already taken
            before = server_round if config.resumes_in_place else None
            noise, history = history_from_ledger(config.continued_from, merchant_id, before_round=before)
            state = PrivacyState(noise, history)
            # in place that ledger is this run's own: with_ledger_charges would read the same rows again
            return state if config.resumes_in_place else with_ledger_charges(state, config, merchant_id, server_round)
        return with_ledger_charges(PrivacyState(), config, merchant_id, server_round)
    record = context.state[PRIVACY_STATE_KEY]
    noise = float(record["noise-multiplier"])
    state = PrivacyState(noise_multiplier=None if noise < 0 else noise,
                         history=load_history(str(record["accountant-state"]), config.accountant))
    return with_ledger_charges(state, config, merchant_id, server_round)


def _save_state(context: Context, config: FedShopConfig, merchant_id: str, state: PrivacyState) -> None:
    own = state_file(context.node_config)
    if own is not None:
        save_own_state(own, merchant_id, state, config.accountant)
    context.state[PRIVACY_STATE_KEY] = ConfigRecord({
        "noise-multiplier": -1.0 if state.noise_multiplier is None else state.noise_multiplier,
        "accountant-state": save_history(state.history, config.accountant),  # Opacus's accountant state dict
    })


def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    config, partition_id, model, tokenizer, data = setup(msg, context)
    server_round = int(msg.content["config"]["server-round"])
    merchant = merchant_name(context)
    state = _load_state(context, config, merchant, server_round)
    teaching, encoded = encode_teaching(data, config, tokenizer)
    owners = [e.user_id for e in teaching]
    ahead = charged_ahead(state, len(encoded), owners, config)
    if ahead is not None:  # write-ahead: the round counts in the merchant's history before its first noised step
        _save_state(context, config, merchant, ahead)
    result = train_round(model, encoded, config, state,
                         seed=config.seed * 1_000_003 + server_round * 1_009 + partition_id,
                         owners=owners, output_rows=item_rows(tokenizer, data.facts))
    fault = strike(config, merchant, server_round)  # fault-injection: raise, exit, hang (late) or garbage
    _save_state(context, config, merchant, state)
    declined = result.status == STATUS_DECLINED
    # declined: nothing trained, only the metrics travel (no update to clip, average or count)
    arrays = {}
    if not declined:
        uplink = uplink_state(model, config.aggregation)
        arrays = {"arrays": ArrayRecord(corrupted(uplink) if fault == "garbage" else uplink)}
    metrics = MetricRecord({
        "num-examples": result.num_examples, "train-loss": 0.0 if declined else result.train_loss,
        "epsilon": result.epsilon, "delta": result.delta, "noise-multiplier": result.noise_multiplier,
        "sample-rate": result.sample_rate, "steps": result.steps, "declined": int(declined),
        "partition-id": partition_id, "train-seconds": result.train_seconds,
        "message-seconds": time.perf_counter() - started,  # the handler from entry to the reply's contents
    })
    privacy = ConfigRecord(PrivacyBudget.for_merchants(config).reply_fields())  # what the ledger row names
    return Message(content=RecordDict({**arrays, "metrics": metrics, PRIVACY_RECORD: privacy}), reply_to=msg)
