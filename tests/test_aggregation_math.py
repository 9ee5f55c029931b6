"""The numpy arithmetic of server/aggregation.py on small hand-made adapters."""

import numpy as np
import pytest

from server.aggregation import (
    coordinate_median,
    ffa_mean,
    lora_pairs,
    max_dropped_energy,
    payload_bytes,
    svd_aggregate,
    trimmed_mean,
    validate_update,
    weighted_mean,
)

PREFIX = "base_model.model.encoder.block.0.layer.0.SelfAttention"
LAYERS = ("q", "v")


def _a(layer: str) -> str:
    return f"{PREFIX}.{layer}.lora_A.weight"


def _b(layer: str) -> str:
    return f"{PREFIX}.{layer}.lora_B.weight"


def _adapter(rng, r=8, d_in=16, d_out=12, b_rank=None, dtype=np.float64) -> dict:
    """Random A (r x in) and B (out x r) per layer; with b_rank, B has that rank so B·A has rank <= b_rank."""
    out = {}
    for layer in LAYERS:
        b = rng.normal(size=(d_out, r)) if b_rank is None else rng.normal(size=(d_out, b_rank)) @ rng.normal(
            size=(b_rank, r))
        out[_a(layer)], out[_b(layer)] = rng.normal(size=(r, d_in)).astype(dtype), b.astype(dtype)
    return out


def _mean_product(adapters, weights, layer, scale):
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    return sum(wi * scale * (a[_b(layer)].astype(np.float64) @ a[_a(layer)].astype(np.float64))
               for wi, a in zip(w, adapters))


def test_weighted_mean_matches_hand_computed_values():
    x = {"k": np.array([1.0, 2.0, -4.0], dtype=np.float32), "m": np.array([[0.0, 8.0]], dtype=np.float32)}
    y = {"k": np.array([5.0, 6.0, 0.0], dtype=np.float32), "m": np.array([[4.0, 0.0]], dtype=np.float32)}
    mean = weighted_mean([x, y], [1, 3])  # (1*x + 3*y) / 4
    np.testing.assert_array_equal(mean["k"], np.array([4.0, 5.0, -1.0], dtype=np.float32))
    np.testing.assert_array_equal(mean["m"], np.array([[3.0, 2.0]], dtype=np.float32))
    assert mean["k"].dtype == np.float32 and mean["m"].dtype == np.float32
    with pytest.raises(ValueError, match="merchant 1 lacks key m"):
        weighted_mean([x, {"k": y["k"]}], [1, 1])


def test_lora_pairs_and_missing_partner():
    keys = [_a("q"), _b("q"), _a("v"), _b("v")]
    assert lora_pairs(keys) == [(_a("q"), _b("q")), (_a("v"), _b("v"))]
    with pytest.raises(ValueError, match="v.lora_A.weight has no partner"):
        lora_pairs([_a("q"), _b("q"), _a("v")])
    with pytest.raises(ValueError, match="v.lora_B.weight has no partner"):
        lora_pairs([_a("q"), _b("q"), _b("v")])


def test_ffa_mean_of_b_equals_mean_of_products_and_keeps_a():
    rng = np.random.default_rng(0)
    shared = _adapter(rng)
    adapters = [{**shared, **{_b(layer): rng.normal(size=(12, 8)) for layer in LAYERS}} for _ in range(3)]
    weights = [10, 30, 60]
    merged = ffa_mean(adapters, weights)
    for layer in LAYERS:
        assert merged[_a(layer)].tobytes() == shared[_a(layer)].tobytes()
        assert merged[_a(layer)].dtype == shared[_a(layer)].dtype
        np.testing.assert_allclose(merged[_b(layer)] @ merged[_a(layer)], _mean_product(adapters, weights, layer, 1.0),
                                   rtol=0, atol=1e-6)
    bad = [adapters[0], adapters[1], {**adapters[2], _a("v"): adapters[2][_a("v")] + 1e-12}]
    with pytest.raises(ValueError, match=r"key .*v\.lora_A\.weight, merchant 2"):
        ffa_mean(bad, weights)


EMBED = "base_model.model.encoder.embed_tokens"


