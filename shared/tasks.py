"""Behaviour tasks as text-to-text examples, split leave-last-out in time per shopper.

For each shopper, first views v_1..v_n in time order (a re-view is not a new candidate). Every view v_k with k >= 2
makes one intent and one next-item example whose input is built only from v_1..v_{k-1}: v_n goes to test, v_{n-1}
to valid, the rest to train. The next-item targets are items the shopper has not seen before.

Churn examples sit at calendar cutoffs fixed in advance, the same for every shopper: T_test = window end - H,
T_valid = T_test - H, and train cutoffs every H before that. At a cutoff T every shopper with an event at or before
T asks "will they have an event in (T, T + H]?", from their history up to T only (sessions split at SESSION_GAP_MS
without an event). Calendar cutoffs make no choice that depends on the future (a shopper's "last labelled session"
would: it is mostly the one they did not come back from), every train label is known by T_valid and the valid label
by T_test. With churn on, a shopper's intent and next-item train examples stop at T_test too, so no training
example has seen whether anyone came back.

Price sensitivity has no examples of its own: it queries the intent head at every price level (the level token is
the last of an intent input) and compares the curve with the truth.

- intent:    "intent: <history> cand <item> <category> <price band> <rating band> <price level>" -> "yes" | "no"
             (bought after viewing at the offered price level)
- next-item: "next: <history>" -> "<item>" (one token, or a semantic id of four: shared/semantic.py)
- churn:     "churn: <history> <sessions> <views> <mean gap> <days since last event> <bought in the last session>
             <the first four again as numbers>" -> "yes" (an event within H) | "no"
where <history> lists the most recent viewed items, oldest first, each followed by its (public) category, the most
recent one after the mark "last" (LAST_MARK). With
item-ids = semantic an item is written as its semantic id everywhere (which already holds category and price band:
an intent candidate is "<id> <rating band>").
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np

from shared.events import EventLog

PRICE_LEVELS = (0.8, 0.9, 1.0, 1.1, 1.25)  # the offered price / the item's list price, as tokens x0.8 ...
SESSION_GAP_MS = 30 * 60_000
SESSION_BANDS = 8  # s1 .. s8 (8 or more)
VIEW_BANDS = (1, 2, 3, 4, 5, 10, 20)  # n1 n2 n3 n4 n5 n10 n20: views so far, lower edges
GAP_BANDS_DAYS = (1, 2, 4, 8, 16)  # g0: no gap yet; g1: < 1 day; g2: 1-2; ... g6: >= 16 days (mean gap so far);
#                                  d1 .. d6 the same bands for the days since the shopper's last event
# The same four numbers again, as log2(1 + x) in quarter steps: ls<k>, ln<k>, lg<k>, ld<k> stand for
# log2(1 + x) = k / NUMBER_STEPS (k capped at NUMBER_LEVELS). The wide part reads them as numbers, one weight per
# feature (shared/wide.py), which a band cannot give: beyond the bands a training split reached (a long churn
# horizon's test shoppers) only a number extrapolates (BENCHMARKS.md, Churn's numbers as band tokens).
NUMBER_PREFIXES = ("ls", "ln", "lg", "ld")  # sessions, views, mean gap (days; 0 before a second session), recency
NUMBER_STEPS = 4
NUMBER_LEVELS = 48  # log2(1 + x) <= 12: x up to 4,095
# written before the most recent item of every history: T5 has no absolute positions, so without a mark "which item
# came last" must be found through the relative attention bias alone, which pretraining learns late or never
LAST_MARK = "last"
TASK_TOKENS = ("intent:", "next:", "churn:", "cand", "yes", "no", LAST_MARK)


def level_token(level: float) -> str:
    nearest = min(PRICE_LEVELS, key=lambda lv: abs(lv - level))
    return f"x{nearest:g}"


def level_tokens() -> list[str]:
    return [level_token(level) for level in PRICE_LEVELS]


def churn_tokens() -> list[str]:
    """Every token a churn question's features write: its bands, then its numbers."""
    return churn_band_tokens() + number_tokens()


