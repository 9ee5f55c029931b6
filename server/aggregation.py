"""Aggregation arithmetic for LoRA adapters, one `dict[str, np.ndarray]` per merchant (PEFT state-dict keys).

Everything here is plain numpy on dicts: no Flower messages, no torch arithmetic. The only Flower import is the pair of
legacy numpy helpers `aggregate_median` and `aggregate_trimmed_avg` (`flwr.server.strategy.aggregate`), which
`coordinate_median` and `trimmed_mean` wrap: they compute the per-coordinate median / trimmed mean over a list of
ndarray lists, which is exactly what is needed once each dict is flattened in a fixed key order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from shared.model import is_frozen_key

Adapter = Mapping[str, np.ndarray]
Arrays = dict[str, np.ndarray]


def _check_same_keys(updates: Sequence[Adapter]) -> list[str]:
    """Sorted keys of the first update; ValueError naming the key and merchant index where another one differs."""
    if not updates:
        raise ValueError("no updates to aggregate")
    keys = sorted(updates[0])
    for index, update in enumerate(updates[1:], start=1):
        missing, extra = sorted(set(keys) - set(update)), sorted(set(update) - set(keys))
        if missing or extra:
            key = (missing or extra)[0]
            raise ValueError(f"merchant {index} {'lacks' if missing else 'has unexpected'} key {key}")
        for key in keys:
            if np.shape(update[key]) != np.shape(updates[0][key]):
                raise ValueError(f"merchant {index} key {key}: shape {np.shape(update[key])} "
                                 f"!= {np.shape(updates[0][key])}")
    return keys


def _normalised(weights: Sequence[float], count: int) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (count,):
        raise ValueError(f"{w.size} weights for {count} updates")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    return w / w.sum()


def weighted_mean(updates: Sequence[Adapter], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Per-key mean weighted by `weights`, accumulated in float64 and cast back to each key's input dtype."""
    keys = _check_same_keys(updates)
    w = _normalised(weights, len(updates))
    out = {}
    for key in keys:
        total = sum(wi * np.asarray(u[key], dtype=np.float64) for wi, u in zip(w, updates))
        out[key] = np.asarray(total).astype(np.asarray(updates[0][key]).dtype)
    return out


FACTORS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))  # PEFT's names: linear, embedding


def lora_pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(A key, B key) for every adapted layer, sorted by A key; ValueError naming any key without its partner.

    A linear layer's delta is B·A (out x r, r x in); an embedding's is B·A as well (d x r, r x vocabulary: PEFT
    names them lora_embedding_B and lora_embedding_A)."""
    keys = set(keys)
    pairs = []
    for a_name, b_name in FACTORS:
        for key in sorted(k for k in keys if a_name in k):
            partner = key.replace(a_name, b_name)
            if partner not in keys:
                raise ValueError(f"{key} has no partner {partner}")
            pairs.append((key, partner))
    paired = {k for pair in pairs for k in pair}
    for a_name, b_name in FACTORS:
        orphans = sorted(k for k in keys if b_name in k and k not in paired)
        if orphans:
            raise ValueError(f"{orphans[0]} has no partner {orphans[0].replace(b_name, a_name)}")
    return sorted(pairs)


def svd_aggregate(adapters: Sequence[Adapter], weights: Sequence[float], scale: float, rank: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Exact aggregation of the low-rank products, re-factorised at `rank`.

    For each layer the weighted mean of scale·B_i·A_i is truncated by SVD to its top `rank` singular triplets and
    split symmetrically, so scale·B·A equals that truncation. A and B keep their shapes (r x in, out x r) and dtypes;
    rows/columns beyond the kept rank are zero, so `rank` may not exceed the adapter rank r. Keys outside the LoRA
    pairs are weighted-averaged. The second result maps each A key to the dropped share of squared singular values
    (0.0 for an all-zero mean).
    """
    if scale <= 0 or rank < 1:
        raise ValueError(f"need scale > 0 and rank >= 1, got scale {scale}, rank {rank}")
    keys = _check_same_keys(adapters)
    w = _normalised(weights, len(adapters))
    pairs = lora_pairs(keys)
    paired = {k for pair in pairs for k in pair}
    rest = [k for k in keys if k not in paired]
    out = weighted_mean([{k: a[k] for k in rest} for a in adapters], weights) if rest else {}
    dropped: dict[str, float] = {}
    for a_key, b_key in pairs:
        a0, b0 = np.asarray(adapters[0][a_key]), np.asarray(adapters[0][b_key])
        r = a0.shape[0]
        if b0.shape[1] != r:
            raise ValueError(f"{a_key} has rank {r} but {b_key} has shape {b0.shape}")
        if rank > r:
            raise ValueError(f"rank {rank} exceeds the adapter rank {r} of {a_key}")
        delta = sum(wi * scale * (np.asarray(ad[b_key], np.float64) @ np.asarray(ad[a_key], np.float64))
                    for wi, ad in zip(w, adapters))
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        k = min(rank, s.size)
        total = float(np.sum(s ** 2))
        dropped[a_key] = float(np.sum(s[k:] ** 2)) / total if total > 0 else 0.0
        root = np.sqrt(s[:k] / scale)
        new_a, new_b = np.zeros(a0.shape), np.zeros(b0.shape)
        new_a[:k] = root[:, None] * vt[:k]
        new_b[:, :k] = u[:, :k] * root[None, :]
        out[a_key], out[b_key] = new_a.astype(a0.dtype), new_b.astype(b0.dtype)
    return out, dropped


