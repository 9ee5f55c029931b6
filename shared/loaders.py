"""Loaders of the public e-commerce log formats into the canonical events (`shared/events.py`), streaming.

Every loader reads its file row by row (the csv module over lines decoded one at a time, or Parquet in record
batches) and appends to compact typed arrays: ids are interned to int32 codes (each distinct string is held once),
timestamps int64 ms, prices float64, events int8. No per-row Python object survives the row, so memory is bounded by
the arrays (about 30 bytes per event plus the distinct ids).

A malformed row is refused with `path:line:column (column name): what was wrong, what was expected`
(`shared.events.DataError`); with `on-bad-rows = "skip"` it is skipped and counted by reason instead. Nothing is
dropped silently: events mapped to `drop` by the event map are counted too.

Formats (`data-format`; `auto` detects from the file name and header where unambiguous):
- canonical:     merchant_id,user_id,item_id,event,timestamp(ms)[,price,category] (what `fedshop data synth` writes)
- parquet:       the canonical columns in a Parquet file
- retailrocket:  timestamp(ms),visitorid,event(view/addtocart/transaction),itemid,transactionid; categories (and
                 prices, property 790) from item_properties.csv (`item-properties-path`, property `categoryid`)
- taobao:        UserBehavior.csv without header: user,item,category,behavior(pv/buy/cart/fav),unix seconds
- rees46:        event_time("2019-10-01 00:00:00 UTC"),event_type,product_id,category_id,category_code,brand,price,
                 user_id,user_session; the category is category_id
- recbole:       atomic `.inter` (tab-separated, typed header `user_id:token item_id:token rating:float
                 timestamp:float`, seconds); every row is a view, a row rated >= `purchase-rating` also a purchase;
                 optional `.item` beside it (or `item-properties-path`) for category and price
- transactions:  customer id, date, amount[, quantity] (CRM exports); every row is a purchase of `item-column` (or
                 one "basket" item) at amount / quantity, and also a view (the task builders learn from views)
"""

from __future__ import annotations

import csv
import math
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from shared.events import COLUMNS, EVENT_TYPES, DataError

FORMATS = ("canonical", "parquet", "retailrocket", "taobao", "rees46", "recbole", "transactions")
VIEW, CART, PURCHASE, DROP = 0, 1, 2, -1
EVENT_CODES = {"view": VIEW, "cart": CART, "purchase": PURCHASE, "drop": DROP}
DEFAULT_EVENT_MAPS = {
    "canonical": {"view": "view", "cart": "cart", "purchase": "purchase"},
    "parquet": {"view": "view", "cart": "cart", "purchase": "purchase"},
    "retailrocket": {"view": "view", "addtocart": "cart", "transaction": "purchase"},
    "taobao": {"pv": "view", "cart": "cart", "buy": "purchase", "fav": "view"},
    "rees46": {"view": "view", "cart": "cart", "remove_from_cart": "drop", "purchase": "purchase"},
    "recbole": {}, "transactions": {},
}
MAX_MS = 32_503_680_000_000  # year 3000: a later timestamp is a unit mistake
MAX_FIELD = 1 << 20
BASKET_ITEM = "basket"
TAOBAO_BEHAVIOURS = ("pv", "buy", "cart", "fav")
TRANSACTION_NAMES = {
    "customer": ("customerid", "customer", "clientid", "userid", "memberid", "accountid", "user", "client"),
    "date": ("date", "transactiondate", "invoicedate", "orderdate", "purchasedate", "datetime", "timestamp", "time"),
    "amount": ("amount", "totalamount", "total", "value", "revenue", "sales", "spend", "price", "unitprice"),
    "quantity": ("quantity", "qty", "units"),
}
csv.field_size_limit(MAX_FIELD)


@dataclass
class LoadOptions:
    """What a loader needs beyond the file (from the config keys of the same names)."""

    data_format: str = "auto"
    item_properties_path: str = ""
    event_map: str = ""
    on_bad_rows: str = "error"
    group_column: str = ""  # a natural merchant column to keep (partition = natural:<column>)
    item_column: str = ""  # transactions: the item column ("" = one basket item)
    timestamp_format: str = ""  # strptime format of date strings ("" = ISO 8601)
    purchase_rating: float = 4.0  # recbole: a rating at least this is also a purchase


