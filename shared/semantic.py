"""Semantic item ids (`item-ids = semantic`): an item written as a short path of codes from public facts.

An id is four tokens, `<category> <co-view cluster> <price band> <slot>`, e.g. "c3 k1 p7 u0":
- category (c*) and price band (p*): the catalogue's public facts;
- co-view cluster k0..k{K-1} (K = `semantic-clusters`), within the category: k-means with a fixed seed over the
  items' co-view profiles in the public split (which items shoppers viewed right before or after them), so items
  that are viewed in the same company share a prefix;
- slot u*: the item's place among the items with the same first three codes (most publicly viewed first, then by
  id), which makes every id unique.

`fedshop pretrain` builds the ids of every catalogue item from the public split only and saves them with the base
(`semantic-ids.json`); every merchant, the server and `fedshop predict` read that file, so all agree. An item the
base has never heard of (a catalogue that grew after pretraining) gets its id from its own public facts when it
first appears: its category and price band as they are, the cluster most common among the base's items of the same
category and price band (else of the category, else k0), and the first free slot. Every code of such an id is a
token the base has learned, except a slot beyond the largest group the base was pretrained on: the base reserves
SLOT_RESERVE slots beyond that, untrained until a base is pretrained again.

Decoding is constrained to valid items: at each of the four steps the model's distribution is renormalised over the
codes that continue some item's id (`shared.modeling.ItemScorer`), so every item gets an exact probability and the
probabilities of all catalogue items sum to one. An item the base never saw is scored by its id's prefix (the slot
step gives it the uniform share of its group), since its slot token was trained only on other items.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import UserError
from shared.tasks import CatalogueFacts

SEMANTIC_FILE = "semantic-ids.json"
SLOT_RESERVE = 4  # slots the base keeps beyond its largest group, for items added later
EMBED_DIMS = 16  # co-view profiles are reduced to this many SVD dimensions before k-means
KMEANS_ITERATIONS = 25


@dataclass(frozen=True)
class SemanticIds:
    clusters: int
    slots: int
    categories: tuple[str, ...]  # the category tokens the base knows
    price_bands: tuple[str, ...]  # the price band tokens the base knows
    codes: dict[str, tuple[str, str, str, str]]  # item id -> (category, cluster, price band, slot)

    def code_tokens(self) -> list[str]:
        """The cluster and slot tokens (category and price band tokens are the catalogue's own)."""
        return [f"k{k}" for k in range(self.clusters)] + [f"u{s}" for s in range(self.slots)]

    def texts(self, item_ids: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(" ".join(self.codes[item]) for item in item_ids)

    def save(self, directory: str | Path) -> None:
        payload = {"format": "fedshop-semantic-ids/1", "clusters": self.clusters, "slots": self.slots,
                   "categories": list(self.categories), "price-bands": list(self.price_bands),
                   "codes": {item: " ".join(code) for item, code in self.codes.items()}}
        (Path(directory) / SEMANTIC_FILE).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")

    def extend(self, item_ids: tuple[str, ...], category: tuple[str, ...], price_band: tuple[str, ...]
               ) -> SemanticIds:
        """These ids plus one for every item of the catalogue they lack (see the module doc), in catalogue order."""
        missing = [i for i, item in enumerate(item_ids) if item not in self.codes]
        if not missing:
            return self
        known_categories, known_bands = set(self.categories), set(self.price_bands)
        by_group: dict[tuple[str, str], Counter] = {}
        by_category: dict[str, Counter] = {}
        used: dict[tuple[str, str, str], set[str]] = {}
        for c, k, p, u in self.codes.values():
            by_group.setdefault((c, p), Counter())[k] += 1
            by_category.setdefault(c, Counter())[k] += 1
            used.setdefault((c, k, p), set()).add(u)
        codes = dict(self.codes)
        for i in missing:
            item, c, p = item_ids[i], category[i], price_band[i]
            if c not in known_categories or p not in known_bands:
                unknown = c if c not in known_categories else p
                raise UserError(f"item {item!r} has {unknown!r}, which the base's semantic ids do not know (it knows "
                                f"{len(self.categories)} categories and {len(self.price_bands)} price bands): "
                                "pretrain a new base on this catalogue (`fedshop pretrain`)")
            votes = by_group.get((c, p)) or by_category.get(c) or Counter({"k0": 1})
            k = min(votes, key=lambda key: (-votes[key], int(key[1:])))
            taken = used.setdefault((c, k, p), set())
            free = next((s for s in range(self.slots) if f"u{s}" not in taken), None)
            if free is None:
                raise UserError(f"item {item!r}: the group {c} {k} {p} already fills all {self.slots} slots of the "
                                "base's semantic ids; pretrain a new base on this catalogue (`fedshop pretrain`)")
            taken.add(f"u{free}")
            codes[item] = (c, k, p, f"u{free}")
        return SemanticIds(self.clusters, self.slots, self.categories, self.price_bands, codes)


def load_semantic_ids(directory: str | Path) -> SemanticIds:
    path = Path(directory) / SEMANTIC_FILE
    if not path.is_file():
        raise UserError(f"{path} does not exist: the base in {directory} writes items as one token each (it was "
                        "pretrained with item-ids = token); pretrain a base with item-ids = semantic")
    payload = json.loads(path.read_text(encoding="utf-8"))
    return SemanticIds(clusters=int(payload["clusters"]), slots=int(payload["slots"]),
                       categories=tuple(payload["categories"]), price_bands=tuple(payload["price-bands"]),
                       codes={item: tuple(code.split()) for item, code in payload["codes"].items()})


def build_semantic_ids(facts: CatalogueFacts, price_band_tokens: list[str], views: list[list[int]], clusters: int,
                       seed: int) -> SemanticIds:
    """Ids for every catalogue item from public facts (with each item's public views) and the public split's view
    sequences.

    `views` holds each public shopper's viewed items (catalogue indices) in time order; items next to each other in
    one list are co-viewed. Items nobody co-viewed get their cluster and slot as an item new to the base would.
    """
    from scipy import sparse
    from scipy.sparse.linalg import svds

    item_ids, category, price_band, public_views = facts.item_ids, facts.category, facts.price_band, facts.public_views
    n = len(item_ids)
    pairs = np.array([(a, b) for sequence in views for a, b in zip(sequence[:-1], sequence[1:], strict=False)
                      if a != b], dtype=np.int64).reshape(-1, 2)
    rows, cols = np.r_[pairs[:, 0], pairs[:, 1]], np.r_[pairs[:, 1], pairs[:, 0]]
    cooc = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    cooc.sum_duplicates()
    cooc.data = np.log1p(cooc.data)
    norms = np.sqrt(np.asarray(cooc.multiply(cooc).sum(1)).ravel())
    profile = sparse.diags(np.divide(1.0, norms, out=np.zeros(n), where=norms > 0)) @ cooc
    dims = min(EMBED_DIMS, n - 1)
    if dims < 1 or not profile.nnz:
        embedding = np.zeros((n, 1))
    else:  # a fixed start vector: svds is otherwise random
        u, s, _ = svds(profile, k=dims, v0=np.full(n, 1.0 / np.sqrt(n)))
        embedding = u * s
    categories = tuple(sorted(set(category), key=_token_order))
    rng = np.random.default_rng([seed, 0x5E3A])
    groups: dict[tuple[str, str, str], list[int]] = {}
    for c in categories:
        members = np.array([i for i in range(n) if category[i] == c and norms[i] > 0], dtype=np.int64)
        for i, label in zip(members.tolist(), kmeans(embedding[members], clusters, rng).tolist(), strict=True):
            groups.setdefault((c, f"k{label}", price_band[i]), []).append(i)
    codes = {item_ids[i]: (*key, f"u{slot}") for key, members in groups.items()
             for slot, i in enumerate(sorted(members, key=lambda j: (-public_views[j], j)))}
    unbounded = SemanticIds(clusters, n, categories, tuple(price_band_tokens), codes)
    full = unbounded.extend(item_ids, category, price_band)
    largest = max(Counter(code[:3] for code in full.codes.values()).values(), default=1)
    return SemanticIds(clusters, largest + SLOT_RESERVE, categories, tuple(price_band_tokens),
                       {item: full.codes[item] for item in item_ids})


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Cluster labels 0..k-1 of `points` (k-means++ start, Lloyd iterations; labels renumbered by first member)."""
    n = len(points)
    if n <= k:
        return np.arange(n)
    centres = [points[int(rng.integers(n))]]
    for _ in range(1, k):
        distance = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        total = distance.sum()
        pick = int(rng.choice(n, p=distance / total)) if total > 0 else int(rng.integers(n))
        centres.append(points[pick])
    centre = np.array(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(KMEANS_ITERATIONS):
        labels = ((points[:, None, :] - centre[None]) ** 2).sum(2).argmin(1)
        for j in range(k):
            if (labels == j).any():
                centre[j] = points[labels == j].mean(0)
    order = {}
    for label in labels.tolist():  # relabel by first appearance: the same partition always gets the same codes
        order.setdefault(label, len(order))
    return np.array([order[label] for label in labels.tolist()], dtype=np.int64)


def _token_order(token: str):
    return (0, int(token[1:]), token) if token[1:].isdigit() else (1, 0, token)
