"""The aggregation strategies (fedavg, ffa, svd), update validation, robust merges and bytes on the wire, through the
strategies' aggregate_train on real Flower messages (no simulation)."""

import csv
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from server.aggregation import payload_bytes
from server.report import aggregation_lines
from server.screening import TooFewMerchants
from server.strategy import LedgerFFA, LedgerSVD, build_strategy
from shared.config import FedShopConfig
from shared.dptrain import STATUS_TRAINED, PrivacyState, train_round
from shared.model import adapter_state, uplink_state
from shared.modeling import encode
from shared.privacy import PRIVACY_RECORD, PrivacyBudget
from shared.rundir import RunDirectory
from tests.helpers import first, tiny_lora_model

PREFIX = "base_model.model.encoder.block.0.layer.0.SelfAttention"
R, D_IN, D_OUT = 4, 6, 6  # A: r x in, B: out x r (equal sizes, so B alone is half the adapter's bytes)


@pytest.fixture(autouse=True)
def _server_identity(server_identity):
    """Every test here builds Flower Messages (the identity is restored after each test)."""


def _a(layer: str) -> str:
    return f"{PREFIX}.{layer}.lora_A.weight"


def _b(layer: str) -> str:
    return f"{PREFIX}.{layer}.lora_B.weight"


LAYERS = ("q", "v")
A_KEYS, B_KEYS = [_a(x) for x in LAYERS], [_b(x) for x in LAYERS]


def _initial(rng, dtype=np.float32) -> dict[str, np.ndarray]:
    """A random, B zero (PEFT's initialisation), in PEFT's key order (A then B per layer)."""
    out = {}
    for layer in LAYERS:
        out[_a(layer)] = rng.normal(size=(R, D_IN)).astype(dtype)
        out[_b(layer)] = np.zeros((D_OUT, R), dtype)
    return out


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v)) for k, v in arrays.items()})


def _reply(partition: int, arrays: dict[str, np.ndarray] | None, examples: int, declined: bool = False) -> Message:
    request = Message(content=RecordDict(), dst_node_id=partition + 1, message_type="train")
    metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0, "epsilon": 2.0, "delta": 1e-5,
                            "noise-multiplier": 0.9, "sample-rate": 0.01, "steps": 10, "declined": int(declined),
                            "partition-id": partition})
    content = {"metrics": metrics} if arrays is None else {"arrays": _record(arrays), "metrics": metrics}
    content[PRIVACY_RECORD] = ConfigRecord(PrivacyBudget.for_merchants(FedShopConfig()).reply_fields())
    return Message(content=RecordDict(content), reply_to=request)


def _setup(tmp_path, initial: dict[str, np.ndarray], **changes):
    changes.setdefault("aggregation", "fedavg")  # tests name the strategy they exercise
    config = FedShopConfig(run_dir=str(tmp_path), progress=False, lora_r=R, **changes)
    run_dir = RunDirectory(tmp_path)
    run_dir.start(config)
    ledger, started = build_strategy(run_dir, config, _record(initial))
    return ledger, started, run_dir


