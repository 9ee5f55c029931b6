"""Where a run's events come from: the synthetic generator, or a real log (load, clean, assign merchants).

`load_world(config)` is the one seam every consumer uses (merchants, the pretrainer, the server's checks): with an
empty `data-path` it is `shared.synthetic.generate(config)`; otherwise the file is loaded (`shared.loaders`),
cleaned (`shared.cleaning`), split into the public split and merchants m0..m{N-1} (`shared.partition`), and turned
into the same `SyntheticData` shape with a catalogue derived from the events:

- items: those that survive cleaning (their ids are the model's item tokens; whitespace becomes "_", and an id that
  looks like a task, category, band, price-level or churn token gets an "item:" prefix);
- category: the item's most frequent category, mapped to tokens c0..c{K-1} by frequency (c0 the most frequent; one
  "c0" when the file has none); the mapping is in the `SourceReport`;
- price band: the quantile band (PRICE_BANDS) of the item's median price within its category, 0 when unknown;
- rating band 0 (unknown); latent quality NaN, popularity and price_z 0: real data has no generator truth, so the
  oracle columns are NaN and reports print n/a.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import shared.synthetic
from shared.cleaning import CleaningOptions, CleaningStep, clean
from shared.config import FedShopConfig, parse_time_bound
from shared.events import DataError, EventLog
from shared.loaders import LoadOptions, LoadStats, RawEvents, event_names, load_events
from shared.partition import (
    DROPPED,
    PUBLIC,
    PartitionOptions,
    PartitionResult,
    assign_merchants,
    mode_per_group,
    parse_partition,
)
from shared.synthetic import PRICE_BANDS, PUBLIC_MERCHANT, Catalogue, SyntheticData, generate
from shared.tasks import PRICE_LEVELS, TASK_TOKENS, churn_tokens, level_tokens

UNKNOWN_CATEGORY = "(unknown)"
# the config keys that shape the data (everything `load_world` reads, directly or through the generator/loaders)
DATA_KEYS = ("seed", "num-merchants", "shoppers-per-merchant", "public-shoppers", "num-items", "num-categories",
             "days", "popularity-exponent", "views-per-session", "mean-gap-days", "leave-bias",
             "merchant-skew", "new-items", "drift", "item-links", "data-path", "data-format", "item-properties-path",
             "event-map", "item-column", "timestamp-format", "purchase-rating", "on-bad-rows", "partition",
             "partition-alpha", "shoppers-at-several-merchants", "public-fraction", "min-shopper-events",
             "min-item-events", "max-events-per-shopper-per-day", "time-window-start", "time-window-end")


@dataclass
class SourceReport:
    """What loading, cleaning and merchant assignment did: the data report's figures."""

    load: LoadStats
    cleaning: list[CleaningStep]
    partition: PartitionResult
    category_names: dict[str, str] = field(default_factory=dict)  # "c{k}" -> the file's category id
    events_before_cleaning: int = 0
    renamed_items: int = 0


def load_world(config: FedShopConfig) -> SyntheticData:
    """The run's data: synthetic when `data-path` is empty, else the file (see the module doc).

    Kept per process for the last few configs (a merchant's actor serves many messages), keyed by every data key of
    the config and, for files, their absolute path, size and modification time, so a changed file is read again.
    Every world is also kept on disk in `world-cache-dir` (shared/worldcache.py), so that a new process reads it
    instead of loading, cleaning and partitioning the file again, or drawing the generator's world again (5-10 s for
    the default config): memory, then disk, then build (and write the disk cache). Callers must not modify what it
    returns.
    """
    return _cached_world(world_key(config), config)


def world_key(config: FedShopConfig) -> tuple:
    """Everything that defines the world: every data key (its file paths made absolute: a key names files, not
    spellings of them) and each file loading reads, with its size and modification time; for the generator's world
    the fingerprint of its code (`generator_fingerprint`)."""
    flat = config.to_flat()
    data_path = os.path.abspath(config.data_path) if config.data_path else ""
    properties = [os.path.abspath(p.strip()) for p in config.item_properties_path.split(",") if p.strip()]
    flat["data-path"], flat["item-properties-path"] = data_path, ",".join(properties)
    files = [p for p in (data_path, *properties) if p]
    if data_path and not properties and config.data_format in ("auto", "recbole"):
        files.append(os.path.splitext(data_path)[0] + ".item")  # what a recbole .inter reads beside it
    key = tuple((name, flat[name]) for name in DATA_KEYS) + tuple(file_stat(path) for path in files)
    return key + (("generator", generator_fingerprint()),) if not data_path else key