@dataclass
class LoadStats:
    path: str
    data_format: str
    rows_read: int = 0
    events_loaded: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows skipped (on-bad-rows = skip)
    skipped_examples: list[str] = field(default_factory=list)  # the first few skipped rows' messages
    dropped_by_event_map: Counter = field(default_factory=Counter)  # raw event -> rows mapped to drop
    views_added: int = 0  # transactions: a view added beside every purchase; recbole: purchases added
    purchases_added: int = 0
    item_properties: str = ""


@dataclass
class RawEvents:
    """The canonical columns as int codes into name tables, before cleaning and merchant assignment."""

    user: np.ndarray  # int32 codes into user_names
    item: np.ndarray  # int32 codes into item_names
    event: np.ndarray  # int8: VIEW, CART, PURCHASE
    timestamp: np.ndarray  # int64 ms
    price: np.ndarray  # float64, NaN unknown
    category: np.ndarray  # int32 codes into category_names ("" = unknown)
    group: np.ndarray  # int32 codes into group_names (the natural merchant column; "" when none)
    user_names: np.ndarray
    item_names: np.ndarray
    category_names: np.ndarray
    group_names: np.ndarray
    stats: LoadStats

    def __len__(self) -> int:
        return len(self.timestamp)

    def take(self, index: np.ndarray) -> RawEvents:
        return RawEvents(user=self.user[index], item=self.item[index], event=self.event[index],
                         timestamp=self.timestamp[index], price=self.price[index], category=self.category[index],
                         group=self.group[index], user_names=self.user_names, item_names=self.item_names,
                         category_names=self.category_names, group_names=self.group_names, stats=self.stats)


class _Bad(Exception):
    """One row's problem: the column it is in and what was wrong / expected."""

    def __init__(self, column: str, message: str, reason: str):
        super().__init__(message)
        self.column, self.message, self.reason = column, message, reason


class _Interner:
    def __init__(self) -> None:
        self.codes: dict[str, int] = {}
        self.names: list[str] = []

    def code(self, text: str) -> int:
        code = self.codes.get(text)
        if code is None:
            code = self.codes[text] = len(self.names)
            self.names.append(text)
        return code

    def array(self) -> np.ndarray:
        out = np.empty(len(self.names), dtype=object)
        out[:] = self.names
        return out


# --- value parsers: each raises _Bad naming what was expected --------------------------------------------------------