def _weighted(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return sum(wi * a.astype(np.float64) for wi, a in zip(w, arrays))


# --- fedavg --------------------------------------------------------------------------------------------------


def test_fedavg_averages_a_and_b_separately_and_counts_bytes(tmp_path):
    rng = np.random.default_rng(0)
    initial = _initial(rng)
    ledger, _, run_dir = _setup(tmp_path, initial)
    sent = [{k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in initial.items()} for _ in range(3)]
    weights = [10, 30, 60]
    arrays, _ = ledger.aggregate_train(1, [_reply(p, u, w) for p, (u, w) in enumerate(zip(sent, weights))]
                                       + [_reply(3, None, 0, declined=True)])
    result = arrays.to_numpy_ndarrays()
    assert list(arrays.keys()) == list(initial)  # the order the server sent
    for key, got in zip(arrays.keys(), result):
        np.testing.assert_allclose(got, _weighted([u[key] for u in sent], weights), rtol=1e-6, atol=1e-6)
        assert got.dtype == np.float32
    record = run_dir.read_metrics()[-1]
    full = payload_bytes(initial)
    assert record["aggregation"] == "fedavg" and record["rejected"] == []
    assert [record["merchants"][m]["uplink-bytes"] for m in ("m0", "m1", "m2", "m3")] == [full, full, full, 0]
    assert all(record["merchants"][m]["downlink-bytes"] == full for m in ("m0", "m1", "m2", "m3"))
    assert record["metrics"]["uplink-bytes-mean"] == full  # over the merchants that sent an update
    assert (record["metrics"]["merchants-trained"], record["metrics"]["merchants-rejected"],
            record["metrics"]["merchants-aggregated"]) == (3, 0, 3)


# --- ffa -----------------------------------------------------------------------------------------------------


def test_ffa_mean_of_b_times_a_is_the_mean_of_the_products_and_a_stays_bit_identical(tmp_path):
    rng = np.random.default_rng(1)
    initial = _initial(rng)
    ledger, _, run_dir = _setup(tmp_path, initial, aggregation="ffa")
    assert isinstance(ledger, LedgerFFA)
    sent = [{k: rng.normal(size=initial[k].shape).astype(np.float32) for k in B_KEYS} for _ in range(3)]
    weights = [5, 15, 80]
    arrays, _ = ledger.aggregate_train(1, [_reply(p, u, w) for p, (u, w) in enumerate(zip(sent, weights))])
    out = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))
    assert list(out) == list(initial)  # A re-attached, in the order sent
    for layer in LAYERS:
        a, b = out[_a(layer)], out[_b(layer)]
        assert a.dtype == initial[_a(layer)].dtype and a.tobytes() == initial[_a(layer)].tobytes()
        mean_of_products = _weighted([u[_b(layer)].astype(np.float64) @ a.astype(np.float64) for u in sent], weights)
        np.testing.assert_allclose(b.astype(np.float64) @ a, mean_of_products, rtol=1e-5, atol=1e-5)
    record = run_dir.read_metrics()[-1]
    uplink = record["merchants"]["m0"]["uplink-bytes"]
    assert uplink == payload_bytes({k: initial[k] for k in B_KEYS})
    assert 2 * uplink == record["merchants"]["m0"]["downlink-bytes"] == payload_bytes(initial)
    # the saved adapter: the kept A re-attached to a B-only record
    final = ledger.final_arrays(_record({k: out[k] for k in B_KEYS}))
    assert list(final.keys()) == list(initial)
    assert all(final[k].numpy().tobytes() == initial[k].tobytes() for k in A_KEYS)


def test_ffa_rejects_a_reply_that_sends_a(tmp_path):
    rng = np.random.default_rng(2)
    initial = _initial(rng)
    ledger, _, run_dir = _setup(tmp_path, initial, aggregation="ffa")
    good = {k: rng.normal(size=initial[k].shape).astype(np.float32) for k in B_KEYS}
    with_a = {**good, _a("q"): initial[_a("q")] + 1}
    arrays, _ = ledger.aggregate_train(1, [_reply(0, good, 10), _reply(1, with_a, 10)])
    out = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))
    assert out[_a("q")].tobytes() == initial[_a("q")].tobytes()
    np.testing.assert_array_equal(out[_b("q")], good[_b("q")])
    rejected = run_dir.read_metrics()[-1]["rejected"]
    assert rejected == [{"merchant": "m1", "reason": f"unexpected keys: {_a('q')}"}]


def test_ffa_under_central_dp_noises_b_only(tmp_path):
    rng = np.random.default_rng(3)
    initial = _initial(rng)
    ledger, wrapped, _ = _setup(tmp_path, initial, aggregation="ffa", privacy_unit="merchant", num_merchants=3,
                                central_clip_norm=10.0)
    wrapped.current_arrays = _record(initial)  # what configure_train would have set
    sent = [{k: 0.01 * rng.normal(size=initial[k].shape).astype(np.float32) for k in B_KEYS} for _ in range(3)]
    np.random.seed(0)
    arrays, _ = wrapped.aggregate_train(1, [_reply(p, u, 10 + p) for p, u in enumerate(sent)])
    out = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))
    assert all(out[k].tobytes() == initial[k].tobytes() for k in A_KEYS)
    mean = {k: sum(u[k].astype(np.float64) for u in sent) / 3 for k in B_KEYS}  # fixed denominator m = 3
    assert all(not np.allclose(out[k], mean[k], atol=1e-9) for k in B_KEYS)  # noised
    assert ledger.central.history  # the release was accounted


