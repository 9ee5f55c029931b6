"""Metric functions: ROC AUC and full-catalogue ranking metrics with ties counted against the model."""

from __future__ import annotations

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
