"""Privacy units, budgets under any schedule, central DP at the server, secure mode: real Opacus, real Flower."""

import csv
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from server.strategy import build_strategy
from shared.config import FedShopConfig
from shared.dptrain import STATUS_TRAINED, PrivacyState, admit, schedule, train_round
from shared.modeling import encode
from shared.privacy import PRIVACY_RECORD, PoissonSampler, PrivacyBudget, Uniform, epsilon_of, records_of
from shared.rundir import RunDirectory
from tests.helpers import lora_parameters, tiny_lora_model

CONFIG = FedShopConfig(model_size="tiny", num_merchants=1, shoppers_per_merchant=24, public_shoppers=10,
                       num_items=40, num_categories=4, history_length=6, batch_size=8, num_rounds=2,
                       target_epsilon=4.0, audit_holdout=0.0)


@pytest.fixture(scope="module")
def merchant():
    model, tokenizer, data = tiny_lora_model(CONFIG)
    return model, encode(data.train, tokenizer), [e.user_id for e in data.train]


def _reference_epsilon(history, delta, accountant_class) -> float:
    """An independent Opacus accountant fed the same (noise, rate, steps) history one step at a time."""
    accountant = accountant_class()
    for noise, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


@pytest.mark.parametrize("accountant,reference", [("rdp", RDPAccountant), ("prv", PRVAccountant)])
def test_reported_epsilon_equals_an_independent_accountant(merchant, accountant, reference):
    model, data, owners = merchant
    config = CONFIG.replace(accountant=accountant, privacy_unit="shopper")
    state = PrivacyState()
    results = [train_round(model, data, config, state, seed=s, owners=owners) for s in (1, 2)]
    assert [r.status for r in results] == [STATUS_TRAINED] * 2
    q, steps = schedule(len(set(owners)), config)
    assert sum(h[2] for h in state.history) == 2 * steps and {(h[0], h[1]) for h in state.history} == {
        (state.noise_multiplier, q)}
    assert math.isclose(results[-1].epsilon, _reference_epsilon(state.history, config.target_delta, reference),
                        abs_tol=1e-6)
    assert results[0].epsilon < results[1].epsilon <= config.target_epsilon


@settings(max_examples=10, deadline=None)
@given(records=st.integers(5, 400), batch=st.integers(1, 64), epochs=st.integers(1, 3),
       planned=st.integers(1, 4), extra=st.integers(0, 4), joins=st.integers(1, 4),
       target=st.sampled_from([0.5, 1.0, 4.0, 8.0]), prior=st.integers(0, 3))
def test_no_schedule_ever_exceeds_the_budget(records, batch, epochs, planned, extra, joins, target, prior):
    """More rounds than planned, merchants joining late, a history carried over from an earlier run."""
    config = CONFIG.replace(batch_size=batch, local_epochs=epochs, num_rounds=planned, target_epsilon=target)
    q, steps = schedule(records, config)
    state = PrivacyState()
    if prior:  # a resumed run: an earlier run of `prior` planned rounds already spent (at most) the whole budget
        earlier = PrivacyState()
        for _ in range(prior):
            if admit(earlier, records, config.replace(num_rounds=prior)):
                earlier.history.append((earlier.noise_multiplier, q, steps))
        state.history = list(earlier.history)
    for round_number in range(1, planned + extra + 1):
        if round_number < joins:
            continue
        if admit(state, records, config):
            state.history.append((state.noise_multiplier, q, steps))  # what training the round records
        assert epsilon_of(state.history, config.target_delta, "rdp") <= target


def test_shopper_unit_batches_never_hold_a_shopper_twice():
    owners = [f"u{i % 7}" for i in range(60)]  # 7 shoppers with 8 or 9 examples each
    records = records_of(owners, "shopper")
    assert sorted(len(r) for r in records) == [8, 8, 8, 9, 9, 9, 9]
    sampler = PoissonSampler(records, 0.6, Uniform(seed=0))
    sizes = []
    for _ in range(500):
        batch = sampler.batch()
        shoppers = [owners[i] for i in batch]
        assert len(shoppers) == len(set(shoppers))
        sizes.append(len(batch))
    assert abs(np.mean(sizes) - 0.6 * 7) < 0.3  # Poisson over shoppers: expected q x shoppers per batch
    everyone = PoissonSampler(records, 1.0, Uniform(seed=1)).batch()
    assert sorted(owners[i] for i in everyone) == sorted(set(owners))  # q = 1: one example from each shopper


def test_shopper_unit_samples_shoppers_not_examples(merchant):
    model, data, owners = merchant
    result = train_round(model, data, CONFIG.replace(privacy_unit="shopper"), PrivacyState(), seed=3, owners=owners)
    shoppers = len(set(owners))
    assert len(data) > 2 * shoppers  # several examples per shopper, so the units really differ
    assert (result.sample_rate, result.steps) == schedule(shoppers, CONFIG)
    event = train_round(model, data, CONFIG, PrivacyState(), seed=3)
    assert (event.sample_rate, event.steps) == schedule(len(data), CONFIG)