FFA_CONFIG = FedShopConfig(model_size="tiny", num_merchants=1, shoppers_per_merchant=30, public_shoppers=10,
                           num_items=40, num_categories=4, history_length=6, batch_size=16, num_rounds=2,
                           lora_targets="q,v", target_epsilon=8.0, aggregation="ffa")


def test_ffa_merchant_trains_b_only_with_dp_sgd_and_sends_b_only():
    model, tokenizer, merchant = tiny_lora_model(FFA_CONFIG)
    before = {k: v.clone() for k, v in adapter_state(model).items()}
    result = train_round(model, first(encode(merchant.train, tokenizer), 96), FFA_CONFIG, PrivacyState(), seed=1)
    assert result.status == STATUS_TRAINED and math.isfinite(result.epsilon)
    after = adapter_state(model)
    a_keys = [k for k in after if "lora_A" in k]
    b_keys = [k for k in after if "lora_B" in k]
    assert a_keys and b_keys
    assert all(torch.equal(before[k], after[k]) for k in a_keys)  # bit-identical
    assert any(not torch.equal(before[k], after[k]) for k in b_keys)  # B trained
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    reply = uplink_state(model, FFA_CONFIG.aggregation)
    assert sorted(reply) == sorted(b_keys)
    assert all(torch.equal(reply[k], after[k]) for k in b_keys)


# --- svd -----------------------------------------------------------------------------------------------------


def _rank_one_adapter(rng) -> dict[str, np.ndarray]:
    """A_i random, B_i with a single non-zero column: B_i·A_i has rank 1."""
    out = {}
    for layer in LAYERS:
        b = np.zeros((D_OUT, R))
        b[:, 0] = rng.normal(size=D_OUT)
        out[_a(layer)], out[_b(layer)] = rng.normal(size=(R, D_IN)), b
    return out


def test_svd_refactorises_the_mean_of_products_exactly_when_its_rank_is_at_most_r(tmp_path):
    rng = np.random.default_rng(4)
    initial = _initial(rng, np.float64)
    ledger, _, run_dir = _setup(tmp_path, initial, aggregation="svd", lora_alpha=8.0)  # scale 8 / 4 = 2
    assert isinstance(ledger, LedgerSVD)
    sent = [_rank_one_adapter(rng) for _ in range(3)]  # mean of products: rank <= 3 <= r = 4
    weights = [1, 2, 5]
    arrays, _ = ledger.aggregate_train(1, [_reply(p, u, w) for p, (u, w) in enumerate(zip(sent, weights))])
    out = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))
    for layer in LAYERS:
        assert out[_a(layer)].shape == (R, D_IN) and out[_b(layer)].shape == (D_OUT, R)
        expected = _weighted([2.0 * u[_b(layer)] @ u[_a(layer)] for u in sent], weights)
        np.testing.assert_allclose(2.0 * out[_b(layer)] @ out[_a(layer)], expected, rtol=1e-10, atol=1e-10)
    record = run_dir.read_metrics()[-1]
    # 0 up to float64 rounding (the squared singular values beyond rank 3 are ~1e-32 of the total)
    assert 0.0 <= record["metrics"]["svd-dropped-energy-max"] < 1e-12
    assert record["merchants"]["m0"]["uplink-bytes"] == record["merchants"]["m0"]["downlink-bytes"] == \
        payload_bytes(initial)


def test_svd_records_the_energy_the_truncation_drops(tmp_path):
    rng = np.random.default_rng(5)
    initial = _initial(rng, np.float64)
    ledger, _, run_dir = _setup(tmp_path, initial, aggregation="svd", lora_alpha=8.0)
    sent = [{k: rng.normal(size=v.shape) for k, v in initial.items()} for _ in range(3)]  # rank 6 > r = 4
    ledger.aggregate_train(1, [_reply(p, u, 1) for p, u in enumerate(sent)])
    metrics = run_dir.read_metrics()[-1]["metrics"]
    expected = []
    for layer in LAYERS:
        s = np.linalg.svd(_weighted([u[_b(layer)] @ u[_a(layer)] for u in sent], [1, 1, 1]), compute_uv=False)
        expected.append(np.sum(s[R:] ** 2) / np.sum(s ** 2))
    assert metrics["svd-dropped-energy-max"] == pytest.approx(max(expected), rel=1e-9) and max(expected) > 0
    assert metrics["svd-dropped-energy-mean"] == pytest.approx(np.mean(expected), rel=1e-9)


