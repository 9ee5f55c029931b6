"""Merchant assignment of loaded events (`partition`): a natural column, or a partitioner over shoppers.

First a `public-fraction` of shoppers (seeded) becomes the platform's public split (merchant "public"), used only for
pretraining; when a natural column has the value "public" (a canonical file written by `fedshop data synth`), those
events are the public split instead. The rest goes to merchants m0..m{N-1}:

- `natural:<column>`: one merchant per value of the column (merchant, shop, seller, brand ...), the N with the most
  shoppers, m0 the largest (the original names are kept in `PartitionResult.names`). Fewer values than
  `num-merchants` is refused; events at smaller merchants and events with no value are dropped and counted.
- `iid`, `dirichlet` (over the shoppers' main category, concentration `partition-alpha`), `size-skew` (merchant
  sizes drawn from Dirichlet(`partition-alpha`), smaller = more skewed): flwr-datasets' IidPartitioner,
  DirichletPartitioner and SizePartitioner over an in-memory `datasets.Dataset` with one row per unit.

The unit is the shopper (each shopper at exactly one merchant), or, with `shoppers-at-several-merchants = true`, the
(shopper, category) pair, so a shopper's events in different categories may land at different merchants, as in a
marketplace. Under the natural partition without that option each shopper keeps only the events at their main
merchant (the others are dropped and counted). Same seed, same data -> same partition.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from shared.events import DataError
from shared.loaders import RawEvents
from shared.synthetic import PUBLIC_MERCHANT

PUBLIC, DROPPED = -1, -2
PARTITIONERS = ("iid", "dirichlet", "size-skew")
MIN_DIRICHLET_UNITS = 10  # flwr-datasets' default minimum partition size, lowered for small data


@dataclass
class PartitionOptions:
    partition: str = "dirichlet"
    num_merchants: int = 4
    alpha: float = 0.5
    several_merchants: bool = False
    public_fraction: float = 0.2
    seed: int = 7


@dataclass
class PartitionResult:
    merchant: np.ndarray  # per event: PUBLIC, DROPPED or a merchant index k (merchant id m{k})
    names: dict[str, str]  # "m{k}" -> what it is (the natural column's value, or the partitioner)
    dropped: Counter = field(default_factory=Counter)  # reason -> events dropped
    public_source: str = ""


def parse_partition(text: str) -> tuple[str, str]:
    """("natural", column) or (partitioner, "")."""
    if text.startswith("natural:") and text[len("natural:"):].strip():
        return "natural", text[len("natural:"):].strip()
    if text in PARTITIONERS:
        return text, ""
    raise DataError(f"partition {text!r}: expected natural:<column> (e.g. natural:brand) or one of "
                    f"{', '.join(PARTITIONERS)}")


def assign_merchants(raw: RawEvents, options: PartitionOptions) -> PartitionResult:
    kind, column = parse_partition(options.partition)
    merchant = np.full(len(raw), DROPPED, dtype=np.int32)
    dropped: Counter = Counter()
    group_names = raw.group_names.tolist()
    if kind == "natural" and PUBLIC_MERCHANT in group_names:
        public = raw.group == group_names.index(PUBLIC_MERCHANT)
        public_source = f"events whose {column} is {PUBLIC_MERCHANT!r}"
    else:
        shoppers = np.unique(raw.user)
        rng = np.random.default_rng([options.seed, 0x9B11C])
        chosen = shoppers[rng.random(len(shoppers)) < options.public_fraction]
        public = np.isin(raw.user, chosen)
        public_source = f"{len(chosen)} shoppers drawn at random (public-fraction {options.public_fraction:g})"
    merchant[public] = PUBLIC
    private = np.flatnonzero(~public)
    if kind == "natural":
        names = _natural(raw, private, merchant, dropped, column, options)
    else:
        names = _partitioner(raw, private, merchant, kind, options)
    return PartitionResult(merchant, names, dropped, public_source)


def _natural(raw: RawEvents, private: np.ndarray, merchant: np.ndarray, dropped: Counter, column: str,
             options: PartitionOptions) -> dict[str, str]:
    group = raw.group[private]
    empty = raw.group_names.tolist().index("")
    has_value = group != empty
    if (~has_value).any():
        dropped[f"no value in column {column}"] += int((~has_value).sum())
    # merchants ranked by distinct shoppers, then name (deterministic)
    pairs = np.unique(np.stack([group[has_value], raw.user[private][has_value]]), axis=1)
    values, shoppers = np.unique(pairs[0], return_counts=True)
    if len(values) < options.num_merchants:
        raise DataError(f"partition natural:{column} finds {len(values)} merchant(s) (values of {column}), but "
                        f"num-merchants = {options.num_merchants}; set num-merchants = {len(values)} (or fewer: the "
                        "largest are kept)")
    order = sorted(range(len(values)), key=lambda k: (-shoppers[k], str(raw.group_names[values[k]])))
    kept = values[order[:options.num_merchants]]
    index = np.full(len(raw.group_names), DROPPED, dtype=np.int32)
    index[kept] = np.arange(len(kept), dtype=np.int32)
    assigned = index[group]
    smaller = has_value & (assigned == DROPPED)
    if smaller.any():
        dropped[f"at merchants beyond the {options.num_merchants} largest values of {column}"] += int(smaller.sum())
    if not options.several_merchants:
        main = _main_merchant(raw.user[private], assigned)
        elsewhere = (assigned != DROPPED) & (assigned != main)
        if elsewhere.any():
            dropped["a shopper's events at merchants other than their main one (disjoint shoppers)"] += int(
                elsewhere.sum())
        assigned = np.where(elsewhere, DROPPED, assigned)
    merchant[private] = assigned
    return {f"m{k}": f"{column} = {raw.group_names[v]}" for k, v in enumerate(kept)}


def _main_merchant(users: np.ndarray, assigned: np.ndarray) -> np.ndarray:
    """Per event: the merchant where its shopper has the most events (ties: the lower index)."""
    valid = assigned != DROPPED
    width = int(assigned.max()) + 2 if valid.any() else 1
    key = users[valid].astype(np.int64) * width + assigned[valid]
    keys, counts = np.unique(key, return_counts=True)
    user_of, merchant_of = keys // width, keys % width
    order = np.lexsort((merchant_of, -counts, user_of))  # per user: most events first, then lower index
    first = np.ones(len(order), dtype=bool)
    first[1:] = user_of[order][1:] != user_of[order][:-1]
    best = np.full(int(users.max()) + 1 if len(users) else 1, DROPPED, dtype=np.int64)
    best[user_of[order][first]] = merchant_of[order][first]
    return best[users]


def _partitioner(raw: RawEvents, private: np.ndarray, merchant: np.ndarray, kind: str,
                 options: PartitionOptions) -> dict[str, str]:
    users, categories = raw.user[private], raw.category[private]
    if options.several_merchants:
        key = users.astype(np.int64) * len(raw.category_names) + categories
        units, unit_of_event = np.unique(key, return_inverse=True)
        label = (units % len(raw.category_names)).astype(np.int64)
    else:
        units, unit_of_event = np.unique(users, return_inverse=True)
        label = mode_per_group(unit_of_event, categories, len(units), len(raw.category_names))
    count, n = len(units), options.num_merchants
    if count < n:
        unit = "shopper-category pairs" if options.several_merchants else "shoppers"
        raise DataError(f"partition {kind}: {count} {unit} outside the public split cannot fill num-merchants = "
                        f"{n}; lower num-merchants or public-fraction")
    unit_merchant = partition_units(label, kind, n, options.alpha, options.seed)
    merchant[private] = unit_merchant[unit_of_event]
    what = {"iid": "IID", "dirichlet": f"Dirichlet over categories, alpha {options.alpha:g}",
            "size-skew": f"size-skewed, Dirichlet sizes alpha {options.alpha:g}"}[kind]
    unit = "(shopper, category) pairs" if options.several_merchants else "shoppers"
    return {f"m{k}": f"{what} partition of {unit}, part {k}" for k in range(n)}


def mode_per_group(group: np.ndarray, value: np.ndarray, groups: int, values: int) -> np.ndarray:
    """The most frequent value (codes < `values`) of each group (codes < `groups`), ties to the smallest value;
    0 for a group with no rows. A shopper's main category, an item's category."""
    key = group.astype(np.int64) * values + value
    keys, counts = np.unique(key, return_counts=True)
    group_of, value_of = keys // values, keys % values
    order = np.lexsort((value_of, -counts, group_of))
    first = np.ones(len(order), dtype=bool)
    first[1:] = group_of[order][1:] != group_of[order][:-1]
    out = np.zeros(groups, dtype=np.int64)
    out[group_of[order][first]] = value_of[order][first]
    return out


def partition_units(label: np.ndarray, kind: str, num_merchants: int, alpha: float, seed: int) -> np.ndarray:
    """Merchant index of every unit (row), through flwr-datasets' partitioners on a `datasets.Dataset`."""
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, SizePartitioner

    disable_progress_bar()
    count = len(label)
    rng = np.random.default_rng([seed, 0x9A27])
    order = rng.permutation(count)  # IidPartitioner and SizePartitioner cut contiguous blocks: shuffle first
    table = Dataset.from_dict({"unit": order, "label": label[order]})
    if kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_merchants)
    elif kind == "size-skew":
        shares = rng.dirichlet(np.full(num_merchants, alpha))
        sizes = np.maximum(1, np.floor(shares * count).astype(np.int64))
        while sizes.sum() > count:
            sizes[sizes.argmax()] -= 1
        sizes[sizes.argmax()] += count - sizes.sum()
        partitioner = SizePartitioner(partition_sizes=sizes.tolist())
    else:
        minimum = max(1, min(MIN_DIRICHLET_UNITS, count // (4 * num_merchants)))
        partitioner = DirichletPartitioner(num_partitions=num_merchants, partition_by="label", alpha=alpha,
                                           min_partition_size=minimum, self_balancing=False, seed=seed)
    partitioner.dataset = table
    out = np.full(count, DROPPED, dtype=np.int32)
    try:
        for k in range(num_merchants):
            out[np.asarray(partitioner.load_partition(k)["unit"], dtype=np.int64)] = k
    except ValueError as exc:
        raise DataError(f"partition {kind} with alpha {alpha:g} over {count} units and {num_merchants} merchants "
                        f"failed: {exc}; raise partition-alpha or lower num-merchants") from None
    return out
