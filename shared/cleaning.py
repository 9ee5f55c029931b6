"""Cleaning of loaded events, every step counted: time window, exact duplicates, bot-like shoppers, k-core.

(Rows with missing ids or unparsable values never get this far: the loader refuses them, or with
`on-bad-rows = "skip"` skips and counts them in its `LoadStats`.) All steps work on the int-coded columns, vectorised.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.loaders import RawEvents

DAY_MS = 86_400_000
MAX_KCORE_PASSES = 100


@dataclass
class CleaningOptions:
    window_start_ms: int | None = None
    window_end_ms: int | None = None  # exclusive
    max_events_per_shopper_per_day: int = 0  # 0 = no bot filter
    min_shopper_events: int = 1
    min_item_events: int = 1


@dataclass
class CleaningStep:
    name: str
    events_dropped: int
    shoppers_dropped: int
    items_dropped: int
    detail: str = ""


def _distinct(codes: np.ndarray) -> int:
    return int(len(np.unique(codes)))


def _step(name: str, before: RawEvents, keep: np.ndarray, detail: str = "") -> tuple[RawEvents, CleaningStep]:
    after = before.take(np.flatnonzero(keep)) if not keep.all() else before
    return after, CleaningStep(name, len(before) - len(after), _distinct(before.user) - _distinct(after.user),
                               _distinct(before.item) - _distinct(after.item), detail)


def duplicate_mask(raw: RawEvents) -> np.ndarray:
    """True for every row that repeats an earlier row exactly (all canonical columns equal)."""
    price_bits = np.where(np.isnan(raw.price), np.nan, raw.price).view(np.int64)
    keys = (raw.group, raw.category, price_bits, raw.event, raw.item, raw.timestamp, raw.user)
    order = np.lexsort(keys)
    same = np.ones(len(order) - 1, dtype=bool) if len(order) > 1 else np.zeros(0, dtype=bool)
    for key in keys:
        ordered = key[order]
        same &= ordered[1:] == ordered[:-1]
    duplicate = np.zeros(len(raw), dtype=bool)
    duplicate[order[1:][same]] = True
    return duplicate


def bot_shoppers(raw: RawEvents, ceiling: int) -> np.ndarray:
    """User codes with more than `ceiling` events on some UTC day."""
    day = raw.timestamp // DAY_MS
    key = raw.user.astype(np.int64) * (int(day.max() - day.min()) + 1) + (day - day.min())
    keys, counts = np.unique(key, return_counts=True)
    span = int(day.max() - day.min()) + 1
    return np.unique(keys[counts > ceiling] // span)


def clean(raw: RawEvents, options: CleaningOptions) -> tuple[RawEvents, list[CleaningStep]]:
    steps: list[CleaningStep] = []
    if options.window_start_ms is not None or options.window_end_ms is not None:
        start = options.window_start_ms if options.window_start_ms is not None else np.iinfo(np.int64).min
        end = options.window_end_ms if options.window_end_ms is not None else np.iinfo(np.int64).max
        raw, step = _step("outside the time window", raw, (raw.timestamp >= start) & (raw.timestamp < end))
        steps.append(step)
    raw, step = _step("exact duplicates", raw, ~duplicate_mask(raw))
    steps.append(step)
    if options.max_events_per_shopper_per_day and len(raw):
        bots = bot_shoppers(raw, options.max_events_per_shopper_per_day)
        raw, step = _step("bot-like shoppers", raw, ~np.isin(raw.user, bots),
                          f"{len(bots)} shopper(s) with more than {options.max_events_per_shopper_per_day} events "
                          "on one day")
        steps.append(step)
    raw, step = kcore(raw, options.min_shopper_events, options.min_item_events)
    steps.append(step)
    return raw, steps


def kcore(raw: RawEvents, min_shopper: int, min_item: int) -> tuple[RawEvents, CleaningStep]:
    """Drop shoppers with fewer than `min_shopper` events and items with fewer than `min_item`, until both hold."""
    keep = np.ones(len(raw), dtype=bool)
    passes = 0
    while passes < MAX_KCORE_PASSES:
        passes += 1
        users = np.bincount(raw.user[keep], minlength=len(raw.user_names))
        items = np.bincount(raw.item[keep], minlength=len(raw.item_names))
        now = keep & (users[raw.user] >= min_shopper) & (items[raw.item] >= min_item)
        if (now == keep).all():
            break
        keep = now
    return _step("k-core", raw, keep, f"at least {min_shopper} events per shopper and {min_item} per item "
                 f"({passes} pass(es))")