# --- validation ----------------------------------------------------------------------------------------------


def _bad_updates(honest: dict[str, np.ndarray], initial: dict[str, np.ndarray]) -> dict[str, dict]:
    nan, inf = dict(honest), dict(honest)
    nan[_a("q")] = honest[_a("q")].copy()
    nan[_a("q")][0, 0] = np.nan
    inf[_b("v")] = honest[_b("v")].copy()
    inf[_b("v")][1, 1] = -np.inf
    shape = {**honest, _a("v"): np.zeros((R, D_IN + 1), np.float32)}
    key = {("renamed" if k == _b("q") else k): v for k, v in honest.items()}
    dtype = {**honest, _b("q"): honest[_b("q")].astype(np.float64)}
    norm = {**honest, _b("q"): initial[_b("q")] + 50.0}  # norm 50 * sqrt(24) ~ 245 > 100
    return {"NaN in": nan, "Inf in": inf, "wrong shape": shape, "missing keys": key, "wrong dtype": dtype,
            "update norm": norm}


@pytest.mark.parametrize("aggregation", ["fedavg", "svd"])
def test_invalid_updates_are_rejected_named_and_left_out_of_the_aggregate(tmp_path, caplog, aggregation):
    rng = np.random.default_rng(6)
    initial = _initial(rng)
    ledger, _, run_dir = _setup(tmp_path, initial, aggregation=aggregation, num_merchants=8, max_update_norm=100.0)
    honest = [{k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in initial.items()}
              for _ in range(2)]
    bad = _bad_updates(honest[0], initial)
    replies = [_reply(0, honest[0], 10), _reply(1, honest[1], 30)]
    replies += [_reply(p, update, 1000) for p, update in enumerate(bad.values(), start=2)]
    with caplog.at_level(logging.WARNING, logger="fedshop"):
        arrays, _ = ledger.aggregate_train(4, replies)

    # the aggregate is the aggregate of the two valid updates alone
    reference_dir = tmp_path / "reference"
    clean, _, _ = _setup(reference_dir, initial, aggregation=aggregation)
    expected, _ = clean.aggregate_train(4, [_reply(0, honest[0], 10), _reply(1, honest[1], 30)])
    for got, want in zip(arrays.to_numpy_ndarrays(), expected.to_numpy_ndarrays()):
        np.testing.assert_array_equal(got, want)
        assert np.all(np.isfinite(got))
    record = run_dir.read_metrics()[-1]
    assert [r["merchant"] for r in record["rejected"]] == [f"m{p}" for p in range(2, 8)]
    for (needle, _), rejection in zip(bad.items(), record["rejected"]):
        assert needle in rejection["reason"], rejection
    assert record["metrics"]["merchants-rejected"] == 6 and record["metrics"]["merchants-aggregated"] == 2
    for p in range(2, 8):
        assert f"round 4: rejected the update of merchant m{p}" in caplog.text
    report = "\n".join(aggregation_lines(ledger.config, [record]))
    assert f"method: {aggregation}" in report and "rejected updates: 6: m2 round 4 (NaN in" in report
    # the ledger keeps describing what the merchants did (they trained): no new status for a rejection
    statuses = {r["merchant"]: r["status"] for r in csv.DictReader(open(tmp_path / "privacy.csv"))}
    assert set(statuses.values()) == {"trained"}


def test_too_few_valid_updates_stop_the_run_naming_round_and_reasons(tmp_path):
    rng = np.random.default_rng(7)
    initial = _initial(rng)
    ledger, _, run_dir = _setup(tmp_path, initial, num_merchants=3, min_merchants=2)
    honest = {k: v + 0.1 for k, v in initial.items()}
    nan = {**honest, _b("q"): np.full_like(honest[_b("q")], np.nan)}
    with pytest.raises(TooFewMerchants, match=r"round 3: 1 valid merchant update\(s\), fewer than min-merchants = 2 "
                       r"\(m1 rejected: NaN in .*; m2 rejected: NaN in .*\); the run stopped, checkpoints/round-2 is "
                       r"the last complete round"):
        ledger.aggregate_train(3, [_reply(0, honest, 10), _reply(1, nan, 10), _reply(2, nan, 10)])
    assert run_dir.read_metrics()[-1]["metrics"]["merchants-rejected"] == 2  # recorded before stopping