def test_secure_mode_draws_fresh_randomness_and_plain_mode_is_reproducible(merchant):
    model, data, owners = merchant
    start = lora_parameters(model)

    def one_round(config):
        for name, p in model.named_parameters():
            if name in start:
                p.data.copy_(start[name])
        train_round(model, data, config, PrivacyState(), seed=11, owners=owners)
        return lora_parameters(model)

    secure = CONFIG.replace(secure_mode=True, num_rounds=1)
    plain = CONFIG.replace(num_rounds=1)
    a, b = one_round(secure), one_round(secure)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same seed, different noise and batches
    c, d = one_round(plain), one_round(plain)
    assert all(torch.equal(c[k], d[k]) for k in c)


# --- merchant unit: central DP at the server ---------------------------------------------------------------


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.array(v)) for k, v in arrays.items()})


def _reply(partition: int, arrays: ArrayRecord) -> Message:
    request = Message(content=RecordDict(), dst_node_id=partition + 1, message_type="train")
    metrics = MetricRecord({"num-examples": 50 + partition, "train-loss": 1.0, "epsilon": math.inf, "delta": 1e-5,
                            "noise-multiplier": 0.0, "sample-rate": 0.1, "steps": 3, "declined": 0,
                            "partition-id": partition})
    privacy = ConfigRecord(PrivacyBudget.for_merchants(FedShopConfig(privacy_unit="merchant")).reply_fields())
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics, PRIVACY_RECORD: privacy}),
                   reply_to=request)


def test_central_noise_has_the_configured_std_and_merchant_epsilon_composes(tmp_path, server_identity):
    config = FedShopConfig(run_dir=str(tmp_path), num_merchants=4, num_rounds=3, privacy_unit="merchant",
                           aggregation="fedavg",
                           target_epsilon=8.0, central_clip_norm=0.5, progress=False)
    run_dir = RunDirectory(tmp_path)
    run_dir.start(config)
    ledger, wrapped = build_strategy(run_dir, config)
    rng = np.random.default_rng(0)
    current = {"a": np.zeros((64, 64)), "b": np.zeros((32, 64))}
    expected_std = ledger.central.noise_multiplier * config.central_clip_norm / config.num_merchants
    np.random.seed(1234)  # Flower's wrapper draws its noise from numpy's global generator
    for server_round in (1, 2, 3):
        arrays = _record(current)
        ledger._current, wrapped.current_arrays = arrays, arrays
        updates = [{k: 1e-3 * rng.normal(size=v.shape) for k, v in current.items()} for _ in range(4)]  # norm < C
        replies = [_reply(p, _record({k: current[k] + u[k] for k in current})) for p, u in enumerate(updates)]
        out, _ = wrapped.aggregate_train(server_round, replies)
        mean = {k: current[k] + sum(u[k] for u in updates) / 4 for k in current}
        noise = np.concatenate([(v - mean[k]).ravel() for k, v in zip(current, out.to_numpy_ndarrays())])
        # 6144 draws: the sample std is within 5 % of the true one with overwhelming probability
        assert abs(noise.std() / expected_std - 1) < 0.05 and abs(noise.mean()) < 4 * expected_std / 78
    rows = [r for r in csv.DictReader(open(tmp_path / "privacy.csv")) if r["merchant"] == "all"]
    assert [r["status"] for r in rows] == ["released"] * 3 and {r["unit"] for r in rows} == {"merchant"}
    for k, row in enumerate(rows, 1):
        reference = _reference_epsilon([(ledger.central.noise_multiplier, 1.0, k)], config.target_delta, RDPAccountant)
        assert math.isclose(float(row["epsilon"]), reference, abs_tol=1e-6)
    assert float(rows[0]["epsilon"]) < float(rows[1]["epsilon"]) < float(rows[2]["epsilon"]) <= 8.0
    # a fourth release would exceed the merchant-level budget: the round is not even configured
    assert list(ledger.configure_train(4, arrays, ConfigRecord(), grid=None)) == []  # type: ignore[arg-type]
    assert list(csv.DictReader(open(tmp_path / "privacy.csv")))[-1]["status"] == "declined"


def test_central_clipping_bounds_each_merchants_influence(tmp_path, server_identity):
    config = FedShopConfig(run_dir=str(tmp_path), num_merchants=4, num_rounds=3, privacy_unit="merchant",
                           aggregation="fedavg",
                           central_clip_norm=0.5, progress=False)
    run_dir = RunDirectory(tmp_path)
    run_dir.start(config)
    ledger, wrapped = build_strategy(run_dir, config)

    def aggregate(update: np.ndarray) -> np.ndarray:
        current = _record({"w": np.ones(1000)})
        ledger._current = wrapped.current_arrays = current
        replies = [_reply(p, _record({"w": np.ones(1000)})) for p in range(3)]
        np.random.seed(0)  # the same noise draw for both calls
        out, _ = wrapped.aggregate_train(1, [*replies, _reply(3, _record({"w": 1.0 + update}))])
        return out.to_numpy_ndarrays()[0]

    direction = np.random.default_rng(0).normal(size=1000)
    direction /= np.linalg.norm(direction)
    huge = aggregate(1e3 * direction)  # a merchant sending an update of norm 1000
    at_bound = aggregate(0.5 * direction)  # the same update clipped to norm C by hand
    assert np.allclose(huge, at_bound, atol=1e-12)
    # and its weight is 1 / m of the clipped update, whatever its number of examples
    noise_only = aggregate(np.zeros(1000))
    assert np.allclose(huge - noise_only, 0.5 * direction / 4, atol=1e-12)