def max_dropped_energy(dropped: Mapping[str, float]) -> float:
    """Largest per-layer dropped energy of `svd_aggregate` (0.0 when there are no layers)."""
    return max(dropped.values(), default=0.0)


def ffa_mean(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """FFA-LoRA: one factor of each layer is frozen and shared (`shared.model.is_frozen_key`: a linear layer's A, an
    embedding's B), so only the other keys are weighted-averaged, and the mean of the products is exact.

    Every frozen tensor must be bit-identical (dtype, shape and bytes) to merchant 0's; it is returned as a copy of
    that tensor. A ValueError names the key and merchant index of the first mismatch.
    """
    keys = _check_same_keys(adapters)
    a_keys = [k for k in keys if is_frozen_key(k, "ffa")]
    for key in a_keys:
        ref = np.asarray(adapters[0][key])
        for index, adapter in enumerate(adapters[1:], start=1):
            arr = np.asarray(adapter[key])
            if arr.dtype != ref.dtype or arr.tobytes() != ref.tobytes():
                raise ValueError(f"frozen A differs: key {key}, merchant {index}")
    out = weighted_mean([{k: a[k] for k in keys if k not in a_keys} for a in adapters], weights)
    out.update({k: np.array(adapters[0][k], copy=True) for k in a_keys})
    return out


def validate_update(update: Adapter, reference: Adapter, *, max_norm: float | None) -> str | None:
    """None for an acceptable update, otherwise a short reason naming the offending key(s) or the norm.

    Checks, in order: key set, shape, dtype, finiteness, then the L2 norm of (update - reference) over all tensors.
    """
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing:
        return f"missing keys: {', '.join(missing)}"
    if extra:
        return f"unexpected keys: {', '.join(extra)}"
    squared = 0.0
    for key in sorted(reference):
        got, want = np.asarray(update[key]), np.asarray(reference[key])
        if got.shape != want.shape:
            return f"wrong shape for {key}: got {got.shape}, expected {want.shape}"
        if got.dtype != want.dtype:
            return f"wrong dtype for {key}: got {got.dtype}, expected {want.dtype}"
        if np.issubdtype(got.dtype, np.inexact) and np.isnan(got).any():
            return f"NaN in {key}"
        if np.issubdtype(got.dtype, np.inexact) and np.isinf(got).any():
            return f"Inf in {key}"
        squared += float(np.sum((got.astype(np.float64) - want.astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.6g} exceeds the bound {max_norm:.6g}"
    return None


def _flower_robust(updates: Sequence[Adapter], aggregate) -> dict[str, np.ndarray]:
    keys = _check_same_keys(updates)
    arrays = aggregate([([np.asarray(u[k]) for k in keys], 1) for u in updates])
    return {k: np.asarray(a).astype(np.asarray(updates[0][k]).dtype) for k, a in zip(keys, arrays)}


def coordinate_median(updates: Sequence[Adapter]) -> dict[str, np.ndarray]:
    """Per-coordinate median over merchants (unweighted), via Flower's `aggregate_median`."""
    return _flower_robust(updates, aggregate_median)


def trimmed_mean(updates: Sequence[Adapter], trim_fraction: float) -> dict[str, np.ndarray]:
    """Per-coordinate mean after dropping floor(trim_fraction·n) values at each end, via `aggregate_trimmed_avg`.

    Flower accepts trim_fraction in [0, 0.5) only, which always leaves at least one value; other fractions (including
    every one that would leave nothing) raise ValueError.
    """
    n = len(updates)
    if not 0.0 <= trim_fraction < 0.5:
        cut = math.floor(trim_fraction * n) if trim_fraction >= 0 else 0
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction} "
                         f"({max(n - 2 * cut, 0)} of {n} updates would remain)")
    return _flower_robust(updates, lambda results: aggregate_trimmed_avg(results, trim_fraction))


def combine(updates: Sequence[Adapter], weights: Sequence[float], robust: str = "none",
            trim_fraction: float = 0.2) -> dict[str, np.ndarray]:
    """The merge of fedavg and ffa: `weighted_mean` (robust = "none"), or the unweighted `coordinate_median`
    ("median") or `trimmed_mean` ("trimmed-mean", cutting floor(trim_fraction·n) values at each end)."""
    if robust == "none":
        return weighted_mean(updates, weights)
    if robust == "median":
        return coordinate_median(updates)
    if robust == "trimmed-mean":
        return trimmed_mean(updates, trim_fraction)
    raise ValueError(f"unknown robust aggregation {robust!r}")


def server_step(sent: Adapter, merged: Adapter, learning_rate: float) -> dict[str, np.ndarray]:
    """sent + learning_rate · (merged - sent) per key of `merged` (float64 arithmetic, cast back to merged's dtype):
    the server's step along the merchants' mean update."""
    out = {}
    for key, value in merged.items():
        value = np.asarray(value)
        start = np.asarray(sent[key], dtype=np.float64)
        out[key] = np.asarray(start + learning_rate * (value.astype(np.float64) - start)).astype(value.dtype)
    return out


def fixed_denominator_mean(updates: Sequence[Adapter], reference: Adapter, m: float) -> dict[str, np.ndarray]:
    """reference + (sum of the updates' differences to reference) / m, per key of the updates (float64 accumulation,
    each key cast back to the reference's dtype). Under merchant-level central DP m is the expected number of
    merchants, so one merchant moves the result by at most its clipped update / m."""
    keys = _check_same_keys(updates)
    if m <= 0:
        raise ValueError(f"need m > 0, got {m}")
    out = {}
    for key in keys:
        ref = np.asarray(reference[key])
        total = sum(np.asarray(u[key], dtype=np.float64) - ref.astype(np.float64) for u in updates)
        out[key] = np.asarray(ref.astype(np.float64) + total / m).astype(ref.dtype)
    return out


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Total bytes of the tensors' data (sum of nbytes), excluding any serialisation overhead."""
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


def numpy_of(record: ArrayRecord) -> Arrays:
    """The tensors of a Flower ArrayRecord as numpy arrays, by name."""
    return dict(zip(record.keys(), record.to_numpy_ndarrays(), strict=True))


def record_of(arrays: Mapping[str, np.ndarray], order: Iterable[str]) -> ArrayRecord:
    """An ArrayRecord of `arrays` in the key order `order`."""
    return ArrayRecord({k: Array(np.asarray(arrays[k])) for k in order})