def test_declines_alone_never_trip_min_merchants(tmp_path):
    initial = _initial(np.random.default_rng(8))
    ledger, _, _ = _setup(tmp_path, initial, num_merchants=3, min_merchants=3)
    arrays, _ = ledger.aggregate_train(1, [_reply(0, None, 0, declined=True), _reply(1, None, 0, declined=True)])
    assert arrays is None


def test_central_dp_leaves_invalid_replies_unclipped_for_the_strategy_to_reject(tmp_path):
    rng = np.random.default_rng(9)
    initial = _initial(rng)
    ledger, wrapped, run_dir = _setup(tmp_path, initial, privacy_unit="merchant", num_merchants=3)
    wrapped.current_arrays = _record(initial)
    honest = [{k: v + 0.001 * rng.normal(size=v.shape).astype(np.float32) for k, v in initial.items()}
              for _ in range(2)]
    shape = {**honest[0], _a("v"): np.zeros((R + 1, D_IN), np.float32)}
    nan = {**honest[0], _a("q"): np.full((R, D_IN), np.nan, np.float32)}
    arrays, _ = wrapped.aggregate_train(1, [_reply(0, honest[0], 5), _reply(1, honest[1], 5), _reply(2, shape, 5),
                                            _reply(3, nan, 5)])
    assert all(np.all(np.isfinite(a)) for a in arrays.to_numpy_ndarrays())
    assert [r["merchant"] for r in run_dir.read_metrics()[-1]["rejected"]] == ["m2", "m3"]


# --- robust --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["fedavg", "ffa"])
@pytest.mark.parametrize("robust", ["median", "trimmed-mean"])
def test_robust_merge_resists_one_huge_update(tmp_path, aggregation, robust):
    rng = np.random.default_rng(10)
    initial = _initial(rng)
    keys = B_KEYS if aggregation == "ffa" else list(initial)
    honest = [{k: (0.5 + 0.01 * rng.normal(size=initial[k].shape)).astype(np.float32) for k in keys}
              for _ in range(4)]
    attacker = {k: np.full(initial[k].shape, 1e6, np.float32) for k in keys}
    replies = [_reply(p, u, 10) for p, u in enumerate(honest)] + [_reply(4, attacker, 10_000)]
    # max-update-norm off: the robust merge alone has to hold the attacker back
    ledger, _, _ = _setup(tmp_path, initial, aggregation=aggregation, robust=robust, trim_fraction=0.2,
                          max_update_norm=0.0, num_merchants=5)
    arrays, _ = ledger.aggregate_train(1, replies)
    out = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays()))
    # Bound: with one outlier among 5 the median and the 20 %-trimmed mean (one value cut at each end) stay inside
    # the honest range, so per coordinate |aggregate - honest mean| < max - min of the honest values (about 0.05,
    # against the 1e6 / 5 the plain mean moves even unweighted).
    for key in keys:
        stacked = np.stack([u[key] for u in honest]).astype(np.float64)
        spread = stacked.max(axis=0) - stacked.min(axis=0)
        assert np.all(np.abs(out[key] - stacked.mean(axis=0)) <= spread + 1e-6)
        assert np.all(spread < 0.1)
    if aggregation == "ffa":
        assert all(out[k].tobytes() == initial[k].tobytes() for k in A_KEYS)
    plain, _, _ = _setup(tmp_path / "plain", initial, aggregation=aggregation, max_update_norm=0.0, num_merchants=5)
    moved, _ = plain.aggregate_train(1, [_reply(p, u, 10) for p, u in enumerate(honest)] + [_reply(4, attacker, 10)])
    assert all(np.all(np.abs(moved[k].numpy() - 0.5) > 1e5) for k in keys)


# --- federated evaluation: merchants reporting different metric families ---------------------------------------------


def _evaluate_reply(partition: int, metrics: dict[str, float]) -> Message:
    request = Message(content=RecordDict(), dst_node_id=partition + 1, message_type="evaluate")
    return Message(content=RecordDict({"metrics": MetricRecord({**metrics, "partition-id": partition})}),
                   reply_to=request)


