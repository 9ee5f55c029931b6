"""Canary records for the one-run privacy audit (Steinke, Nasr and Jagielski, 2023).

Each canary is a shopper of its own with one next-item example: a random sequence of price- and rating-band tokens
as its history (a pattern no real history has, so nothing else in training competes with it) and a target item that
no other canary shares (while the catalogue has enough items). Every canary is assigned to a merchant and
is inserted into that merchant's training data with probability 1/2; the auditor knows the coin flips, the model
does not. The bits and canaries depend only on the seed, so `fedshop audit` rebuilds them from the run's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.tasks import CatalogueFacts, Example

CANARY_PREFIX = "canary-"


@dataclass(frozen=True)
class Canary:
    index: int
    merchant_id: str
    included: bool
    example: Example


def make_canaries(count: int, facts: CatalogueFacts, merchant_ids: list[str], *, seed: int,
                  history_length: int) -> list[Canary]:
    rng = np.random.default_rng([seed, 0xCA7A])
    n_items = len(facts.item_ids)
    targets = np.concatenate([rng.permutation(n_items) for _ in range(count // n_items + 1)])[:count]
    included = rng.random(count) < 0.5
    canaries = []
    bands = sorted(set(facts.price_band) | set(facts.rating_band))
    for i in range(count):
        text = " ".join(rng.choice(bands, size=2 * history_length))
        example = Example(task="next-item", source=f"next: {text}", target=facts.item_text(targets[i]), split="train",
                          user_id=f"{CANARY_PREFIX}{i}", label=int(targets[i]))
        canaries.append(Canary(i, merchant_ids[i % len(merchant_ids)], bool(included[i]), example))
    return canaries
