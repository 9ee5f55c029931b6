"""Loaders of the public formats: each small fixture loads to the expected canonical rows; bad input gives one clear
error naming file, line and column (or, with on-bad-rows = skip, is skipped and counted); fuzzed input gives only
fedshop's own errors."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.config import FedShopConfig
from shared.errors import UserError
from shared.events import DataError
from shared.formats import write_format
from shared.loaders import FORMATS, LoadOptions, detect_format, load_events
from shared.synthetic import generate

FIXTURES = {
    "canonical": ("events.csv", "merchant_id,user_id,item_id,event,timestamp,price,category\n"
                  "shopA,u1,i1,view,1000,9.50,shoes\nshopA,u1,i1,purchase,2000,9.50,shoes\n"
                  "shopB,u2,i2,cart,3000,,\n"),
    "retailrocket": ("events.csv", "timestamp,visitorid,event,itemid,transactionid\n"
                     "1000,u1,view,i1,\n2000,u1,transaction,i1,7\n3000,u2,addtocart,i2,\n"),
    "taobao": ("UserBehavior.csv", "u1,i1,shoes,pv,1\nu1,i1,shoes,buy,2\nu2,i2,hats,cart,3\n"),
    "rees46": ("2019-Oct.csv", "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,"
               "user_session\n1970-01-01 00:00:01 UTC,view,i1,shoes,,shopA,9.50,u1,s1\n"
               "1970-01-01 00:00:02 UTC,purchase,i1,shoes,,shopA,9.50,u1,s1\n"
               "1970-01-01 00:00:03 UTC,cart,i2,,,shopB,,u2,s2\n"),
    "recbole": ("shop.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
                "u1\ti1\t5\t1\nu2\ti2\t3\t3\n"),
    "transactions": ("sales.csv", "customer_id,date,amount,quantity,sku\nu1,1970-01-01 00:00:02,19.00,2,i1\n"
                     "u2,1970-01-01T00:00:03,4.00,,i2\n"),
}
# (user, item, event, timestamp ms, price, category) in file order
EXPECTED = {
    "canonical": [("u1", "i1", "view", 1000, 9.5, "shoes"), ("u1", "i1", "purchase", 2000, 9.5, "shoes"),
                  ("u2", "i2", "cart", 3000, math.nan, "")],
    "retailrocket": [("u1", "i1", "view", 1000, math.nan, ""), ("u1", "i1", "purchase", 2000, math.nan, ""),
                     ("u2", "i2", "cart", 3000, math.nan, "")],
    "taobao": [("u1", "i1", "view", 1000, math.nan, "shoes"), ("u1", "i1", "purchase", 2000, math.nan, "shoes"),
               ("u2", "i2", "cart", 3000, math.nan, "hats")],
    "rees46": [("u1", "i1", "view", 1000, 9.5, "shoes"), ("u1", "i1", "purchase", 2000, 9.5, "shoes"),
               ("u2", "i2", "cart", 3000, math.nan, "")],
    "recbole": [("u1", "i1", "view", 1000, math.nan, ""), ("u1", "i1", "purchase", 1000, math.nan, ""),
                ("u2", "i2", "view", 3000, math.nan, "")],
    "transactions": [("u1", "i1", "purchase", 2000, 9.5, ""), ("u1", "i1", "view", 2000, 9.5, ""),
                     ("u2", "i2", "purchase", 3000, 4.0, ""), ("u2", "i2", "view", 3000, 4.0, "")],
}
OPTIONS = {"transactions": dict(item_column="sku")}


def rows(raw) -> list[tuple]:
    events = ("view", "cart", "purchase")
    return [(raw.user_names[u], raw.item_names[i], events[e], int(t), float(p), raw.category_names[c])
            for u, i, e, t, p, c in zip(raw.user, raw.item, raw.event, raw.timestamp, raw.price, raw.category)]


def same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(x[:4] == y[:4] and x[5] == y[5] and (x[4] == y[4] or (math.isnan(x[4])
                                    and math.isnan(y[4]))) for x, y in zip(a, b))


def write(tmp_path: Path, fmt: str) -> Path:
    name, text = FIXTURES[fmt]
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", sorted(FIXTURES))
def test_each_format_loads_to_the_expected_canonical_rows(tmp_path, fmt):
    # Prepare
    path = write(tmp_path, fmt)
    # Execute
    detected = detect_format(path)
    raw = load_events(path, LoadOptions(**OPTIONS.get(fmt, {})))
    # Assert
    assert detected == fmt
    assert same(rows(raw), EXPECTED[fmt]), rows(raw)


def test_parquet_loads_like_the_canonical_csv(tmp_path):
    # Prepare
    csv_path = write(tmp_path, "canonical")
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    pq.write_table(pacsv.read_csv(csv_path), tmp_path / "events.parquet")
    # Execute
    raw = load_events(tmp_path / "events.parquet")
    # Assert
    assert raw.stats.data_format == "parquet"
    assert same(rows(raw), EXPECTED["canonical"])


def test_item_files_give_categories_and_prices(tmp_path):
    # Prepare
    events = write(tmp_path, "retailrocket")
    properties = tmp_path / "item_properties.csv"
    properties.write_text("timestamp,itemid,property,value\n1,i1,categoryid,10\n5,i1,categoryid,11\n"
                          "1,i1,790,n12.000\n1,i2,available,1\n")
    (tmp_path / "shop.item").write_text("item_id:token\tcategories:token_seq\tprice:float\ni1\tshoes boots\t3.5\n")
    write(tmp_path, "recbole")
    # Execute
    rr = rows(load_events(events, LoadOptions(item_properties_path=str(properties))))
    rb = rows(load_events(tmp_path / "shop.inter"))
    # Assert: the latest categoryid wins; price from property 790; the .item beside the .inter is read
    assert [(r[4], r[5]) for r in rr][:2] == [(12.0, "11"), (12.0, "11")] and math.isnan(rr[2][4])
    assert [(r[4], r[5]) for r in rb][:2] == [(3.5, "shoes"), (3.5, "shoes")] and rb[2][5] == ""


def test_a_recbole_item_file_with_a_class_column_gives_the_first_genre(tmp_path):
    # Prepare: RecBole's ml-100k names its genre column `class:token_seq` (space-separated genres)
    write(tmp_path, "recbole")
    (tmp_path / "shop.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                        "i1\tToy Story\t1995\tAnimation Children's Comedy\n"
                                        "i2\tHeat\t1995\t\n")
    # Execute
    rb = rows(load_events(tmp_path / "shop.inter"))
    # Assert: i1 takes its first genre (not the title's first word), i2 has none
    categories = {r[1]: r[5] for r in rb}
    assert categories == {"i1": "Animation", "i2": ""}
    assert all(math.isnan(r[4]) for r in rb)  # no price column


def test_event_map_overrides_and_drops_are_counted(tmp_path):
    # Prepare
    path = write(tmp_path, "taobao")
    # Execute
    raw = load_events(path, LoadOptions(event_map="cart:drop,pv:view"))
    # Assert
    assert [r[2] for r in rows(raw)] == ["view", "purchase"]
    assert raw.stats.dropped_by_event_map == {"cart": 1}


def test_every_format_round_trips_a_synthetic_world(tmp_path):
    # Prepare: views, carts and purchases of a small generated world, written in every format
    log = generate(FedShopConfig(num_merchants=2, shoppers_per_merchant=10, public_shoppers=10, num_items=30,
                                 num_categories=3)).events
    want = sorted(zip(log.user_id.tolist(), log.item_id.tolist(), log.event.tolist(),
                      (log.timestamp // 1000).tolist()))
    for fmt in FORMATS:
        files = write_format(log, tmp_path / fmt / ("events.parquet" if fmt == "parquet" else "events.inter"
                                                    if fmt == "recbole" else "events.csv"), fmt)
        options = LoadOptions(item_properties_path=str(files[1]) if fmt == "retailrocket" else "",
                              item_column="sku" if fmt == "transactions" else "")
        # Execute
        raw = load_events(files[0], options)
        got = sorted((r[0], r[1], r[2], r[3] // 1000) for r in rows(raw))
        # Assert: what each format can hold comes back (recbole: views + bought; transactions: purchases + views)
        if fmt == "recbole":  # a purchase comes with its rated view, at the view's time
            assert [g[:3] for g in got] == sorted(w[:3] for w in want if w[2] != "cart")
        elif fmt == "transactions":
            bought = [w for w in want if w[2] == "purchase"]
            assert got == sorted(bought + [(u, i, "view", t) for u, i, _, t in bought])
        else:
            assert got == want, fmt
        assert detect_format(files[0]) == fmt
        if fmt not in ("taobao",):
            categories = {raw.item_names[i]: raw.category_names[c] for i, c in zip(raw.item, raw.category)}
            if fmt != "transactions":
                assert categories == dict(zip(log.item_id.tolist(), log.category.tolist()))


# --- bad input: one clear error naming file, line, column; or skipped and counted ------------------------------------

HEADER = "merchant_id,user_id,item_id,event,timestamp,price,category\n"
BAD = {
    # name: (file text, format, expected words in the error, skip reason)
    "unparsable timestamp": (HEADER + "m,u1,i1,view,1000,1,c\nm,u1,i2,view,yesterday,1,c\n", "canonical",
                             [":3:5 (column timestamp)", "'yesterday'", "ms since the Unix epoch"], "bad timestamp"),
    "negative price": (HEADER + "m,u1,i1,view,1000,-3,c\n", "canonical",
                       [":2:6 (column price)", "'-3'", "finite number >= 0"], "bad price"),
    "non-numeric price": (HEADER + "m,u1,i1,view,1000,cheap,c\n", "canonical",
                          [":2:6 (column price)", "'cheap'"], "bad price"),
    "missing id": (HEADER + "m,,i1,view,1000,1,c\n", "canonical", [":2:2 (column user_id)", "empty user_id"],
                   "missing id"),
    "truncated last line": (HEADER + "m,u1,i1,view,1000,1,c\nm,u1,i2,vi", "canonical",
                            [":3:5 (column timestamp)", "4 fields, expected 7", "truncated"], "wrong field count"),
    "unknown event": (HEADER + "m,u1,i1,click,1000,1,c\n", "canonical",
                      [":2:4 (column event)", "'click'", "event-map"], "unknown event"),
    "rees46 date": ("event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n"
                    "2019-13-45 00:00:00 UTC,view,1,2,,b,1.0,u,s\n", "rees46",
                    [":2:1 (column event_time)", "ISO 8601"], "bad timestamp"),
    "taobao seconds": ("u1,i1,c,pv,1\nu1,i1,c,pv,soon\n", "taobao", [":2:5 (column timestamp)", "seconds"],
                       "bad timestamp"),
}


ONLY_BAD_ROW = {"negative price", "non-numeric price", "missing id", "unknown event", "rees46 date"}  # no good row


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_row_is_one_clear_error_or_skipped_and_counted(tmp_path, name):
    # Prepare
    text, fmt, words, reason = BAD[name]
    path = tmp_path / "bad.csv"
    path.write_text(text, encoding="utf-8")
    # Execute
    with pytest.raises(DataError) as error:
        load_events(path, LoadOptions(data_format=fmt))
    if name in ONLY_BAD_ROW:  # nothing left after skipping: an error that says how many rows were skipped
        with pytest.raises(DataError, match=r"1 row\(s\) skipped"):
            load_events(path, LoadOptions(data_format=fmt, on_bad_rows="skip"))
        skipped = None
    else:
        skipped = load_events(path, LoadOptions(data_format=fmt, on_bad_rows="skip"))
    # Assert
    message = str(error.value)
    assert message.startswith(f"{path}:"), message
    for word in words:
        assert word in message, message
    if skipped is not None:  # the good row stays, the bad one is counted under its reason
        assert skipped.stats.skipped == {reason: 1} and len(skipped) == 1


def test_non_utf8_bytes_name_line_and_column(tmp_path):
    # Prepare
    path = tmp_path / "latin1.csv"
    path.write_bytes(HEADER.encode() + b"m,u1,i1,view,1000,1,c\nm,u\xe9,i1,view,2000,1,c\n")
    # Execute
    with pytest.raises(DataError) as error:
        load_events(path)
    skipped = load_events(path, LoadOptions(on_bad_rows="skip"))
    # Assert
    assert f"{path}:3:2: byte 0xe9" in str(error.value) and "UTF-8" in str(error.value)
    assert skipped.stats.skipped == {"non-UTF-8 bytes": 1} and len(skipped) == 1


@pytest.mark.parametrize("text, words", [
    (None, ["does not exist"]),
    ("", [":1: empty file"]),
    ("merchant_id;user_id;item_id;event;timestamp\nm;u;i;view;1\n", [":1:", "semicolon-separated"]),
    ("merchant_id,user_id,item_id,timestamp\nm,u,i,1\n", [":1: missing column(s) event"]),
    (HEADER, ["no events after the header"]),
])
def test_file_level_problems_are_named(tmp_path, text, words):
    # Prepare
    path = tmp_path / "events.csv"
    if text is not None:
        path.write_text(text)
    # Execute
    with pytest.raises(DataError) as error:
        load_events(path, LoadOptions(data_format="canonical"))
    # Assert
    assert str(path) in str(error.value)
    for word in words:
        assert word in str(error.value), str(error.value)


def test_transactions_without_the_needed_columns_and_bad_quantity(tmp_path):
    # Prepare
    path = tmp_path / "crm.csv"
    path.write_text("client,when,total\nc1,2020-01-01,5\n")
    other = tmp_path / "crm2.csv"
    other.write_text("customer_id,date,amount,quantity\nc1,2020-01-01,5,-1\n")
    # Execute / Assert
    with pytest.raises(DataError, match="no date column"):
        load_events(path, LoadOptions(data_format="transactions"))
    with pytest.raises(DataError, match=r"crm2.csv:2:4 \(column quantity\): quantity '-1'"):
        load_events(other, LoadOptions(data_format="transactions"))


# --- fuzz: only fedshop's own clear errors ------------------------------------------------------------------------

def _load_text(data: bytes, fmt: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        suffix = {"parquet": ".parquet", "recbole": ".inter"}.get(fmt, ".csv")
        path = Path(folder) / f"events{suffix}"
        path.write_bytes(data)
        try:
            raw = load_events(path, LoadOptions(data_format=fmt, item_column=""))
            assert len(raw) > 0 and np.all(raw.timestamp >= 0)
        except UserError as exc:
            assert str(exc)  # a message, never empty
        try:
            load_events(path, LoadOptions(data_format=fmt, on_bad_rows="skip"))
        except UserError:
            pass


CSV_LIKE = st.lists(st.lists(st.one_of(st.sampled_from(["view", "pv", "buy", "1000", "-1", "1e400", "nan", "", "u",
                                                        "2019-10-01 00:00:00 UTC", '"', "\t", "user_id:token"]),
                                       st.text(max_size=6)), max_size=8), max_size=6)
HEADERS = [HEADER.strip(), "timestamp,visitorid,event,itemid,transactionid", "",
           "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session",
           "user_id:token\titem_id:token\trating:float\ttimestamp:float", "customer_id,date,amount,quantity"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=300), fmt=st.sampled_from(("auto", *FORMATS)))
def test_fuzz_random_bytes_give_only_fedshop_errors(data, fmt):
    _load_text(data, fmt)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=st.sampled_from(HEADERS), body=CSV_LIKE, fmt=st.sampled_from(("auto", *FORMATS)),
       delimiter=st.sampled_from([",", "\t", ";"]))
def test_fuzz_csv_like_text_gives_only_fedshop_errors(header, body, fmt, delimiter):
    text = header + "\n" + "\n".join(delimiter.join(row) for row in body)
    _load_text(text.encode("utf-8", "surrogatepass"), fmt)