@functools.lru_cache(maxsize=1)
def generator_fingerprint() -> str:
    """What decides the generator's draws besides the config: its source, the price levels it offers and numpy's
    version (its random streams). A world stored by other code is then a miss, not a stale world."""
    made_of = (Path(shared.synthetic.__file__).read_bytes(), repr(PRICE_LEVELS).encode(), np.__version__.encode())
    return hashlib.sha256(b"\0".join(made_of)).hexdigest()[:16]


def file_stat(path: str) -> tuple:
    """(path, size, modification time in ns) of a file; None for both when it cannot be read (or path is '')."""
    if not path:
        return path, None, None
    try:
        info = os.stat(path)
    except OSError:
        return path, None, None  # loading will name the missing file
    return path, info.st_size, info.st_mtime_ns


def _cached_world(key: tuple, config: FedShopConfig) -> SyntheticData:
    hit = _WORLDS.get(key)
    if hit is None:
        hit = _WORLDS[key] = _stored_world(key, config)
        while len(_WORLDS) > WORLDS_KEPT:
            _WORLDS.pop(next(iter(_WORLDS)))  # the oldest
    return hit


def _built_world(config: FedShopConfig) -> SyntheticData:
    return generate(config) if not config.data_path else load_real(config)[0]


def _stored_world(key: tuple, config: FedShopConfig) -> SyntheticData:
    """The world from the disk cache, else built (`generate` or `load_real`) and written there (once, when several
    processes miss it together: the others wait for the entry and read it)."""
    # imported here: pyarrow adds 50-70 ms to a process's imports, which a command that loads no world never pays
    from shared import worldcache

    directory = worldcache.cache_dir(config.world_cache_dir)
    if directory is None:
        return _built_world(config)
    data = worldcache.read_world(directory, key)
    if data is None:
        with worldcache.building(directory, key) as waited:
            data = worldcache.read_world(directory, key) if waited else None
            if data is None:
                data = _built_world(config)
                worldcache.write_world(directory, key, data)
    return data


WORLDS_KEPT = 2
_WORLDS: dict[tuple, SyntheticData] = {}


def clear_world_cache() -> None:
    """Forget the worlds `load_world` kept in this process (the next call reads the disk cache or builds them
    again); the disk cache is left as it is."""
    _WORLDS.clear()


def load_options(config: FedShopConfig) -> LoadOptions:
    kind, column = parse_partition(config.partition)
    return LoadOptions(data_format=config.data_format, item_properties_path=config.item_properties_path,
                       event_map=config.event_map, on_bad_rows=config.on_bad_rows, group_column=column,
                       item_column=config.item_column, timestamp_format=config.timestamp_format,
                       purchase_rating=config.purchase_rating)


# min-shopper-events = 0 (by task): one-event shoppers kept for these, else the k-core below, which stops a run
# rather than drop more than this share of the shoppers unasked
ONE_EVENT_FORMATS = ("transactions",)
DEFAULT_MIN_SHOPPER_EVENTS = 5
DEFAULT_KCORE_MAX_DROPPED = 0.5


def min_shopper_events(config: FedShopConfig, data_format: str) -> int:
    """The k-core's shopper threshold: the key when set, else 1 for a transactions log or a churn-only run (a
    customer who bought once is what churn is about), else DEFAULT_MIN_SHOPPER_EVENTS."""
    if config.min_shopper_events:
        return config.min_shopper_events
    if data_format in ONE_EVENT_FORMATS or config.task_list == ["churn"]:
        return 1
    return DEFAULT_MIN_SHOPPER_EVENTS


def cleaning_options(config: FedShopConfig, data_format: str) -> CleaningOptions:
    return CleaningOptions(window_start_ms=parse_time_bound("time-window-start", config.time_window_start),
                           window_end_ms=parse_time_bound("time-window-end", config.time_window_end),
                           max_events_per_shopper_per_day=config.max_events_per_shopper_per_day,
                           min_shopper_events=min_shopper_events(config, data_format),
                           min_item_events=config.min_item_events)