def churn_band_tokens() -> list[str]:
    return ([f"s{k}" for k in range(1, SESSION_BANDS + 1)] + [f"n{v}" for v in VIEW_BANDS]
            + [f"g{g}" for g in range(len(GAP_BANDS_DAYS) + 2)] + [f"d{d}" for d in range(1, len(GAP_BANDS_DAYS) + 2)]
            + ["b0", "b1"])


def number_tokens() -> list[str]:
    return [f"{prefix}{k}" for prefix in NUMBER_PREFIXES for k in range(NUMBER_LEVELS + 1)]


def number_level(x: float) -> int:
    """k of x >= 0's number token: log2(1 + x) in quarter steps, capped at NUMBER_LEVELS."""
    return min(NUMBER_LEVELS, round(NUMBER_STEPS * float(np.log2(1.0 + max(0.0, x)))))


def number_token(prefix: str, x: float) -> str:
    return f"{prefix}{number_level(x)}"


def history_text(history: list[str], facts: CatalogueFacts, index: dict[str, int]) -> str:
    words = [facts.history_word(index[h]) for h in history]
    if words:
        words[-1] = f"{LAST_MARK} {words[-1]}"
    return " ".join(words)


def intent_source(history: str, item: int, facts: CatalogueFacts, level: float) -> str:
    return f"intent: {history} cand {facts.candidate_text(item)} {level_token(level)}"


def churn_source(history: str, sessions: int, views: int, mean_gap_days: float | None, days_since_last: float,
                 bought_in_last_session: bool, numbers: bool = True) -> str:
    """`numbers` False: the bands alone, as a base pretrained before the number tokens reads them."""
    source = (f"churn: {history} s{min(max(1, sessions), SESSION_BANDS)} {_view_band(max(1, views))} "
              f"{_gap_band(mean_gap_days)} d{_days_band(days_since_last)} b{int(bought_in_last_session)}")
    if not numbers:
        return source
    values = (sessions, views, mean_gap_days or 0.0, days_since_last)
    return " ".join([source, *(number_token(p, x) for p, x in zip(NUMBER_PREFIXES, values, strict=True))])


def _view_band(views: int) -> str:
    return f"n{max(v for v in VIEW_BANDS if v <= views)}"


def _days_band(days: float) -> int:
    return 1 + sum(days >= edge for edge in GAP_BANDS_DAYS)


def _gap_band(mean_gap_days: float | None) -> str:
    return "g0" if mean_gap_days is None else f"g{_days_band(mean_gap_days)}"


SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class CatalogueFacts:
    """Public facts about the catalogue: the item vocabulary, each item's category, price band and rating band."""

    item_ids: tuple[str, ...]
    category: tuple[str, ...]
    price_band: tuple[str, ...]
    rating_band: tuple[str, ...]
    codes: tuple[str, ...] = ()  # item-ids = semantic: each item's id, e.g. "c3 k1 p7 u0"; empty: one token per item
    code_tokens: tuple[str, ...] = ()  # item-ids = semantic: the cluster and slot tokens of the ids
    public_views: tuple[int, ...] = ()  # views of each item in the public split, i.e. what pretraining saw

    def index(self) -> dict[str, int]:
        return {item: i for i, item in enumerate(self.item_ids)}

    @property
    def semantic(self) -> bool:
        return bool(self.codes)

    def item_text(self, item: int) -> str:
        """How the model writes the item: its token, or its semantic id (the next-item target)."""
        return self.codes[item] if self.codes else self.item_ids[item]

    def history_word(self, item: int) -> str:
        """The item in a history: its token and category, or its semantic id (which starts with the category)."""
        return self.codes[item] if self.codes else f"{self.item_ids[item]} {self.category[item]}"

    def candidate_text(self, item: int) -> str:
        """The candidate of an intent input with its public facts (a semantic id holds category and price band)."""
        if self.codes:
            return f"{self.codes[item]} {self.rating_band[item]}"
        return f"{self.item_ids[item]} {self.category[item]} {self.price_band[item]} {self.rating_band[item]}"


