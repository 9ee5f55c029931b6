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


def ranking_values(ranks: np.ndarray, ks: tuple[int, ...] = (10,)) -> dict[str, np.ndarray]:
    """Per-example values whose means are the ranking metrics: `hr@K` (1 if rank <= K), `ndcg@K` (1 / log2(rank + 1)
    within the top K, else 0) and `mrr` (1 / rank)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        hit = ranks <= k
        out[f"hr@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0)
    out["mrr"] = 1.0 / ranks
    return out


def ranking_metrics(ranks: np.ndarray, ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    if len(ranks) == 0:
        return {}
    return {name: float(values.mean()) for name, values in ranking_values(ranks, ks).items()}


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


def decide(difference: float, standard_error: float, *, higher_is_better: bool = True, z: float = 2.0) -> Comparison:
    """The one verdict rule: A beats B when A - B is better by more than `z` standard errors of the difference, is
    beaten by it when worse by more than that, and is level with it in between."""
    if math.isnan(standard_error) or math.isnan(difference):
        return Comparison("vs", difference, standard_error)
    gain = difference if higher_is_better else -difference
    verdict = "beats" if gain > z * standard_error else "is beaten by" if gain < -z * standard_error else "level with"
    return Comparison(verdict, difference, standard_error)


def compare(a: float, se_a: float, b: float, se_b: float, *, higher_is_better: bool = True,
            z: float = 2.0) -> Comparison:
    """`decide` on A - B with the unpaired standard error of the difference, sqrt(se_a² + se_b²).

    This unpaired form ignores that both scorers are evaluated on the same test examples (only aggregates are kept);
    such paired differences usually vary less, so the verdict errs towards "level with" (see `shared.paired` for the
    paired form, from per-example outputs).
    """
    return decide(a - b, math.hypot(se_a, se_b), higher_is_better=higher_is_better, z=z)


# Paired comparisons from per-example outputs. Two scorers evaluated on the same test examples are compared through
# the per-example differences: a bootstrap over test shoppers (a shopper's examples are drawn together) gives the
# standard error of the difference of any metric, AUC included.

BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_SEED = 20_261_202
_CHUNK = 2_000_000  # replicate x example cells per array at a time: bounds the bootstrap's memory


@dataclass(frozen=True)
class Paired:
    """Scorer A against scorer B on the same test examples: both figures, the difference A - B, its bootstrap
    standard error over test shoppers and, for a mean of per-example values, the analytic paired standard error."""

    a: float
    b: float
    difference: float
    standard_error: float
    shoppers: int
    examples: int
    analytic_se: float = math.nan

    def to_json(self) -> dict[str, float | int]:
        out = {"a": self.a, "b": self.b, "difference": self.difference, "se": self.standard_error,
               "shoppers": self.shoppers, "examples": self.examples}
        if not math.isnan(self.analytic_se):
            out["se-analytic"] = self.analytic_se
        return out


def shopper_draws(shoppers: np.ndarray, replicates: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts (replicates, S), shopper index of each example): each replicate draws the S distinct test shoppers with
    replacement; an example then counts as often as its shopper was drawn."""
    _, index = np.unique(np.asarray(shoppers), return_inverse=True)
    count = int(index.max()) + 1 if len(index) else 0
    draws = np.random.default_rng(seed).integers(0, count, size=(replicates, count))
    offsets = (np.arange(replicates) * count)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=replicates * count).reshape(replicates, count)
    return counts.astype(np.float64), index


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row of example weights (R, n), by the rank formula: the weight of the negatives each
    positive outscores (ties count one half), summed over positives, over W+ x W-. Ones give `roc_auc`."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="mergesort")
    ordered = np.asarray(scores, dtype=np.float64)[order]
    positive = labels[order]
    w = np.atleast_2d(weights)[:, order]
    starts = np.flatnonzero(np.r_[True, np.diff(ordered) != 0])  # first position of each tie group
    group = np.cumsum(np.r_[True, np.diff(ordered) != 0]) - 1
    ends = np.r_[starts[1:], len(ordered)]
    negatives = np.where(positive, 0.0, w)
    below = np.hstack([np.zeros((len(w), 1)), np.cumsum(negatives, axis=1)])  # below[:, j]: weight at positions < j
    credit = below[:, starts[group]] + 0.5 * (below[:, ends[group]] - below[:, starts[group]])
    positives_weight = (w * positive).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * positive * credit).sum(1) / (positives_weight * negatives.sum(1))


def _replicate_chunks(replicates: int, examples: int) -> list[int]:
    size = max(1, _CHUNK // max(1, examples))
    return [min(size, replicates - start) for start in range(0, replicates, size)]


def paired_auc(labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, shoppers: np.ndarray, *,
               replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> Paired:
    """AUC of A and of B over all the examples, their difference and its bootstrap SE over test shoppers."""
    a, b = roc_auc(labels, scores_a), roc_auc(labels, scores_b)
    counts, index = shopper_draws(shoppers, replicates, seed)
    differences = []
    at = 0
    for size in _replicate_chunks(replicates, len(labels)):
        weights = counts[at:at + size][:, index]
        differences.append(weighted_auc(labels, scores_a, weights) - weighted_auc(labels, scores_b, weights))
        at += size
    spread = np.concatenate(differences)
    spread = spread[np.isfinite(spread)]  # a replicate that drew one class only has no AUC
    return Paired(a, b, a - b, float(spread.std(ddof=1)) if len(spread) > 1 else math.nan,
                  counts.shape[1], len(labels))


def paired_mean(values_a: np.ndarray, values_b: np.ndarray, shoppers: np.ndarray, *,
                replicates: int = BOOTSTRAP_REPLICATES, seed: int = BOOTSTRAP_SEED) -> Paired:
    """Means of per-example values (HR@K hits, NDCG@K gains, reciprocal ranks) of A and of B, their difference, its
    bootstrap SE over test shoppers, and the analytic paired SE sd(a_i - b_i) / sqrt(n) (examples independent)."""
    values_a, values_b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    differences = values_a - values_b
    n = len(differences)
    counts, index = shopper_draws(shoppers, replicates, seed)
    spread = []
    at = 0
    for size in _replicate_chunks(replicates, n):
        weights = counts[at:at + size][:, index]
        spread.append(weights @ differences / weights.sum(1))
        at += size
    analytic = float(differences.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return Paired(float(values_a.mean()), float(values_b.mean()), float(differences.mean()),
                  float(np.concatenate(spread).std(ddof=1)) if replicates > 1 else math.nan,
                  counts.shape[1], n, analytic)


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