def refuse_silent_kcore(config: FedShopConfig, raw: RawEvents, steps: list[CleaningStep]) -> None:
    """Stop when the by-task default k-core dropped more than DEFAULT_KCORE_MAX_DROPPED of the shoppers it saw: the
    user decides, with the key that keeps them or the one that drops them."""
    threshold = min_shopper_events(config, raw.stats.data_format)
    if config.min_shopper_events or threshold == 1:
        return
    kcore = steps[-1]
    seen = len(np.unique(raw.user)) - sum(step.shoppers_dropped for step in steps[:-1])
    if seen and kcore.shoppers_dropped > DEFAULT_KCORE_MAX_DROPPED * seen:
        raise DataError(f"{raw.stats.path}: the default k-core (at least {threshold} events per shopper) would drop "
                        f"{kcore.shoppers_dropped} of {seen} shoppers ({kcore.shoppers_dropped / seen:.0%}); set "
                        "min-shopper-events = 1 to keep shoppers with few events (e.g. one-time customers for churn), "
                        f"or min-shopper-events = {threshold} to drop them")


def partition_options(config: FedShopConfig) -> PartitionOptions:
    return PartitionOptions(partition=config.partition, num_merchants=config.num_merchants,
                            alpha=config.partition_alpha, several_merchants=config.shoppers_at_several_merchants,
                            public_fraction=config.public_fraction, seed=config.seed)


def load_real(config: FedShopConfig, path: str | None = None) -> tuple[SyntheticData, SourceReport]:
    raw = load_events(path or config.data_path, load_options(config))
    before = len(raw)
    cleaned, steps = clean(raw, cleaning_options(config, raw.stats.data_format))
    refuse_silent_kcore(config, raw, steps)
    if not len(cleaned):
        raise DataError(f"{path or config.data_path}: cleaning left no events ("
                        + "; ".join(f"{s.name}: {s.events_dropped}" for s in steps if s.events_dropped)
                        + "); lower min-shopper-events / min-item-events or widen the time window")
    assignment = assign_merchants(cleaned, partition_options(config))
    data, categories, renamed = build_world(cleaned, assignment, config.num_merchants)
    report = SourceReport(load=raw.stats, cleaning=steps, partition=assignment, category_names=categories,
                          events_before_cleaning=before, renamed_items=renamed)
    return data, report


def build_world(raw: RawEvents, assignment: PartitionResult, num_merchants: int
                ) -> tuple[SyntheticData, dict[str, str], int]:
    keep = np.flatnonzero(assignment.merchant != DROPPED)
    raw, merchant = raw.take(keep), assignment.merchant[keep]
    if not len(raw):
        raise DataError(f"{raw.stats.path}: no events left after merchant assignment "
                        f"({dict(assignment.dropped)})")
    items, item_of_event = np.unique(raw.item, return_inverse=True)
    # each item's category: its most frequent one; category tokens by frequency of items
    category_of_item = mode_per_group(item_of_event, raw.category, len(items), len(raw.category_names))
    category_codes, item_category_rank = np.unique(category_of_item, return_inverse=True)
    sizes = np.bincount(item_category_rank)
    by_size = sorted(range(len(category_codes)), key=lambda k: (-sizes[k], str(raw.category_names[category_codes[k]])))
    token_of = np.empty(len(category_codes), dtype=np.int64)
    token_of[by_size] = np.arange(len(by_size))
    item_category = token_of[item_category_rank]
    names = {f"c{token_of[k]}": (str(raw.category_names[code]) or UNKNOWN_CATEGORY)
             for k, code in enumerate(category_codes)}
    names = dict(sorted(names.items(), key=lambda kv: int(kv[0][1:])))
    median_price = _median_per_group(item_of_event, raw.price, len(items))
    price_band = _price_bands(item_category, median_price)
    item_ids, renamed = item_tokens(raw.item_names[items])
    catalogue = Catalogue(
        item_ids=item_ids, category=item_category, price=median_price, price_band=price_band,
        rating_band=np.zeros(len(items), dtype=np.int64), quality=np.full(len(items), np.nan),
        popularity=np.zeros(len(items)), price_z=np.zeros(len(items)),
    )
    merchant_names = np.empty(num_merchants + 1, dtype=object)
    merchant_names[:num_merchants] = [f"m{k}" for k in range(num_merchants)]
    merchant_names[num_merchants] = PUBLIC_MERCHANT
    merchant_index = np.where(merchant == PUBLIC, num_merchants, merchant)
    # sorted by (merchant, user, timestamp) as strings, like EventLog.sorted, using ranks of the name tables
    merchant_rank = np.argsort(np.argsort(merchant_names.astype(str)))
    user_rank = np.empty(len(raw.user_names), dtype=np.int64)
    user_rank[np.argsort(raw.user_names.astype(str), kind="stable")] = np.arange(len(raw.user_names))
    order = np.lexsort((raw.timestamp, user_rank[raw.user], merchant_rank[merchant_index]))
    category_tokens = np.array([f"c{c}" for c in range(len(category_codes))], dtype=object)
    events = EventLog(
        merchant_id=merchant_names[merchant_index[order]], user_id=raw.user_names[raw.user[order]],
        item_id=item_ids[item_of_event[order]], event=event_names(raw.event[order]),
        timestamp=raw.timestamp[order], price=raw.price[order],
        category=category_tokens[item_category[item_of_event[order]]],
    )
    nan = np.full(len(events), np.nan)
    # the price level of an event: what was paid or shown against the item's median price (1 when either is unknown)
    usual = median_price[item_of_event[order]]
    with np.errstate(invalid="ignore", divide="ignore"):
        level = np.where(np.isfinite(events.price) & (usual > 0), events.price / usual, 1.0)
    data = SyntheticData(catalogue=catalogue, events=events, truth_purchase_prob=nan, truth_next_rank=nan.copy(),
                         merchant_ids=[f"m{k}" for k in range(num_merchants)],
                         price_level=np.where(np.isfinite(level), level, 1.0),
                         window_end_ms=int(events.timestamp.max()))  # churn: the log's end is the window's
    return data, names, renamed