@dataclass
class Example:
    task: str
    source: str
    target: str
    split: str
    user_id: str
    label: int  # intent: 1 if bought; next-item: catalogue index of the target item; churn: 1 if the shopper returns
    seen: tuple[int, ...] = field(default_factory=tuple)  # items the shopper viewed before the target (or cutoff)
    truth: float = float("nan")  # intent: true P(purchase); next-item: the Bayes oracle's rank; churn: P(return)
    time: int = 0  # the target view's timestamp; churn: the cutoff (ms)
    item: int = -1  # intent: catalogue index of the candidate
    level: float = 1.0  # intent: offered price level
    curve: tuple[float, ...] = ()  # intent: true P(purchase) at every PRICE_LEVELS entry (synthetic data only)
    features: tuple[float, ...] = ()  # churn: sessions, views, mean gap (0 if none), days since last event, bought


def build_examples(log: EventLog, facts: CatalogueFacts, *, tasks: list[str], history_length: int,
                   truth_purchase_prob: np.ndarray | None = None,
                   truth_next_rank: np.ndarray | None = None,
                   price_level: np.ndarray | None = None,
                   truth_price_curve: np.ndarray | None = None,
                   churn_horizon_days: float = 7.0, window_end_ms: int | None = None,
                   churn_truth=None) -> list[Example]:
    """Examples of one event log (one merchant, or the public split).

    `window_end_ms` is the end of the observation window (default: the log's last timestamp); `churn_truth` maps a
    shopper to an object with `return_probability(views, bought, days_since_last, horizon_days)` (the synthetic
    truth), or is None.
    Rows must be time-ordered per shopper.
    """
    index = facts.index()
    by_user: dict[str, list[int]] = {}
    for row, user in enumerate(log.user_id):
        by_user.setdefault(user, []).append(row)
    window_end = int(window_end_ms if window_end_ms is not None else (log.timestamp.max() if len(log) else 0))
    horizon_ms = int(churn_horizon_days * 86_400_000)
    examples: list[Example] = []
    for user in sorted(by_user):
        rows = sorted(by_user[user], key=lambda r: (log.timestamp[r], r))
        views = [r for r in rows if log.event[r] == "view"]
        first_view: dict[str, int] = {}
        for r in views:
            first_view.setdefault(log.item_id[r], r)
        views = [r for r in views if first_view[log.item_id[r]] == r]  # a re-view is not a new candidate
        churn = _churn_examples(log, rows, views, facts, index, history_length, horizon_ms, window_end,
                                (churn_truth or {}).get(user), user) if "churn" in tasks else []
        train_until = window_end - horizon_ms if "churn" in tasks else None  # the churn test cutoff
        purchase_time: dict[str, int] = {}
        for r in rows:
            if log.event[r] == "purchase":
                purchase_time.setdefault(log.item_id[r], int(log.timestamp[r]))
        n = len(views)
        for k in range(1, n):
            split = "test" if k == n - 1 else "valid" if k == n - 2 else "train"
            row = views[k]
            if split == "train" and train_until is not None and log.timestamp[row] > train_until:
                continue
            item = log.item_id[row]
            history = [log.item_id[r] for r in views[max(0, k - history_length):k]]
            text = history_text(history, facts, index)
            seen = tuple(index[log.item_id[r]] for r in views[:k])
            if "intent" in tasks:
                level = float(price_level[row]) if price_level is not None else 1.0
                i = index[item]
                examples.append(Example(
                    task="intent", source=intent_source(text, i, facts, level),
                    target="yes" if item in purchase_time else "no", split=split, user_id=user,
                    label=int(item in purchase_time), seen=seen, time=int(log.timestamp[row]), item=i, level=level,
                    truth=float(truth_purchase_prob[row]) if truth_purchase_prob is not None else float("nan"),
                    curve=tuple(float(p) for p in truth_price_curve[row]) if truth_price_curve is not None else (),
                ))
            if "next-item" in tasks:
                examples.append(Example(
                    task="next-item", source=f"next: {text}", target=facts.item_text(index[item]), split=split,
                    user_id=user,
                    label=index[item], seen=seen, time=int(log.timestamp[row]),
                    truth=float(truth_next_rank[row]) if truth_next_rank is not None else float("nan"),
                ))
        examples += churn
    return examples


