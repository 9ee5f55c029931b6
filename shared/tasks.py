"""Behaviour tasks as text-to-text examples, with a leave-last-out temporal split per shopper.

For each shopper, views v_1..v_n in time order. Every view v_k with k >= 2 makes one example per task whose input is
built only from v_1..v_{k-1}: v_n goes to test, v_{n-1} to valid, the rest to train. Nothing after the target
event enters its input, and the next-item targets are items the shopper has not seen before (the candidate set
excludes seen items).

- intent:    "intent: <history> cand <item> <category> <price band> <rating band>" -> "yes" | "no" (bought after
             viewing)
- next-item: "next: <history>" -> "<item>"
where <history> lists the most recent viewed items, oldest first, each followed by its (public) category.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shared.events import EventLog

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class CatalogueFacts:
    """Public facts about the catalogue: the item vocabulary, each item's category, price band and rating band."""

    item_ids: tuple[str, ...]
    category: tuple[str, ...]
    price_band: tuple[str, ...]
    rating_band: tuple[str, ...]

    def index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}


@dataclass
class Example:
    task: str
    source: str
    target: str
    split: str
    user_id: str
    label: int  # intent: 1 if bought; next-item: catalogue index of the target item
    seen: tuple[int, ...] = field(default_factory=tuple)  # next-item: items the shopper saw before the target
    truth: float = float("nan")  # intent: true P(purchase); next-item: the Bayes oracle's rank of the target


def build_examples(log: EventLog, facts: CatalogueFacts, *, tasks: list[str], history_length: int,
                   truth_purchase_prob: np.ndarray | None = None,
                   truth_next_rank: np.ndarray | None = None) -> list[Example]:
    """Examples of one event log (one merchant, or the public split). Rows must be time-ordered per shopper."""
    index = facts.index()
    by_user: dict[str, list[int]] = {}
    for row, user in enumerate(log.user_id):
        by_user.setdefault(user, []).append(row)
    examples: list[Example] = []
    for user in sorted(by_user):
        rows = sorted(by_user[user], key=lambda r: log.timestamp[r])
        bought = {log.item_id[r] for r in rows if log.event[r] == "purchase"}
        views = [r for r in rows if log.event[r] == "view"]
        first_view: dict[str, int] = {}
        for r in views:
            first_view.setdefault(log.item_id[r], r)
        views = [r for r in views if first_view[log.item_id[r]] == r]  # a re-view is not a new candidate
        n = len(views)
        for k in range(1, n):
            split = "test" if k == n - 1 else "valid" if k == n - 2 else "train"
            row = views[k]
            item = log.item_id[row]
            history = [log.item_id[r] for r in views[max(0, k - history_length):k]]
            history_text = " ".join(f"{h} {facts.category[index[h]]}" for h in history)
            if "intent" in tasks:
                examples.append(Example(
                    task="intent",
                    source=f"intent: {history_text} cand {item} {facts.category[index[item]]} "
                           f"{facts.price_band[index[item]]} {facts.rating_band[index[item]]}",
                    target="yes" if item in bought else "no", split=split, user_id=user,
                    label=int(item in bought),
                    truth=float(truth_purchase_prob[row]) if truth_purchase_prob is not None else float("nan"),
                ))
            if "next-item" in tasks:
                examples.append(Example(
                    task="next-item", source=f"next: {history_text}", target=item, split=split, user_id=user,
                    label=index[item], seen=tuple(index[log.item_id[r]] for r in views[:k]),
                    truth=float(truth_next_rank[row]) if truth_next_rank is not None else float("nan"),
                ))
    return examples


def by_split(examples: list[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for example in examples:
        out[example.split].append(example)
    return out