def item_tokens(names: np.ndarray) -> tuple[np.ndarray, int]:
    """Item ids usable as whitespace-separated tokens that collide with no category, band or task token."""
    reserved = {*TASK_TOKENS, *level_tokens(), *churn_tokens(), "<pad>", "</s>", "<unk>"}
    out, renamed = [], 0
    for name in names.tolist():
        token = "_".join(str(name).split()) or "_"
        if token in reserved or (token[:1] in "cprsngdbx" and token[1:].replace(".", "", 1).isdigit()):
            token = f"item:{token}"
        renamed += token != name
        out.append(token)
    if len(set(out)) != len(out):
        raise DataError("item ids collide once whitespace is replaced by '_' (e.g. 'a b' and 'a_b'); rename them")
    tokens = np.empty(len(out), dtype=object)
    tokens[:] = out
    return tokens, renamed


def _median_per_group(group: np.ndarray, value: np.ndarray, groups: int) -> np.ndarray:
    known = np.isfinite(value)
    group, value = group[known], value[known]
    out = np.full(groups, np.nan)
    if not len(value):
        return out
    order = np.lexsort((value, group))
    group, value = group[order], value[order]
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    ends = np.r_[starts[1:], len(group)]
    lower, upper = value[starts + (ends - starts - 1) // 2], value[starts + (ends - starts) // 2]
    out[group[starts]] = lower + (upper - lower) / 2.0  # not (lower + upper) / 2: that overflows near 1.8e308
    return out


def _price_bands(category: np.ndarray, price: np.ndarray) -> np.ndarray:
    band = np.zeros(len(price), dtype=np.int64)
    for c in np.unique(category):
        members = np.flatnonzero((category == c) & np.isfinite(price))
        if len(members):
            ranks = price[members].argsort(kind="stable").argsort()
            band[members] = (ranks * PRICE_BANDS) // len(members)
    return band


def describe_counts(report: SourceReport) -> dict[str, int]:
    """Every dropped or skipped count of the report, flat, for logs and tests."""
    out: dict[str, int] = {}
    for reason, count in report.load.skipped.items():
        out[f"skipped: {reason}"] = count
    for raw, count in report.load.dropped_by_event_map.items():
        out[f"event map drop: {raw}"] = count
    for step in report.cleaning:
        out[f"cleaning: {step.name}"] = step.events_dropped
    for reason, count in report.partition.dropped.items():
        out[f"partition: {reason}"] = count
    return out
