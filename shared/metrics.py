"""Metric functions: ROC AUC, log-loss, calibration, price elasticity, and full-catalogue ranking metrics with ties
counted against the model."""

from __future__ import annotations

import math

import numpy as np


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count one half). NaN if one class."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over tied groups
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))


def target_rank(scores: np.ndarray, target: int, exclude: tuple[int, ...] | list[int] = ()) -> int:
    """1-based rank of `target` among all items not excluded; any other item scoring >= it ranks ahead."""
    scores = np.asarray(scores, dtype=np.float64)
    ahead = scores >= scores[target]
    ahead[target] = False
    if len(exclude):
        ahead[np.asarray(exclude, dtype=np.int64)] = False
    return int(1 + np.count_nonzero(ahead))


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    if len(ranks) == 0:
        return {}
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    out["mrr"] = float((1.0 / ranks).mean())
    return out


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood of binary labels (probabilities clipped to [eps, 1 - eps])."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    if len(p) == 0:
        return float("nan")
    return float(-(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p)).mean())


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """Sum over equal-width probability bins of |observed rate - mean probability| x the bin's share of examples."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.mean() * abs(labels[members].mean() - p[members].mean())
    return float(total)


def binary_metrics(prefix: str, labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """AUC, log-loss and ECE of one scorer, keyed `<prefix>-auc`, `<prefix>-logloss`, `<prefix>-ece`."""
    return {f"{prefix}-auc": roc_auc(labels, probabilities), f"{prefix}-logloss": log_loss(labels, probabilities),
            f"{prefix}-ece": expected_calibration_error(labels, probabilities)}


def elasticity(levels: np.ndarray | tuple, mean_probability: np.ndarray) -> float:
    """Least-squares slope of log(mean purchase probability) on log(price level): the curve's price elasticity."""
    x = np.log(np.asarray(levels, dtype=np.float64))
    y = np.log(np.clip(np.asarray(mean_probability, dtype=np.float64), 1e-12, None))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def pool_by_count(merchants: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """The `prefix-*` metrics of several merchants pooled by each one's own `prefix-examples` count (summed), for a
    family only some merchants have (e.g. next-new: test targets the base never saw); {} if none has it."""
    counted = [m for m in merchants if m.get(f"{prefix}-examples", 0) > 0]
    keys = {k for m in counted for k in m if k.startswith(f"{prefix}-") and k != f"{prefix}-examples"}
    out = {key: sum(m[key] * m[f"{prefix}-examples"] for m in counted)
           / sum(m[f"{prefix}-examples"] for m in counted) for key in sorted(keys)}
    if counted:
        out[f"{prefix}-examples"] = float(sum(m[f"{prefix}-examples"] for m in counted))
    return out


def pool_metrics(merchants: list[dict[str, float]], weight: str = "num-examples") -> dict[str, float]:
    """Metrics of several merchants pooled into one, for replies whose metric families differ (a baseline, churn or
    next-new that only some merchants can compute).

    Each key is averaged over the merchants that report it with a value (NaN counts as no value, e.g. an AUC of a
    one-class test set), weighted by `weight` (test shoppers), in Flower's arithmetic (the sum of value x weight /
    total weight, in the order given): where every merchant reports every key, this equals Flower's
    `aggregate_metricrecords` bit for bit. The next-new family is then pooled by its own count (`pool_by_count`).
    `weight` itself is not in the result.
    """
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m in merchants for k in m if k != weight):
        pairs = [(m[key], m[weight]) for m in merchants if key in m and not math.isnan(m[key])]
        if pairs:
            total = sum(w for _, w in pairs)
            out[key] = sum(value * (w / total) for value, w in pairs)
    out.update(pool_by_count(merchants, "next-new"))  # only some merchants have new targets
    return out