def test_an_embedding_loras_factors_pair_and_ffa_averages_its_per_token_factor():
    # PEFT names an embedding's factors lora_embedding_A (r x vocabulary, zero at init) and lora_embedding_B (d x r)
    rng = np.random.default_rng(4)
    a_key, b_key = f"{EMBED}.lora_embedding_A", f"{EMBED}.lora_embedding_B"
    keys = [_a("q"), _b("q"), a_key, b_key]
    assert lora_pairs(keys) == sorted([(_a("q"), _b("q")), (a_key, b_key)])
    with pytest.raises(ValueError, match="lora_embedding_B has no partner"):
        lora_pairs([b_key])
    frozen_b = rng.normal(size=(12, 4))
    adapters = [{a_key: rng.normal(size=(4, 30)), b_key: frozen_b} for _ in range(3)]
    merged = ffa_mean(adapters, [1, 1, 2])
    # ffa freezes the embedding's B: it comes back bit-identical, and B·mean(A) is the mean of the products
    assert merged[b_key].tobytes() == frozen_b.tobytes()
    expected = sum(w * frozen_b @ a[a_key] for w, a in zip([0.25, 0.25, 0.5], adapters))
    np.testing.assert_allclose(merged[b_key] @ merged[a_key], expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="lora_embedding_B, merchant 1"):
        ffa_mean([adapters[0], {**adapters[1], b_key: frozen_b + 1.0}], [1, 1])


def test_svd_aggregate_is_exact_when_the_mean_has_rank_at_most_r():
    rng = np.random.default_rng(1)
    adapters = [_adapter(rng, b_rank=2) for _ in range(3)]  # mean of products: rank <= 6 <= r = 8
    weights, scale = [1, 2, 5], 2.0
    merged, dropped = svd_aggregate(adapters, weights, scale=scale, rank=8)
    for layer in LAYERS:
        assert merged[_a(layer)].shape == (8, 16) and merged[_b(layer)].shape == (12, 8)
        np.testing.assert_allclose(scale * merged[_b(layer)] @ merged[_a(layer)],
                                   _mean_product(adapters, weights, layer, scale), rtol=1e-10, atol=1e-10)
        assert dropped[_a(layer)] <= 1e-12
    assert max_dropped_energy(dropped) <= 1e-12


def test_svd_aggregate_truncates_and_reports_the_dropped_energy():
    rng = np.random.default_rng(2)
    adapters = [_adapter(rng, r=4, dtype=np.float32) for _ in range(3)]  # mean of products: rank 10 > 4
    weights, scale = [3, 1, 1], 4.0
    merged, dropped = svd_aggregate(adapters, weights, scale=scale, rank=4)
    for layer in LAYERS:
        assert merged[_a(layer)].dtype == np.float32 and merged[_a(layer)].shape == (4, 16)
        u, s, vt = np.linalg.svd(_mean_product(adapters, weights, layer, scale), full_matrices=False)
        expected = np.sum(s[4:] ** 2) / np.sum(s ** 2)
        assert dropped[_a(layer)] > 0
        assert dropped[_a(layer)] == pytest.approx(expected, rel=1e-9)
        best = (u[:, :4] * s[:4]) @ vt[:4]  # the best rank-4 approximation
        np.testing.assert_allclose(scale * merged[_b(layer)].astype(np.float64) @ merged[_a(layer)], best,
                                   rtol=1e-4, atol=1e-4)
    assert max_dropped_energy(dropped) == max(dropped.values())


def test_svd_aggregate_pads_with_zeros_and_handles_an_all_zero_mean():
    zero = {_a("q"): np.zeros((8, 16)), _b("q"): np.zeros((12, 8))}
    merged, dropped = svd_aggregate([zero, zero], [1, 1], scale=2.0, rank=4)
    assert dropped == {_a("q"): 0.0}
    assert merged[_a("q")].shape == (8, 16) and not merged[_a("q")].any() and not merged[_b("q")].any()
    with pytest.raises(ValueError, match="exceeds the adapter rank"):
        svd_aggregate([zero], [1], scale=2.0, rank=9)