def test_evaluate_pools_each_metric_family_over_the_merchants_that_report_it(tmp_path):
    # Prepare: m0 has churn examples and new-item targets, m1 neither, m2 new-item targets and a one-class churn set
    replies = [
        _evaluate_reply(0, {"num-examples": 10, "intent-auc": 0.6, "churn-auc": 0.7, "next-new-hr@10": 0.5,
                            "next-new-examples": 4.0}),
        _evaluate_reply(1, {"num-examples": 30, "intent-auc": 0.8}),
        _evaluate_reply(2, {"num-examples": 20, "intent-auc": 0.9, "churn-auc": math.nan, "next-new-hr@10": 0.25,
                            "next-new-examples": 12.0}),
    ]
    ledger, _, run_dir = _setup(tmp_path, _initial(np.random.default_rng(0)))
    with pytest.raises(InconsistentMessageReplies, match="same keys"):  # what Flower's own FedAvg does with them
        FedAvg().aggregate_evaluate(1, replies)
    # Execute
    result = ledger.aggregate_evaluate(1, replies)
    # Assert
    assert result["intent-auc"] == pytest.approx((10 * 0.6 + 30 * 0.8 + 20 * 0.9) / 60, rel=1e-15)
    assert result["churn-auc"] == 0.7  # m0 alone has a value (m2's NaN: no AUC on one class)
    assert result["next-new-hr@10"] == pytest.approx((4 * 0.5 + 12 * 0.25) / 16, rel=1e-15)  # by new targets
    assert result["next-new-examples"] == 16.0
    assert "num-examples" not in result and "partition-id" not in result
    record = run_dir.read_metrics()[-1]
    assert record["round"] == 1 and record["scope"] == "evaluate" and record["metrics"] == dict(result)
    assert set(record["merchants"]) == {"m0", "m1", "m2"} and "churn-auc" not in record["merchants"]["m1"]


def test_evaluate_equals_flowers_aggregation_bit_for_bit_when_every_merchant_reports_every_key(tmp_path):
    # Prepare: awkward weights and values, so any other summation order would differ in the last bits
    rng = np.random.default_rng(7)
    keys = [f"metric-{k}" for k in range(20)]
    replies = [_evaluate_reply(p, {"num-examples": int(rng.integers(1, 997)), **{k: float(rng.random()) for k in keys}})
               for p in range(5)]
    ledger, _, _ = _setup(tmp_path, _initial(rng))
    # Execute
    ours, flowers = ledger.aggregate_evaluate(1, replies), FedAvg().aggregate_evaluate(1, replies)
    # Assert
    assert {k: ours[k] for k in keys} == {k: flowers[k] for k in keys}


def test_evaluate_leaves_out_failed_and_weightless_replies_and_numbers_resumed_rounds_on(tmp_path, caplog):
    # Prepare: a ledger resuming after round 4 (Flower's round 1 is the run's round 5)
    ledger, _, run_dir = _setup(tmp_path, _initial(np.random.default_rng(0)))
    ledger.round_offset = 4
    request = Message(content=RecordDict(), dst_node_id=9, message_type="evaluate")
    failed = Message(Error(code=0, reason="out of memory"), reply_to=request)
    replies = [_evaluate_reply(0, {"num-examples": 5, "intent-auc": 0.5}),
               _evaluate_reply(1, {"num-examples": 0, "intent-auc": 0.9}), failed]
    # Execute
    with caplog.at_level(logging.WARNING, logger="fedshop"):
        result = ledger.aggregate_evaluate(1, replies)
    # Assert
    assert dict(result) == {"intent-auc": 0.5}
    assert "out of memory" in caplog.text and "positive num-examples" in caplog.text
    assert run_dir.read_metrics()[-1]["round"] == 5


# --- merchant failures ------------------------------------------------------------------------------------------
def _error_reply(partition: int, reason: str) -> Message:
    request = Message(content=RecordDict(), dst_node_id=partition + 1, message_type="train")
    return Message(Error(code=0, reason=reason), reply_to=request)


def _ledger_rows(tmp_path, round_: int) -> dict[str, dict[str, str]]:
    return {r["merchant"]: r for r in csv.DictReader(open(tmp_path / "privacy.csv")) if int(r["round"]) == round_}