def sessions_of(timestamps: list[int]) -> list[tuple[int, int]]:
    """(first, last) positions of each session in a time-ordered list of timestamps."""
    sessions, start = [], 0
    for i in range(1, len(timestamps) + 1):
        if i == len(timestamps) or timestamps[i] - timestamps[i - 1] > SESSION_GAP_MS:
            sessions.append((start, i - 1))
            start = i
    return sessions


def churn_cutoffs(window_end: int, horizon_ms: int, first_time: int) -> list[tuple[int, str]]:
    """Calendar cutoffs, newest first: (window end - H, test), (- 2H, valid), then train every H back to first_time."""
    out, k = [], 1
    while window_end - k * horizon_ms > first_time:
        out.append((window_end - k * horizon_ms, "test" if k == 1 else "valid" if k == 2 else "train"))
        k += 1
    return out


def _churn_examples(log: EventLog, rows: list[int], views: list[int], facts: CatalogueFacts, index: dict[str, int],
                    history_length: int, horizon_ms: int, window_end: int, churn_truth, user: str) -> list[Example]:
    """One example per calendar cutoff at which the shopper had arrived (linear in events plus cutoffs)."""
    times = [int(log.timestamp[r]) for r in rows]
    if not times:
        return []
    position = {r: i for i, r in enumerate(rows)}
    view_positions = [position[r] for r in views]  # first views, in time order
    is_view = np.cumsum([0] + [log.event[r] == "view" for r in rows])  # views among the first i events
    bought = np.cumsum([0] + [log.event[r] == "purchase" for r in rows])
    sessions = sessions_of(times)
    starts = [first for first, _ in sessions]
    out: list[Example] = []
    for cutoff, split in churn_cutoffs(window_end, horizon_ms, times[0]):
        past = bisect.bisect_right(times, cutoff)  # events 0 .. past-1 are at or before the cutoff
        seen_views = bisect.bisect_left(view_positions, past)
        if past == 0 or seen_views == 0:
            continue  # the shopper had not arrived (or viewed nothing) yet
        label = int(bisect.bisect_right(times, cutoff + horizon_ms) > past)
        count = bisect.bisect_left(starts, past)  # sessions begun by the cutoff
        first = starts[count - 1]
        gaps = [(times[starts[s]] - times[sessions[s - 1][1]]) / 86_400_000 for s in range(1, count)]
        mean_gap = sum(gaps) / len(gaps) if gaps else None
        recency = (cutoff - times[past - 1]) / 86_400_000
        views_so_far = int(is_view[past])
        in_session = bool(bought[past] - bought[first])
        history = [log.item_id[rows[i]] for i in view_positions[max(0, seen_views - history_length):seen_views]]
        truth = (churn_truth.return_probability(views_so_far, in_session, recency, horizon_ms / 86_400_000)
                 if churn_truth is not None else float("nan"))
        out.append(Example(
            task="churn",
            source=churn_source(history_text(history, facts, index), count, views_so_far, mean_gap, recency,
                                in_session),
            target="yes" if label else "no", split=split, user_id=user, label=label,
            seen=tuple(index[log.item_id[rows[i]]] for i in view_positions[:seen_views]), truth=truth, time=cutoff,
            features=(float(count), float(views_so_far), float(mean_gap or 0.0), recency, float(in_session)),
        ))
    return out


def by_split(examples: list[Example]) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    for example in examples:
        out[example.split].append(example)
    return out