def parse_ms(text: str, column: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise _Bad(column, f"timestamp {text!r} is not an integer (ms since the Unix epoch)", "bad timestamp") from None
    if not 0 <= value <= MAX_MS:
        raise _Bad(column, f"timestamp {value} is out of range; expected ms since the Unix epoch", "bad timestamp")
    return value


def parse_seconds(text: str, column: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise _Bad(column, f"timestamp {text!r} is not a number (seconds since the Unix epoch)",
                   "bad timestamp") from None
    if not (math.isfinite(value) and 0 <= value * 1000 <= MAX_MS):
        raise _Bad(column, f"timestamp {text!r} is out of range; expected seconds since the Unix epoch",
                   "bad timestamp")
    return int(round(value * 1000))


def parse_datetime(text: str, column: str, fmt: str = "") -> int:
    """A date or date-time string to ms: ISO 8601 (a trailing ' UTC' allowed; naive means UTC) or `fmt`."""
    try:
        if fmt:
            moment = datetime.strptime(text, fmt)
        else:
            moment = datetime.fromisoformat(text[:-4] if text.endswith(" UTC") else text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        value = int(moment.timestamp() * 1000)
    except (ValueError, OverflowError, OSError):
        expected = f"a date in the format {fmt!r} (timestamp-format)" if fmt else \
            "an ISO 8601 date or date-time like 2019-10-01 00:00:00 UTC (or set timestamp-format)"
        raise _Bad(column, f"timestamp {text!r} is not {expected}", "bad timestamp") from None
    if not 0 <= value <= MAX_MS:
        raise _Bad(column, f"timestamp {text!r} is before 1970 or after 3000", "bad timestamp")
    return value


def parse_price(text: str, column: str) -> float:
    if not text:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise _Bad(column, f"price {text!r} is not a finite number >= 0", "bad price")
    return value


def _need(text: str, column: str) -> str:
    if not text:
        raise _Bad(column, f"empty {column}; expected an id", "missing id")
    return text


def parse_event_map(text: str, data_format: str) -> dict[str, int]:
    """The format's default raw-event -> canonical mapping, with `event-map` entries ("raw:canonical,...") over it."""
    mapping = {raw: EVENT_CODES[canonical] for raw, canonical in DEFAULT_EVENT_MAPS.get(data_format, {}).items()}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        raw, _, canonical = part.partition(":")
        if not raw.strip() or canonical.strip() not in EVENT_CODES:
            raise DataError(f"event-map entry {part!r}: expected raw:canonical with canonical one of "
                            f"{', '.join(EVENT_CODES)} (e.g. \"pv:view,buy:purchase,fav:drop\")")
        mapping[raw.strip()] = EVENT_CODES[canonical.strip()]
    return mapping


# --- reading ---------------------------------------------------------------------------------------------------------

def _lines(path: Path, skip: bool, stats: LoadStats, delimiter: str) -> Iterator[str]:
    """The file's lines decoded one at a time, so a non-UTF-8 byte is named by line and column."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = raw[:exc.start].count(delimiter.encode()) + 1
                message = (f"{path}:{number}:{column}: byte 0x{raw[exc.start]:02x} at offset {exc.start} is not "
                           "UTF-8; expected a UTF-8 text file (re-encode it, e.g. iconv -f latin1 -t utf-8)")
                if not skip:
                    raise DataError(message) from None
                _count_skip(stats, "non-UTF-8 bytes", message)
                yield "\n"


def _count_skip(stats: LoadStats, reason: str, message: str) -> None:
    stats.skipped[reason] += 1
    if len(stats.skipped_examples) < 5:
        stats.skipped_examples.append(message)


def _open_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}:1: empty file; expected a header row (or, for taobao, data rows)")


def _first_line(path: Path) -> str:
    with path.open("rb") as handle:
        raw = handle.readline(MAX_FIELD)
    try:
        return raw.decode("utf-8-sig").rstrip("\r\n")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}:1: byte at offset {exc.start} is not UTF-8; expected a UTF-8 text file") from None


def detect_format(path: str | Path) -> str:
    """The format of `path` from its name and first line; refuses when it cannot tell."""
    path = Path(path)
    _open_file(path)
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".inter":
        return "recbole"
    line = _first_line(path)
    for delimiter in (",", "\t"):
        header = {h.strip().strip('"').lower() for h in line.split(delimiter)}
        if {"visitorid", "itemid", "event"} <= header:
            return "retailrocket"
        if {"event_time", "event_type", "product_id", "user_id"} <= header:
            return "rees46"
        if set(COLUMNS[:5]) <= header:
            return "canonical"
        if delimiter == "\t" and any(":" in h for h in header) and any(h.startswith("user_id:") for h in header):
            return "recbole"
    fields = [f.strip() for f in line.split(",")]
    if len(fields) == 5 and fields[3] in TAOBAO_BEHAVIOURS:
        return "taobao"
    try:
        _transaction_columns([f.strip('"') for f in fields], path, "")
        return "transactions"
    except DataError:
        pass
    raise DataError(f"{path}:1: cannot tell the data format from the header {line[:200]!r}; set data-format to one "
                    f"of {', '.join(FORMATS)}")


class _Builder:
    """Columns appended row by row into compact arrays; ids interned."""

    def __init__(self) -> None:
        self.users, self.items, self.categories, self.groups = _Interner(), _Interner(), _Interner(), _Interner()
        self.user, self.item, self.category, self.group = array("i"), array("i"), array("i"), array("i")
        self.event, self.timestamp, self.price = array("b"), array("q"), array("d")

    def add(self, user: str, item: str, event: int, timestamp: int, price: float, category: str, group: str) -> None:
        self.user.append(self.users.code(user))
        self.item.append(self.items.code(item))
        self.event.append(event)
        self.timestamp.append(timestamp)
        self.price.append(price)
        self.category.append(self.categories.code(category))
        self.group.append(self.groups.code(group))

    def build(self, stats: LoadStats) -> RawEvents:
        self.categories.code("")
        self.groups.code("")
        stats.events_loaded = len(self.timestamp)
        return RawEvents(
            user=np.frombuffer(self.user, dtype=np.int32).copy(), item=np.frombuffer(self.item, dtype=np.int32).copy(),
            event=np.frombuffer(self.event, dtype=np.int8).copy(),
            timestamp=np.frombuffer(self.timestamp, dtype=np.int64).copy(),
            price=np.frombuffer(self.price, dtype=np.float64).copy(),
            category=np.frombuffer(self.category, dtype=np.int32).copy(),
            group=np.frombuffer(self.group, dtype=np.int32).copy(),
            user_names=self.users.array(), item_names=self.items.array(), category_names=self.categories.array(),
            group_names=self.groups.array(), stats=stats,
        )


# A row parser turns one row's fields into (user, item, raw event, timestamp ms, price, category, group) or raises.
RowParser = Callable[[list[str]], tuple[str, str, str, int, float, str, str]]


def _stream(path: Path, rows: Iterable[list[str]] | csv.Reader, header: list[str], parse: RowParser,
            options: LoadOptions, stats: LoadStats, event_map: dict[str, int], *,
            line_of: Callable[[], int], purchase_is_view: bool = False, rating: Callable | None = None,
            builder: _Builder | None = None) -> _Builder:
    """The loop every CSV-like loader shares: parse, map the event, count or refuse bad rows."""
    builder = builder or _Builder()
    skip = options.on_bad_rows == "skip"
    width = len(header)
    position = {name: i for i, name in enumerate(header)}
    add = builder.add
    try:
        for row in rows:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            stats.rows_read += 1
            try:
                if len(row) != width:
                    raise _Bad(header[len(row)] if len(row) < width else "",
                               f"{len(row)} fields, expected {width} as in the header "
                               f"({','.join(header)}); a wrong delimiter, a stray quote or a truncated line?",
                               "wrong field count")
                user, item, raw_event, timestamp, price, category, group = parse(row)
                if rating is not None:
                    event = VIEW
                else:
                    event = event_map.get(raw_event)
                    if event is None:
                        # the hint repeats the name only where event-map could hold it (one printable line,
                        # no ',' or ':', which separate its entries)
                        named = raw_event if raw_event.isprintable() and not set(raw_event) & set(",:") else "EVENT"
                        raise _Bad(_event_column(header), f"event {raw_event!r} is not in the event map "
                                   f"({', '.join(sorted(event_map)) or 'empty'}); add it to event-map, e.g. "
                                   f"\"{named}:view\" or \"{named}:drop\"", "unknown event")
            except _Bad as bad:
                line = line_of()
                where = f"{path}:{line}"
                if bad.column:
                    where += f":{position.get(bad.column, 0) + 1} (column {bad.column})"
                message = f"{where}: {bad.message}"
                if not skip:
                    raise DataError(message) from None
                _count_skip(stats, bad.reason, message)
                continue
            if event == DROP:
                stats.dropped_by_event_map[raw_event] += 1
                continue
            add(user, item, event, timestamp, price, category, group)
            if purchase_is_view:
                add(user, item, VIEW, timestamp, price, category, group)
                stats.views_added += 1
            elif rating is not None and rating(raw_event):
                add(user, item, PURCHASE, timestamp, price, category, group)
                stats.purchases_added += 1
    except csv.Error as exc:
        raise DataError(f"{path}:{line_of()}: not valid CSV ({exc}); expected "
                        f"{'tab' if options.data_format == 'recbole' else 'comma'}-separated fields") from None
    return builder


def _event_column(header: list[str]) -> str:
    for name in ("event", "event_type", "behavior", "behavior_type"):
        if name in header:
            return name
    return ""


def _csv_rows(path: Path, options: LoadOptions, stats: LoadStats, delimiter: str = ",",
              has_header: bool = True, required: tuple[str, ...] = ()) -> tuple[list[str], csv.Reader]:
    _open_file(path)
    reader = csv.reader(_lines(path, options.on_bad_rows == "skip", stats, delimiter), delimiter=delimiter,
                        strict=True)
    if not has_header:
        return [], reader
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}:1: empty file; expected a header row") from None
    except csv.Error as exc:
        raise DataError(f"{path}:1: the header is not valid CSV ({exc})") from None
    if len(header) == 1 and required:
        for other, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe"), (",", "comma")):
            if other != delimiter and other in header[0]:
                raise DataError(f"{path}:1: the header is one field {header[0][:120]!r}: the file looks "
                                f"{name}-separated; expected {'tab' if delimiter == chr(9) else 'comma'}-separated "
                                f"columns {', '.join(required)}")
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}; expected a header with "
                        f"{', '.join(required)} (found {', '.join(header)[:300]})")
    return header, reader


def _group_index(path: Path, header: list[str], column: str) -> int | None:
    if not column:
        return None
    if column not in header:
        raise DataError(f"{path}:1: partition = natural:{column}, but the file has no column {column!r} "
                        f"(columns: {', '.join(header)[:300]})")
    return header.index(column)


# --- the formats -----------------------------------------------------------------------------------------------------

def load_canonical(path: Path, options: LoadOptions, stats: LoadStats) -> _Builder:
    header, reader = _csv_rows(path, options, stats, required=COLUMNS[:5])
    return _canonical_rows(path, header, reader, options, stats, line_of=lambda: reader.line_num)


def _canonical_rows(path: Path, header: list[str], rows: Iterable[list[str]], options: LoadOptions,
                    stats: LoadStats, line_of: Callable[[], int]) -> _Builder:
    u, i, e, t = (header.index(c) for c in ("user_id", "item_id", "event", "timestamp"))
    p = header.index("price") if "price" in header else None
    c = header.index("category") if "category" in header else None
    g = _group_index(path, header, options.group_column)

    def parse(row: list[str]) -> tuple:
        return (_need(row[u].strip(), "user_id"), _need(row[i].strip(), "item_id"), row[e].strip(),
                parse_ms(row[t].strip(), "timestamp"), parse_price(row[p].strip(), "price") if p is not None
                else math.nan, row[c].strip() if c is not None else "", row[g].strip() if g is not None else "")

    return _stream(path, rows, header, parse, options, stats, parse_event_map(options.event_map, "canonical"),
                   line_of=line_of)


def load_parquet(path: Path, options: LoadOptions, stats: LoadStats) -> _Builder:
    _open_file(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
        header = list(source.schema_arrow.names)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc)[:200]}); expected the canonical "
                        f"columns {', '.join(COLUMNS)}") from None
    missing = [c for c in COLUMNS[:5] if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    row_number = [0]

    def rows() -> Iterator[list[str]]:
        try:
            for batch in source.iter_batches(batch_size=65536):
                columns = [batch.column(name).to_pylist() for name in header]
                for values in zip(*columns, strict=True):
                    row_number[0] += 1
                    yield ["" if v is None or v != v else str(v) for v in values]  # None / NaN: unknown
        except pa.ArrowException as exc:
            raise DataError(f"{path}: row {row_number[0] + 1}: not readable ({str(exc)[:200]})") from None

    return _canonical_rows(path, header, rows(), options, stats, line_of=lambda: row_number[0])


def load_retailrocket(path: Path, options: LoadOptions, stats: LoadStats) -> _Builder:
    header, reader = _csv_rows(path, options, stats, required=("timestamp", "visitorid", "event", "itemid"))
    t, u, e, i = (header.index(c) for c in ("timestamp", "visitorid", "event", "itemid"))
    g = _group_index(path, header, options.group_column)

    def parse(row: list[str]) -> tuple:
        return (_need(row[u].strip(), "visitorid"), _need(row[i].strip(), "itemid"), row[e].strip(),
                parse_ms(row[t].strip(), "timestamp"), math.nan, "", row[g].strip() if g is not None else "")

    return _stream(path, reader, header, parse, options, stats, parse_event_map(options.event_map, "retailrocket"),
                   line_of=lambda: reader.line_num)


def load_retailrocket_properties(paths: str, options: LoadOptions, stats: LoadStats) -> dict[str, tuple[str, float]]:
    """item id -> (latest categoryid, latest price from property 790 "n<price>") from item_properties.csv file(s)."""
    latest: dict[str, list] = {}  # item -> [category time, category, price time, price]
    for part in (p.strip() for p in paths.split(",") if p.strip()):
        path = Path(part)
        header, reader = _csv_rows(path, options, stats, required=("timestamp", "itemid", "property", "value"))
        t, i, p, v = (header.index(c) for c in ("timestamp", "itemid", "property", "value"))
        try:
            for row in reader:
                if len(row) != len(header) or row[p] not in ("categoryid", "790"):
                    continue
                try:
                    when = parse_ms(row[t].strip(), "timestamp")
                    price = parse_price(row[v].strip().lstrip("n"), "value") if row[p] == "790" else math.nan
                except _Bad as bad:
                    message = f"{path}:{reader.line_num}: {bad.message}"
                    if options.on_bad_rows != "skip":
                        raise DataError(message) from None
                    _count_skip(stats, f"item properties: {bad.reason}", message)
                    continue
                slot = latest.setdefault(row[i].strip(), [-1, "", -1, math.nan])
                if row[p] == "categoryid" and when >= slot[0]:
                    slot[0], slot[1] = when, row[v].strip()
                elif row[p] == "790" and when >= slot[2]:
                    slot[2], slot[3] = when, price
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    return {item: (slot[1], slot[3]) for item, slot in latest.items()}


def load_taobao(path: Path, options: LoadOptions, stats: LoadStats) -> _Builder:
    _, reader = _csv_rows(path, options, stats, has_header=False)
    header = ["user", "item", "category", "behavior", "timestamp"]
    if options.group_column:
        raise DataError(f"{path}: the taobao format has no merchant column; use partition = iid, dirichlet or "
                        "size-skew")

    def parse(row: list[str]) -> tuple:
        return (_need(row[0].strip(), "user"), _need(row[1].strip(), "item"), row[3].strip(),
                parse_seconds(row[4].strip(), "timestamp"), math.nan, row[2].strip(), "")

    first = [True]

    def rows() -> Iterator[list[str]]:
        for row in reader:
            if first[0] and row and row[0].strip().lower() in ("user", "user_id", "userid"):
                first[0] = False
                continue  # a header someone added
            first[0] = False
            yield row

    builder = _stream(path, rows(), header, parse, options, stats, parse_event_map(options.event_map, "taobao"),
                      line_of=lambda: reader.line_num)
    return builder


def load_rees46(path: Path, options: LoadOptions, stats: LoadStats) -> _Builder:
    required = ("event_time", "event_type", "product_id", "user_id")
    header, reader = _csv_rows(path, options, stats, required=required)
    t, e, i, u = (header.index(c) for c in required)
    c = header.index("category_id") if "category_id" in header else None
    p = header.index("price") if "price" in header else None
    g = _group_index(path, header, options.group_column)
    fmt = options.timestamp_format

    def parse(row: list[str]) -> tuple:
        return (_need(row[u].strip(), "user_id"), _need(row[i].strip(), "product_id"), row[e].strip(),
                parse_datetime(row[t].strip(), "event_time", fmt),
                parse_price(row[p].strip(), "price") if p is not None else math.nan,
                row[c].strip() if c is not None else "", row[g].strip() if g is not None else "")

    return _stream(path, reader, header, parse, options, stats, parse_event_map(options.event_map, "rees46"),
                   line_of=lambda: reader.line_num)


def _recbole_header(path: Path, header: list[str]) -> list[str]:
    names = []
    for column in header:
        name, _, kind = column.partition(":")
        if not kind:
            raise DataError(f"{path}:1: column {column!r} has no type; expected RecBole atomic headers like "
                            "user_id:token, item_id:token, rating:float, timestamp:float (tab-separated)")
        names.append(name.strip())
    return names


def load_recbole(path: Path, options: LoadOptions, stats: LoadStats) -> _Builder:
    typed, reader = _csv_rows(path, options, stats, delimiter="\t",
                              required=())
    if len(typed) == 1 and "," in typed[0]:
        raise DataError(f"{path}:1: the header is one field {typed[0][:120]!r}: the file looks comma-separated; "
                        "expected tab-separated RecBole atomic columns (user_id:token, item_id:token, ...)")
    header = _recbole_header(path, typed)
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in header]
    if missing:
        raise DataError(f"{path}:1: missing column(s) {', '.join(missing)}; expected RecBole atomic headers "
                        "user_id:token, item_id:token, timestamp:float (rating:float optional)")
    u, i, t = (header.index(c) for c in ("user_id", "item_id", "timestamp"))
    r = header.index("rating") if "rating" in header else None
    g = _group_index(path, header, options.group_column)
    threshold = options.purchase_rating

    def parse(row: list[str]) -> tuple:
        rating = ""
        if r is not None and row[r].strip():
            rating = row[r].strip()
            try:
                if not math.isfinite(float(rating)):
                    raise ValueError
            except ValueError:
                raise _Bad("rating", f"rating {rating!r} is not a finite number", "bad rating") from None
        return (_need(row[u].strip(), "user_id"), _need(row[i].strip(), "item_id"), rating,
                parse_seconds(row[t].strip(), "timestamp"), math.nan, "", row[g].strip() if g is not None else "")

    return _stream(path, reader, header, parse, options, stats, {}, line_of=lambda: reader.line_num,
                   rating=lambda text: bool(text) and float(text) >= threshold)


def load_recbole_items(path: Path, options: LoadOptions, stats: LoadStats) -> dict[str, tuple[str, float]]:
    """item id -> (category, price) from a RecBole `.item` file (first token of a category-like column: categor*,
    cate_*, *genre*, or `class`)."""
    typed, reader = _csv_rows(path, options, stats, delimiter="\t")
    header = _recbole_header(path, typed)
    if "item_id" not in header:
        raise DataError(f"{path}:1: missing column item_id; expected a RecBole .item header with item_id:token")
    i = header.index("item_id")
    # RecBole's own datasets name it e.g. categories, cate_id, genre, or `class` (ml-100k/ml-1m: `class:token_seq`,
    # space-separated genres); a token_seq keeps its first token as the item's one category
    c = next((k for k, name in enumerate(header) if name.lower() == "class"
              or any(w in name.lower() for w in ("categor", "cate_", "genre"))), None)
    p = header.index("price") if "price" in header else None
    out: dict[str, tuple[str, float]] = {}
    try:
        for row in reader:
            if len(row) != len(header):
                if options.on_bad_rows != "skip":
                    raise DataError(f"{path}:{reader.line_num}: {len(row)} fields, expected {len(header)}")
                _count_skip(stats, "item file: wrong field count", f"{path}:{reader.line_num}")
                continue
            category = row[c].split()[0] if c is not None and row[c].split() else ""
            try:
                price = parse_price(row[p].strip(), "price") if p is not None else math.nan
            except _Bad as bad:
                if options.on_bad_rows != "skip":
                    raise DataError(f"{path}:{reader.line_num}:{p + 1} (column price): {bad.message}") from None
                _count_skip(stats, "item file: bad price", f"{path}:{reader.line_num}")
                price = math.nan
            out[row[i].strip()] = (category, price)
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({exc})") from None
    return out


def _transaction_columns(header: list[str], path: Path, item_column: str) -> dict[str, int | None]:
    squashed = [h.lower().replace("_", "").replace(" ", "").replace("-", "") for h in header]
    found: dict[str, int | None] = {}
    for role, names in TRANSACTION_NAMES.items():
        found[role] = next((squashed.index(n) for n in names if n in squashed), None)
    missing = [role for role in ("customer", "date", "amount") if found[role] is None]
    if missing:
        raise DataError(f"{path}:1: no {' / '.join(missing)} column in the header ({', '.join(header)[:300]}); "
                        "expected a transactions table with a customer id (customer_id, customer, client_id, "
                        "user_id ...), a date (date, transaction_date, invoice_date, order_date ...) and an amount "
                        "(amount, total, value, revenue, price ...), optionally quantity")
    if item_column:
        if item_column not in header:
            raise DataError(f"{path}:1: item-column {item_column!r} is not a column ({', '.join(header)[:300]})")
        found["item"] = header.index(item_column)
    else:
        found["item"] = None
    return found


def load_transactions(path: Path, options: LoadOptions, stats: LoadStats) -> _Builder:
    header, reader = _csv_rows(path, options, stats, required=())
    if len(header) == 1:
        for other, name in ((";", "semicolon"), ("\t", "tab"), ("|", "pipe")):
            if other in header[0]:
                raise DataError(f"{path}:1: the header is one field {header[0][:120]!r}: the file looks "
                                f"{name}-separated; expected comma-separated columns customer id, date, amount")
    found = _transaction_columns(header, path, options.item_column)
    u, t, a, q, i = found["customer"], found["date"], found["amount"], found["quantity"], found["item"]
    g = _group_index(path, header, options.group_column)
    fmt = options.timestamp_format
    names = {k: header[v] for k, v in found.items() if v is not None}

    def parse(row: list[str]) -> tuple:
        amount = parse_price(row[a].strip(), names["amount"])
        if math.isnan(amount):
            raise _Bad(names["amount"], "empty amount; expected a number >= 0", "bad price")
        if q is not None and row[q].strip():
            try:
                quantity = float(row[q])
            except ValueError:
                quantity = -1.0
            if not (quantity > 0 and math.isfinite(quantity)):
                raise _Bad(names["quantity"], f"quantity {row[q]!r} is not a number > 0", "bad quantity")
            amount /= quantity
        return (_need(row[u].strip(), names["customer"]),
                _need(row[i].strip(), names["item"]) if i is not None else BASKET_ITEM, "purchase",
                parse_datetime(row[t].strip(), names["date"], fmt), amount, "",
                row[g].strip() if g is not None else "")

    return _stream(path, reader, header, parse, options, stats, {"purchase": PURCHASE},
                   line_of=lambda: reader.line_num, purchase_is_view=True)


LOADERS = {"canonical": load_canonical, "parquet": load_parquet, "retailrocket": load_retailrocket,
           "taobao": load_taobao, "rees46": load_rees46, "recbole": load_recbole, "transactions": load_transactions}


def load_events(path: str | Path, options: LoadOptions | None = None) -> RawEvents:
    """Load `path` in `options.data_format` (or the detected one) into canonical columns; see the module doc."""
    options = options or LoadOptions()
    path = Path(path)
    data_format = detect_format(path) if options.data_format == "auto" else options.data_format
    if data_format not in LOADERS:
        raise DataError(f"data-format {data_format!r}: expected one of auto, {', '.join(FORMATS)}")
    options = LoadOptions(**{**options.__dict__, "data_format": data_format})
    parse_event_map(options.event_map, data_format)  # refuse a bad map before reading
    stats = LoadStats(path=str(path), data_format=data_format)
    builder = LOADERS[data_format](path, options, stats)
    raw = builder.build(stats)
    if data_format == "retailrocket" and options.item_properties_path:
        _join_items(raw, load_retailrocket_properties(options.item_properties_path, options, stats))
        stats.item_properties = options.item_properties_path
    elif data_format == "recbole":
        item_file = Path(options.item_properties_path) if options.item_properties_path else path.with_suffix(".item")
        if options.item_properties_path or item_file.is_file():
            _join_items(raw, load_recbole_items(item_file, options, stats))
            stats.item_properties = str(item_file)
    elif options.item_properties_path:
        raise DataError(f"item-properties-path is set, but the {data_format} format takes no item file (only "
                        "retailrocket item_properties.csv and a recbole .item)")
    if not len(raw):
        skipped = sum(stats.skipped.values()) + sum(stats.dropped_by_event_map.values())
        raise DataError(f"{path}: no events" + (f" ({skipped} row(s) skipped or dropped)" if skipped else
                                                " after the header"))
    return raw


def _join_items(raw: RawEvents, items: dict[str, tuple[str, float]]) -> None:
    """Category (and a price where the events have none) per item from an item file."""
    categories = _Interner()
    for name in raw.category_names.tolist():
        categories.code(name)
    item_category = np.array([categories.code(items.get(name, ("", 0))[0]) for name in raw.item_names.tolist()],
                             dtype=np.int32)
    item_price = np.array([items.get(name, ("", math.nan))[1] for name in raw.item_names.tolist()], dtype=np.float64)
    raw.category = item_category[raw.item]
    raw.category_names = categories.array()
    missing = np.isnan(raw.price)
    raw.price[missing] = item_price[raw.item[missing]]


def event_names(codes: np.ndarray) -> np.ndarray:
    names = np.empty(len(EVENT_TYPES), dtype=object)
    names[:] = EVENT_TYPES
    return names[codes.astype(np.int64)]
