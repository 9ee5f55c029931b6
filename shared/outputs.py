"""Per-example outputs of an evaluation, and paired comparisons of two scorers on the same test examples.

`shared.modeling.evaluate_with_outputs` fills an `Outputs` beside the metrics from the same scores; the reference
runs pool every merchant's outputs and compare the federated model with each other scorer example by example
(`paired_comparison`), which a bootstrap over test shoppers turns into a standard error of the difference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from shared.metrics import BOOTSTRAP_REPLICATES, BOOTSTRAP_SEED, Paired, paired_auc, paired_mean, ranking_values

TASKS = ("intent", "next", "churn")  # the key prefixes of the task families with per-example outputs
PAIRED_METRICS = {"intent": ("intent-auc",), "next": ("next-hr@10", "next-ndcg@10", "next-mrr"),
                  "churn": ("churn-auc",)}


@dataclass
class Outputs:
    """Per-example outputs of one evaluation, for each task in the order of its examples.

    `shoppers[task]` and `labels[task]` per task ("intent", "next", "churn"; next: the target's catalogue index);
    `probabilities[scorer]` (p(yes) of "intent", "churn" and the baselines "intent-baseline", "churn-baseline") and
    `ranks[scorer]` (the target's 1-based rank for "next" and the baselines "next-popularity", "next-markov"); a
    scorer's task is the first word of its key.
    """

    shoppers: dict[str, np.ndarray] = field(default_factory=dict)
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    ranks: dict[str, np.ndarray] = field(default_factory=dict)

    def scorers(self) -> list[str]:
        return sorted({*self.probabilities, *self.ranks})

    def select(self, scorers: Mapping[str, str]) -> Outputs:
        """These outputs with the scorer `scorers[task]` in the model's place for each task given (a baseline read
        as if it were the model), and only those tasks."""
        return Outputs({t: self.shoppers[t] for t in scorers}, {t: self.labels[t] for t in scorers},
                       {t: self.probabilities[s] for t, s in scorers.items() if s in self.probabilities},
                       {t: self.ranks[s] for t, s in scorers.items() if s in self.ranks})


def pool(outputs: Mapping[str, Outputs]) -> Outputs:
    """Every merchant's outputs concatenated in the mapping's order, shopper ids qualified as `merchant/shopper`. A
    scorer some merchant lacks (a baseline with one class in its training labels) is left out."""
    parts = list(outputs.items())

    def joined(attribute: str) -> dict[str, np.ndarray]:
        keys = set.intersection(*(set(getattr(o, attribute)) for _, o in parts)) if parts else set()
        return {k: np.concatenate([getattr(o, attribute)[k] for _, o in parts]) for k in sorted(keys)}

    pooled = Outputs(labels=joined("labels"), probabilities=joined("probabilities"), ranks=joined("ranks"))
    for task in pooled.labels:
        pooled.shoppers[task] = np.concatenate([np.char.add(f"{merchant}/", o.shoppers[task].astype(str))
                                                for merchant, o in parts])
    return pooled


def paired_comparison(a: Outputs, b: Outputs, *, replicates: int = BOOTSTRAP_REPLICATES,
                      seed: int = BOOTSTRAP_SEED) -> dict[str, Paired]:
    """A against B on every task both scored, keyed by metric (`intent-auc`, `next-hr@10`, `next-ndcg@10`,
    `next-mrr`, `churn-auc`): each figure over all the pooled test examples, the difference A - B and its bootstrap
    standard error over test shoppers. Both must hold the same examples in the same order."""
    out: dict[str, Paired] = {}
    for task in TASKS:
        scored = (task in a.probabilities and task in b.probabilities) or (task in a.ranks and task in b.ranks)
        if not scored or not len(a.labels[task]):
            continue
        if not (np.array_equal(a.shoppers[task], b.shoppers[task]) and np.array_equal(a.labels[task], b.labels[task])):
            raise ValueError(f"{task}: the two scorers were not evaluated on the same examples")
        shoppers = a.shoppers[task]
        if task in a.probabilities:
            out[f"{task}-auc"] = paired_auc(a.labels[task], a.probabilities[task], b.probabilities[task], shoppers,
                                            replicates=replicates, seed=seed)
            continue
        values_a, values_b = ranking_values(a.ranks[task]), ranking_values(b.ranks[task])
        for key in PAIRED_METRICS[task]:
            name = key.split("-", 1)[1]
            out[key] = paired_mean(values_a[name], values_b[name], shoppers, replicates=replicates, seed=seed)
    return out


BASELINES = {"intent-baseline": "intent", "next-markov": "next", "next-popularity": "next",
             "churn-baseline": "churn"}  # baseline scorer -> its task


def paired_results(federated: Outputs, others: Mapping[str, Outputs], *, replicates: int = BOOTSTRAP_REPLICATES,
                   seed: int = BOOTSTRAP_SEED) -> dict[str, dict[str, dict[str, float | int]]]:
    """{"federated vs <name>": {metric: Paired.to_json()}} against every other scorer of `others` (round 0, the
    reference runs) and every baseline `federated` carries (on its own task), ready for `references.json`."""
    out = {f"federated vs {name}": paired_comparison(federated, other, replicates=replicates, seed=seed)
           for name, other in others.items()}
    for baseline, task in BASELINES.items():
        if baseline in federated.scorers():
            out[f"federated vs {baseline}"] = paired_comparison(federated, federated.select({task: baseline}),
                                                                replicates=replicates, seed=seed)
    return {name: {key: p.to_json() for key, p in metrics.items()} for name, metrics in out.items() if metrics}
