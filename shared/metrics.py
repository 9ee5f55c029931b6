"""Metric functions: ROC AUC, log-loss, calibration, price elasticity, and full-catalogue ranking metrics with ties
counted against the model; analytic standard errors of these figures and the comparison of two scorers."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

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


# Standard errors from aggregates. The run directory keeps per-merchant metrics and counts, not per-example scores,
# so each figure's standard error is computed analytically from its value and the pooled counts behind it.


def binomial_se(proportion: float, examples: float) -> float:
    """Standard error of a mean of `examples` independent values in [0, 1] with mean `proportion`: exact for 0/1
    hits (HR@K), and an upper bound for any other [0, 1] value (NDCG, MRR, a curve error), since such a value's
    variance is at most mean x (1 - mean) (Bhatia-Davis). NaN without examples."""
    if not examples > 0 or not 0.0 <= proportion <= 1.0:
        return math.nan
    return math.sqrt(proportion * (1.0 - proportion) / examples)


def hanley_mcneil_se(auc: float, positives: float, negatives: float) -> float:
    """Standard error of a ROC AUC from the AUC and the class counts (Hanley & McNeil 1982, Radiology 143:29)."""
    if not (positives > 0 and negatives > 0 and 0.0 <= auc <= 1.0):
        return math.nan
    q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
    variance = (auc * (1.0 - auc) + (positives - 1.0) * (q1 - auc * auc)
                + (negatives - 1.0) * (q2 - auc * auc)) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


RANKING_METRIC = re.compile(r"-(hr|ndcg)@\d+$|-mrr$")


def _family(key: str) -> str:
    """The example family whose counts stand behind a metric key: next-new, next, intent, churn (price: intent)."""
    if key.startswith("next-new-"):
        return "next-new"
    family = key.split("-", 1)[0]
    return "intent" if family == "price" else family


def pooled_counts(merchants: Iterable[Mapping[str, float | None]], family: str) -> tuple[float, float]:
    """(examples, positives) of a family summed over merchants, positives from each one's `<family>-positive-rate`
    (NaN when no merchant reports a rate)."""
    examples, positives, rates = 0.0, 0.0, False
    for metrics in merchants:
        count = metrics.get(f"{family}-examples") or 0.0
        rate = metrics.get(f"{family}-positive-rate")
        examples += count
        if rate is not None and count:
            positives, rates = positives + rate * count, True
    return examples, positives if rates else math.nan


def standard_errors(metrics: Mapping[str, float | None],
                    merchants: Iterable[Mapping[str, float | None]]) -> dict[str, float]:
    """`<key>-se` (one standard error) for every AUC, ranking (HR@K, NDCG@K, MRR) and price-curve MAE in `metrics`.

    `metrics` are means over merchants weighted by test shoppers, and `merchants` the per-merchant records behind
    them. Approximation: each figure is treated as if computed once on all merchants' test examples pooled, with the
    pooled counts (for HR, whose per-merchant means are weighted by about their own counts, this is slightly
    conservative). AUC: Hanley-McNeil from the pooled positives and negatives. HR@K: binomial, exact. NDCG, MRR and
    the curve MAE (a per-view mean absolute error in [0, 1]): the binomial form, a conservative upper bound.
    """
    merchants = list(merchants)
    counts = {family: pooled_counts(merchants, family) for family in ("intent", "next", "next-new", "churn")}
    out = {}
    for key, value in metrics.items():
        if value is None or not isinstance(value, int | float):
            continue
        examples, positives = counts.get(_family(key), (0.0, math.nan))
        if key.endswith("-auc"):
            out[f"{key}-se"] = hanley_mcneil_se(value, positives, examples - positives)
        elif RANKING_METRIC.search(key) or key.endswith("-curve-mae"):
            out[f"{key}-se"] = binomial_se(value, examples)
    return out


@dataclass(frozen=True)
class Comparison:
    """Scorer A against scorer B on one metric: the verdict, the difference A - B and its standard error."""

    verdict: str  # "beats", "level with", "is beaten by"; "vs" when the standard error is unknown
    difference: float
    standard_error: float


def compare(a: float, se_a: float, b: float, se_b: float, *, higher_is_better: bool = True,
            z: float = 2.0) -> Comparison:
    """A beats B when A - B is better by more than `z` standard errors of the difference, sqrt(se_a² + se_b²).

    This unpaired form ignores that both scorers are evaluated on the same test examples (only aggregates are kept);
    such paired differences usually vary less, so the verdict errs towards "level with".
    """
    difference, standard_error = a - b, math.hypot(se_a, se_b)
    if math.isnan(standard_error) or math.isnan(difference):
        return Comparison("vs", difference, standard_error)
    gain = difference if higher_is_better else -difference
    verdict = "beats" if gain > z * standard_error else "is beaten by" if gain < -z * standard_error else "level with"
    return Comparison(verdict, difference, standard_error)
