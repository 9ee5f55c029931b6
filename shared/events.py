"""The canonical events table and its CSV form.

Columns: merchant_id, user_id, item_id, event, timestamp (ms since the Unix epoch, UTC), price, category.
Every loader produces this table; every task builder reads it. A malformed CSV row is refused with file:line:column,
never skipped.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.errors import UserError

COLUMNS = ("merchant_id", "user_id", "item_id", "event", "timestamp", "price", "category")
EVENT_TYPES = ("view", "cart", "purchase")


class DataError(UserError):
    """A data file fedshop refuses, naming file, line and column."""


@dataclass
class EventLog:
    """Column-oriented canonical events, sorted by (merchant, user, timestamp)."""

    merchant_id: np.ndarray  # str
    user_id: np.ndarray  # str
    item_id: np.ndarray  # str
    event: np.ndarray  # str, one of EVENT_TYPES
    timestamp: np.ndarray  # int64 ms
    price: np.ndarray  # float64, NaN if unknown
    category: np.ndarray  # str, "" if unknown

    def __len__(self) -> int:
        return len(self.timestamp)

    def take(self, index: np.ndarray) -> EventLog:
        return EventLog(**{c: getattr(self, c)[index] for c in COLUMNS})

    def for_merchant(self, merchant_id: str) -> EventLog:
        return self.take(np.flatnonzero(self.merchant_id == merchant_id))

    def merchants(self) -> list[str]:
        return sorted(set(self.merchant_id.tolist()), key=_natural_key)

    def sorted(self) -> EventLog:
        order = np.lexsort((self.timestamp, self.user_id, self.merchant_id))
        return self.take(order)


def _natural_key(text: str) -> tuple:
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text))


def write_csv(log: EventLog, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in zip(*(getattr(log, c) for c in COLUMNS), strict=True):
            merchant, user, item, event, ts, price, category = row
            writer.writerow([merchant, user, item, event, int(ts), "" if math.isnan(price) else f"{price:.2f}",
                             category])


def read_csv(path: str | Path) -> EventLog:
    """Load a canonical events CSV; refuse the first malformed row with file:line:column and the reason."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: events file does not exist")
    columns: dict[str, list] = {c: [] for c in COLUMNS}
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}:1: empty file; expected a header row {','.join(COLUMNS)}") from None
        header = [h.strip() for h in header]
        missing = [c for c in COLUMNS[:5] if c not in header]
        if missing:
            raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}; "
                            f"expected a header with {','.join(COLUMNS)} (price, category optional)")
        position = {name: header.index(name) for name in COLUMNS if name in header}
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{line}: {len(row)} fields, expected {len(header)} as in the header")
            values = {name: row[i].strip() for name, i in position.items()}
            for name in ("merchant_id", "user_id", "item_id"):
                if not values[name]:
                    raise DataError(_where(path, line, position, name) + f": empty {name}")
            if values["event"] not in EVENT_TYPES:
                raise DataError(_where(path, line, position, "event")
                                + f": event {values['event']!r} is not one of {', '.join(EVENT_TYPES)}")
            try:
                timestamp = int(values["timestamp"])
            except ValueError:
                raise DataError(_where(path, line, position, "timestamp")
                                + f": timestamp {values['timestamp']!r} is not an integer (ms since epoch)") from None
            if timestamp < 0:
                raise DataError(_where(path, line, position, "timestamp") + f": negative timestamp {timestamp}")
            price = math.nan
            if values.get("price"):
                try:
                    price = float(values["price"])
                except ValueError:
                    price = -1.0
                if not (price >= 0 and math.isfinite(price)):
                    raise DataError(_where(path, line, position, "price")
                                    + f": price {values['price']!r} is not a finite number >= 0")
            for name in ("merchant_id", "user_id", "item_id", "event"):
                columns[name].append(values[name])
            columns["timestamp"].append(timestamp)
            columns["price"].append(price)
            columns["category"].append(values.get("category", ""))
    if not columns["timestamp"]:
        raise DataError(f"{path}: no events after the header")
    return EventLog(
        merchant_id=np.array(columns["merchant_id"], dtype=object),
        user_id=np.array(columns["user_id"], dtype=object),
        item_id=np.array(columns["item_id"], dtype=object),
        event=np.array(columns["event"], dtype=object),
        timestamp=np.array(columns["timestamp"], dtype=np.int64),
        price=np.array(columns["price"], dtype=np.float64),
        category=np.array(columns["category"], dtype=object),
    ).sorted()


def _where(path: Path, line: int, position: dict[str, int], name: str) -> str:
    return f"{path}:{line}:{position[name] + 1} (column {name})"
