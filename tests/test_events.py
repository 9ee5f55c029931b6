import numpy as np
import pytest

from shared.config import FedShopConfig
from shared.events import DataError, read_csv, write_csv
from shared.synthetic import generate

HEADER = "merchant_id,user_id,item_id,event,timestamp,price,category\n"


def test_synthetic_events_round_trip_through_csv(tmp_path):
    data = generate(FedShopConfig(num_merchants=2, shoppers_per_merchant=10, public_shoppers=10, num_items=30,
                                  num_categories=3))
    path = tmp_path / "events.csv"
    write_csv(data.events, path)
    loaded = read_csv(path)
    original = data.events.sorted()
    assert len(loaded) == len(original)
    for column in ("merchant_id", "user_id", "item_id", "event", "timestamp", "category"):
        assert (getattr(loaded, column) == getattr(original, column)).all(), column
    assert np.allclose(loaded.price, np.round(original.price, 2))


@pytest.mark.parametrize("row, where, words", [
    ("m0,u1,i1,click,1000,1.0,c1", ":3:4 (column event)", "'click' is not one of view, cart, purchase"),
    ("m0,u1,i1,view,yesterday,1.0,c1", ":3:5 (column timestamp)", "not an integer"),
    ("m0,,i1,view,1000,1.0,c1", ":3:2 (column user_id)", "empty user_id"),
    ("m0,u1,i1,view,1000,-4,c1", ":3:6 (column price)", "finite number >= 0"),
    ("m0,u1,i1,view,1000", ":3:", "5 fields, expected 7"),
])
def test_malformed_rows_are_refused_with_file_line_column(tmp_path, row, where, words):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "m0,u1,i0,view,900,2.5,c1\n" + row + "\n")
    with pytest.raises(DataError) as error:
        read_csv(path)
    message = str(error.value)
    assert f"{path}{where}" in message and words in message


def test_missing_columns_are_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("merchant_id,user,item_id,event,timestamp\n")
    with pytest.raises(DataError, match=r"bad.csv:1: missing column\(s\) user_id"):
        read_csv(path)