def test_a_merchant_failing_after_a_trained_round_is_charged_that_round_as_if_it_finished(tmp_path):
    from shared.ledger import history_from_ledger

    # Prepare: round 1 trained by m0, m1, m2 (nodes 1, 2, 3: the server learns who is where from their replies)
    initial = _initial(np.random.default_rng(11))
    ledger, _, run_dir = _setup(tmp_path, initial, num_merchants=3)
    honest = {k: v + 0.1 for k, v in initial.items()}
    ledger.aggregate_train(1, [_reply(p, honest, 10) for p in range(3)])
    # Execute: round 2 sent to nodes 1, 2, 3 and to node 9, never heard from; m1 (node 2) replies with an error,
    # m2 (node 3) and node 9 not at all (Flower's round timeout)
    ledger._train_nodes = [1, 2, 3, 9]
    arrays, _ = ledger.aggregate_train(2, [_reply(0, honest, 10), _error_reply(1, "boom\n  in train")])
    # Assert: the round aggregated m0 alone; m1 and m2 carry their last round's schedule and the epsilon of two
    # rounds; node 9, never named, has nothing the server could know (epsilon NaN, 0 steps)
    assert arrays is not None
    rows = _ledger_rows(tmp_path, 2)
    two_rounds = PrivacyBudget.for_merchants(ledger.config).spent([(0.9, 0.01, 10), (0.9, 0.01, 10)])
    for merchant in ("m1", "m2"):
        row = rows[merchant]
        assert (row["status"], float(row["noise_multiplier"]), float(row["sample_rate"]), int(row["steps"])) == (
            "failed", 0.9, 0.01, 10)
        assert float(row["epsilon"]) == pytest.approx(two_rounds, rel=1e-12)
        assert history_from_ledger(tmp_path, merchant)[1] == [(0.9, 0.01, 20)]  # both rounds, merged as Opacus does
    assert rows["node-9"]["status"] == "failed" and rows["node-9"]["steps"] == "0"
    assert math.isnan(float(rows["node-9"]["epsilon"])) and history_from_ledger(tmp_path, "node-9")[1] == []
    record = run_dir.read_metrics()[-1]
    assert record["metrics"]["merchants-failed"] == 3 and record["metrics"]["merchants-aggregated"] == 1
    assert {f["merchant"]: f["reason"] for f in record["failed"]} == {
        "m1": "boom in train", "m2": "no reply within round-timeout = 3600 s",
        "node-9": "no reply within round-timeout = 3600 s"}


def test_a_merchant_failing_in_its_first_round_has_no_steps_and_no_epsilon(tmp_path):
    initial = _initial(np.random.default_rng(12))
    ledger, _, _ = _setup(tmp_path, initial, num_merchants=3)
    ledger.node_merchants[2] = "m1"  # named by round 0's evaluation
    ledger.aggregate_train(1, [_reply(0, {k: v + 0.1 for k, v in initial.items()}, 10), _error_reply(1, "boom")])
    row = _ledger_rows(tmp_path, 1)["m1"]
    assert (row["status"], row["steps"], row["noise_multiplier"], row["epsilon"]) == ("failed", "0", "nan", "nan")


def test_failures_leaving_too_few_merchants_stop_the_run_naming_who_and_why(tmp_path):
    initial = _initial(np.random.default_rng(13))
    ledger, _, run_dir = _setup(tmp_path, initial, num_merchants=3, min_merchants=2)
    honest = {k: v + 0.1 for k, v in initial.items()}
    ledger.aggregate_train(1, [_reply(p, honest, 10) for p in range(3)])
    ledger._train_nodes = [1, 2, 3]
    with pytest.raises(TooFewMerchants, match=r"^round 2: 1 valid merchant update\(s\), fewer than min-merchants = 2 "
                       r"\(m1 failed: boom; m2 failed: no reply within round-timeout = 3600 s\); the run stopped, "
                       r"checkpoints/round-1 is the last complete round \(fedshop simulate --resume RUN_DIR "
                       r"continues from it\)$"):
        ledger.aggregate_train(2, [_reply(0, honest, 10), _error_reply(1, "boom")])
    assert run_dir.read_metrics()[-1]["metrics"]["merchants-failed"] == 2  # recorded before stopping
    assert {r["merchant"]: r["status"] for r in _ledger_rows(tmp_path, 2).values()} == {
        "m0": "trained", "m1": "failed", "m2": "failed"}
