"""Writers of canonical events in each public format `shared.loaders` reads: for tests, benchmarks and demos.

`write_format(log, path, fmt)` writes `log` the way the real data sets lay it out (see `shared/loaders.py`), with the
merchant in a natural column where the format has one (rees46 `brand`, transactions `store`, recbole `shop`,
canonical `merchant_id`). RecBole gets rating 5 for an item the shopper bought and 3 otherwise; transactions keep
only purchases.
"""

from __future__ import annotations

import csv
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from shared.events import EventLog, write_csv

RETAILROCKET_EVENTS = {"view": "view", "cart": "addtocart", "purchase": "transaction"}
TAOBAO_EVENTS = {"view": "pv", "cart": "cart", "purchase": "buy"}
NATURAL_COLUMN = {"canonical": "merchant_id", "parquet": "merchant_id", "rees46": "brand", "recbole": "shop",
                  "transactions": "store"}


def _price(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.2f}"


def _rows(log: EventLog):
    return zip(log.merchant_id.tolist(), log.user_id.tolist(), log.item_id.tolist(), log.event.tolist(),
               log.timestamp.tolist(), log.price.tolist(), log.category.tolist(), strict=True)


def write_format(log: EventLog, path: str | Path, fmt: str) -> list[Path]:
    """Write `log` at `path` in `fmt`; returns the files written (the events file first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "canonical":
        write_csv(log, path)
        return [path]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"merchant_id": log.merchant_id.tolist(), "user_id": log.user_id.tolist(),
                          "item_id": log.item_id.tolist(), "event": log.event.tolist(),
                          "timestamp": log.timestamp.astype(np.int64), "price": log.price,
                          "category": log.category.tolist()})
        pq.write_table(table, path)
        return [path]
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t" if fmt == "recbole" else ",", lineterminator="\n")
        if fmt == "retailrocket":
            writer.writerow(["timestamp", "visitorid", "event", "itemid", "transactionid"])
            for n, (_, user, item, event, ts, _, _) in enumerate(_rows(log)):
                writer.writerow([ts, user, RETAILROCKET_EVENTS[event], item, n if event == "purchase" else ""])
            properties = path.with_name(path.stem + "_item_properties.csv")
            items = dict(zip(log.item_id.tolist(), zip(log.category.tolist(), log.price.tolist(), strict=True),
                             strict=True))
            with properties.open("w", newline="", encoding="utf-8") as props:
                out = csv.writer(props, lineterminator="\n")
                out.writerow(["timestamp", "itemid", "property", "value"])
                start = int(log.timestamp.min()) if len(log) else 0
                for item, (category, price) in items.items():
                    out.writerow([start, item, "categoryid", category])
                    if not math.isnan(price):
                        out.writerow([start, item, "790", f"n{price:.3f}"])
            return [path, properties]
        if fmt == "taobao":
            for _, user, item, event, ts, _, category in _rows(log):
                writer.writerow([user, item, category, TAOBAO_EVENTS[event], ts // 1000])
            return [path]
        if fmt == "rees46":
            writer.writerow(["event_time", "event_type", "product_id", "category_id", "category_code", "brand",
                             "price", "user_id", "user_session"])
            for merchant, user, item, event, ts, price, category in _rows(log):
                when = datetime.fromtimestamp(ts / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
                writer.writerow([when, event, item, category, "", merchant, _price(price), user,
                                 f"{user}-{ts // 86_400_000}"])
            return [path]
        if fmt == "recbole":
            writer.writerow(["user_id:token", "item_id:token", "rating:float", "timestamp:float", "shop:token"])
            bought = {(u, i) for _, u, i, e, *_ in _rows(log) if e == "purchase"}
            for merchant, user, item, event, ts, _, _ in _rows(log):
                if event == "view":
                    writer.writerow([user, item, 5 if (user, item) in bought else 3, ts / 1000, merchant])
            items = dict(zip(log.item_id.tolist(), zip(log.category.tolist(), log.price.tolist(), strict=True),
                             strict=True))
            item_file = path.with_suffix(".item")
            with item_file.open("w", newline="", encoding="utf-8") as handle_items:
                out = csv.writer(handle_items, delimiter="\t", lineterminator="\n")
                out.writerow(["item_id:token", "categories:token_seq", "price:float"])
                for item, (category, price) in items.items():
                    out.writerow([item, category, _price(price)])
            return [path, item_file]
        if fmt == "transactions":
            writer.writerow(["customer_id", "date", "amount", "quantity", "sku", "store"])
            for merchant, user, item, event, ts, price, _ in _rows(log):
                if event == "purchase":
                    when = datetime.fromtimestamp(ts / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
                    writer.writerow([user, when, _price(2 * price) or "0", 2, item, merchant])
            return [path]
    raise ValueError(f"unknown format {fmt!r}")
