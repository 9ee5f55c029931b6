"""The non-neural baselines a report shows beside the model, fitted on one merchant's training examples only.

- next item: popularity (views visible to training) and a first-order Markov chain (counts of "previous view ->
  next view" in the training examples, popularity as the back-off that orders the rest);
- purchase intent and price: a logistic regression on the candidate's smoothed training purchase rate, the shopper's
  affinity to the candidate's category (share of their past views in it) and the log price level, so it also gives
  a price-response curve;
- churn: a logistic regression on recency/frequency features (sessions, views, mean gap, days since the last event,
  bought in the last session), the classic RFM model.

Every baseline sees exactly the examples the model trains on: the same split, nothing from valid or test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.tasks import CatalogueFacts, Example

L2 = 1e-4  # ridge penalty of the logistic baselines (on standardised features)
BACKOFF = 1e-6  # popularity's weight under the Markov counts: only orders items the chain has no count for


@dataclass
class Logistic:
    """A ridge-regularised logistic regression fitted by Newton's method on standardised features."""

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray  # intercept first

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, iterations: int = 50) -> Logistic | None:
        if len(y) == 0 or y.min() == y.max():
            return None  # one class only: nothing to fit
        mean, scale = x.mean(0), x.std(0)
        scale[scale == 0] = 1.0
        z = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])
        w = np.zeros(z.shape[1])
        penalty = L2 * np.eye(len(w))
        penalty[0, 0] = 0.0
        for _ in range(iterations):
            p = 1.0 / (1.0 + np.exp(-z @ w))
            gradient = z.T @ (p - y) / len(y) + penalty @ w
            hessian = (z * (p * (1 - p))[:, None]).T @ z / len(y) + penalty
            step = np.linalg.solve(hessian, gradient)
            w -= step
            if np.abs(step).max() < 1e-8:
                break
        return cls(mean, scale, w)

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = (x - self.mean) / self.scale
        return 1.0 / (1.0 + np.exp(-(self.weights[0] + z @ self.weights[1:])))


@dataclass
class Baselines:
    popularity: np.ndarray  # view counts per catalogue item visible to training
    transitions: dict[int, np.ndarray]  # previous item -> counts of the next viewed item
    item_rate: np.ndarray  # smoothed purchase rate per item among training intent examples
    category: np.ndarray  # category id per item
    intent: Logistic | None
    churn: Logistic | None

    def markov_scores(self, example: Example) -> np.ndarray:
        counts = self.transitions.get(example.seen[-1]) if example.seen else None
        backoff = BACKOFF * self.popularity / max(1.0, self.popularity.max())
        return backoff if counts is None else counts + backoff

    def intent_features(self, examples: list[Example], level: float | None = None) -> np.ndarray:
        rows = []
        for e in examples:
            seen = np.asarray(e.seen, dtype=np.int64)
            affinity = float((self.category[seen] == self.category[e.item]).mean()) if len(seen) else 0.0
            rows.append((np.log(self.item_rate[e.item]), affinity, np.log(e.level if level is None else level)))
        return np.array(rows, dtype=np.float64).reshape(-1, 3)

    def intent_probability(self, examples: list[Example], level: float | None = None) -> np.ndarray | None:
        if self.intent is None or not examples:
            return None
        return self.intent.predict(self.intent_features(examples, level))

    def churn_probability(self, examples: list[Example]) -> np.ndarray | None:
        if self.churn is None or not examples:
            return None
        return self.churn.predict(churn_features(examples))


def churn_features(examples: list[Example]) -> np.ndarray:
    x = np.array([e.features for e in examples], dtype=np.float64).reshape(-1, 5)
    return np.hstack([np.log1p(x[:, :4]), x[:, 4:]])


def fit_baselines(train: list[Example], facts: CatalogueFacts, popularity: np.ndarray) -> Baselines:
    num_items = len(facts.item_ids)
    categories = {c: i for i, c in enumerate(sorted(set(facts.category)))}
    category = np.array([categories[c] for c in facts.category], dtype=np.int64)
    transitions: dict[int, np.ndarray] = {}
    pairs = [e for e in train if e.task == "next-item"] or [e for e in train if e.task == "intent"]
    for e in pairs:
        if e.seen:
            target = e.label if e.task == "next-item" else e.item
            transitions.setdefault(e.seen[-1], np.zeros(num_items))[target] += 1.0
    intent = [e for e in train if e.task == "intent"]
    views, buys = np.zeros(num_items), np.zeros(num_items)
    for e in intent:
        views[e.item] += 1.0
        buys[e.item] += e.label
    prior = buys.sum() / max(1.0, views.sum())
    item_rate = (buys + 2.0 * prior + 1e-3) / (views + 2.0 + 2e-3)  # two pseudo-views at the overall rate
    baselines = Baselines(np.asarray(popularity, dtype=np.float64), transitions, item_rate, category, None, None)
    if intent:
        baselines.intent = Logistic.fit(baselines.intent_features(intent), np.array([e.label for e in intent], float))
    churn = [e for e in train if e.task == "churn"]
    if churn:
        baselines.churn = Logistic.fit(churn_features(churn), np.array([e.label for e in churn], dtype=np.float64))
    return baselines