@pytest.mark.parametrize("change, needle", [
    (lambda u: u[_a("q")].__setitem__((0, 0), np.nan), f"NaN in {_a('q')}"),
    (lambda u: u[_b("v")].__setitem__((1, 1), -np.inf), f"Inf in {_b('v')}"),
    (lambda u: u.__setitem__(_a("v"), np.zeros((8, 15), np.float32)), f"{_a('v')}: got (8, 15), expected (8, 16)"),
    (lambda u: u.__setitem__("extra.lora_A.weight", np.zeros(1, np.float32)), "unexpected keys: extra.lora_A.weight"),
    (lambda u: u.pop(_b("q")), f"missing keys: {_b('q')}"),
    (lambda u: u.__setitem__(_b("q"), u[_b("q")].astype(np.float64)), f"dtype for {_b('q')}: got float64"),
    (lambda u: u[_b("q")].__setitem__((0, 0), 100.0), "update norm 100 exceeds the bound 10"),
])
def test_validate_update_rejects_and_names_the_problem(change, needle):
    reference = {k: np.zeros_like(v) for k, v in _adapter(np.random.default_rng(3), dtype=np.float32).items()}
    update = {k: v.copy() for k, v in reference.items()}
    assert validate_update(update, reference, max_norm=10.0) is None
    change(update)
    reason = validate_update(update, reference, max_norm=10.0)
    assert reason is not None and needle in reason


def test_validate_update_without_a_norm_bound():
    reference = {"w": np.zeros(3, np.float32)}
    assert validate_update({"w": np.full(3, 1e9, np.float32)}, reference, max_norm=None) is None


def test_median_and_trimmed_mean_resist_one_huge_update():
    rng = np.random.default_rng(4)
    honest = [{"w": 0.5 + 0.01 * rng.normal(size=(6, 5))} for _ in range(4)]
    attacker = {"w": np.full((6, 5), 1e6)}
    stacked = np.stack([u["w"] for u in honest])
    honest_mean, spread = stacked.mean(axis=0), stacked.max(axis=0) - stacked.min(axis=0)
    updates = honest + [attacker]
    # Bound: with one outlier among 5, both robust aggregates stay inside the honest range, so per coordinate
    # |aggregate - honest mean| < max - min of the honest values; the plain mean moves by about 1e6 / 5.
    for robust in (coordinate_median(updates), trimmed_mean(updates, 0.2)):
        assert np.all(np.abs(robust["w"] - honest_mean) < spread)
    plain = weighted_mean(updates, [1] * 5)
    assert np.all(np.abs(plain["w"] - honest_mean) > 1e5)


def test_trimmed_mean_trims_floor_fraction_and_refuses_to_trim_everything():
    updates = [{"w": np.array([v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    np.testing.assert_array_equal(trimmed_mean(updates, 0.39)["w"], [3.0])  # floor(1.95) = 1 cut at each end
    np.testing.assert_array_equal(trimmed_mean(updates, 0.19)["w"], [22.0])  # floor(0.95) = 0: the plain mean
    np.testing.assert_array_equal(coordinate_median(updates)["w"], [3.0])
    with pytest.raises(ValueError, match="0 of 4 updates would remain"):
        trimmed_mean(updates[:4], 0.5)


def test_payload_bytes():
    arrays = {"a": np.zeros((8, 4), np.float32), "b": np.zeros(3, np.float64), "c": np.zeros((2, 2), np.float16)}
    assert payload_bytes(arrays) == 8 * 4 * 4 + 3 * 8 + 4 * 2


def test_the_server_step_scales_the_mean_update_from_what_was_sent():
    # Prepare
    from server.aggregation import server_step

    sent = {"b": np.array([1.0, 2.0], dtype=np.float32)}
    merged = {"b": np.array([1.5, 1.0], dtype=np.float32)}
    # Execute / Assert: 1 is plain averaging, 2 doubles the step, the dtype is kept
    assert np.array_equal(server_step(sent, merged, 1.0)["b"], merged["b"])
    doubled = server_step(sent, merged, 2.0)["b"]
    assert np.allclose(doubled, [2.0, 0.0]) and doubled.dtype == np.float32


def test_a_server_learning_rate_is_refused_where_it_would_break_the_guarantee_or_the_merge():
    import pytest

    from shared.config import ConfigError, FedShopConfig

    FedShopConfig(server_learning_rate=3.0)  # ffa without central DP: allowed
    with pytest.raises(ConfigError, match="server-learning-rate"):
        FedShopConfig(server_learning_rate=3.0, aggregation="svd")
    with pytest.raises(ConfigError, match="server-learning-rate"):
        FedShopConfig(server_learning_rate=3.0, central_dp=True)
