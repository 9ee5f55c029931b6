"""Real logs in, merchants out: partitioners, cleaning counts, the derived catalogue, `fedshop data`, and one
2-round simulation on a REES46-format file."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from shared.cleaning import CleaningOptions, clean
from shared.config import ConfigError, FedShopConfig, from_mapping
from shared.data import check_base_matches, merchant_data, vocabulary
from shared.events import DataError
from shared.formats import write_format
from shared.loaders import LoadOptions, load_events
from shared.partition import PUBLIC, PartitionOptions, assign_merchants, partition_units
from shared.sources import describe_counts, load_real, load_world
from shared.synthetic import PUBLIC_MERCHANT, generate
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(num_merchants=3, shoppers_per_merchant=20, public_shoppers=30, num_items=40, num_categories=4)


@pytest.fixture(scope="module")
def rees46(tmp_path_factory) -> Path:
    """The tiny synthetic world as a REES46 file (merchants in the brand column, the public split as brand public)."""
    path = tmp_path_factory.mktemp("rees46") / "2019-Oct.csv"
    write_format(generate(FedShopConfig(**TINY)).events, path, "rees46")
    return path


def _shopper_counts(result, users) -> Counter:
    return Counter({k: len(np.unique(users[result.merchant == k])) for k in set(result.merchant.tolist()) if k >= 0})


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "size-skew"])
def test_partitioners_give_the_requested_merchants_and_same_seed_same_partition(rees46, kind):
    # Prepare
    raw = load_events(rees46)
    options = PartitionOptions(partition=kind, num_merchants=4, alpha=0.5, public_fraction=0.2, seed=3)
    # Execute
    first, again = assign_merchants(raw, options), assign_merchants(raw, options)
    other = assign_merchants(raw, PartitionOptions(**{**options.__dict__, "seed": 4}))
    # Assert
    assert sorted(set(first.merchant.tolist())) == [PUBLIC, 0, 1, 2, 3]
    assert np.array_equal(first.merchant, again.merchant) and not np.array_equal(first.merchant, other.merchant)
    public_users = set(raw.user[first.merchant == PUBLIC].tolist())
    assert 0.1 < len(public_users) / len(set(raw.user.tolist())) < 0.3
    for k in range(4):  # disjoint shoppers: nobody at two merchants, nobody both public and private
        users = set(raw.user[first.merchant == k].tolist())
        assert not users & public_users
        assert all(not users & set(raw.user[first.merchant == j].tolist()) for j in range(k))


def test_skew_follows_alpha():
    # Prepare: 2000 shoppers, 8 categories as labels
    labels = np.arange(2000) % 8
    # Execute
    sizes = {a: np.bincount(partition_units(labels, "size-skew", 5, a, seed=1), minlength=5) for a in (0.2, 100.0)}
    iid = np.bincount(partition_units(labels, "iid", 5, 1.0, seed=1), minlength=5)
    mixes = {a: partition_units(labels, "dirichlet", 4, a, seed=1) for a in (0.1, 100.0)}

    def label_spread(assignment):  # mean over merchants of the largest category's share
        return np.mean([np.bincount(labels[assignment == k], minlength=8).max() / max(1, (assignment == k).sum())
                        for k in range(4)])

    # Assert
    assert iid.tolist() == [400] * 5
    assert sizes[0.2].sum() == sizes[100.0].sum() == 2000
    assert sizes[0.2].max() / sizes[0.2].min() > 3 > sizes[100.0].max() / sizes[100.0].min()
    assert label_spread(mixes[0.1]) > 0.4 > label_spread(mixes[100.0])


def test_natural_partition_keeps_the_largest_and_names_them(tmp_path):
    # Prepare: brand b1 has 3 shoppers, b2 has 2, b3 has 1; u1 also buys at b2; one row has no brand
    path = tmp_path / "events.csv"
    rows = ["merchant_id,user_id,item_id,event,timestamp,brand"]
    for user, brand, n in [("u1", "b1", 3), ("u2", "b1", 2), ("u3", "b1", 2), ("u4", "b2", 2), ("u5", "b2", 2),
                           ("u6", "b3", 2), ("u1", "b2", 1), ("u7", "", 1)]:
        rows += [f"x,{user},i{k},view,{k}000,{brand}" for k in range(n)]
    path.write_text("\n".join(rows) + "\n")
    raw = load_events(path, LoadOptions(group_column="brand"))
    options = PartitionOptions(partition="natural:brand", num_merchants=2, public_fraction=1e-9)
    # Execute
    disjoint = assign_merchants(raw, options)
    shared = assign_merchants(raw, PartitionOptions(**{**options.__dict__, "several_merchants": True}))
    # Assert
    assert disjoint.names == {"m0": "brand = b1", "m1": "brand = b2"}
    assert disjoint.dropped == {"no value in column brand": 1, "at merchants beyond the 2 largest values of brand": 2,
                                "a shopper's events at merchants other than their main one (disjoint shoppers)": 1}
    u1 = raw.user == list(raw.user_names).index("u1")
    assert set(disjoint.merchant[u1].tolist()) == {0, -2} and set(shared.merchant[u1].tolist()) == {0, 1}
    with pytest.raises(DataError, match="finds 3 merchant"):
        assign_merchants(raw, PartitionOptions(partition="natural:brand", num_merchants=5))


def test_cleaning_counts_every_step(tmp_path):
    # Prepare: a duplicate, a bot (5 events in a day), a rare item, a shopper with one event, one outside the window
    day = 86_400_000
    lines = ["merchant_id,user_id,item_id,event,timestamp"]
    lines += [f"m,u1,i{k % 2},view,{day + k}" for k in range(4)] + ["m,u1,i0,view,86400000"]  # duplicate
    lines += [f"m,u2,i{k % 2},view,{day + k * day}" for k in range(4)] + ["m,u2,i9,view,86400500"]  # rare i9
    lines += [f"m,bot,i{k % 2},view,{2 * day + k}" for k in range(5)]
    lines += ["m,u3,i0,view,86400000", f"m,u1,i1,view,{40 * day}"]
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    raw = load_events(path)
    # Execute
    cleaned, steps = clean(raw, CleaningOptions(window_end_ms=30 * day, max_events_per_shopper_per_day=4,
                                                min_shopper_events=2, min_item_events=2))
    # Assert
    dropped = {s.name: (s.events_dropped, s.shoppers_dropped, s.items_dropped) for s in steps}
    assert dropped == {"outside the time window": (1, 0, 0), "exact duplicates": (1, 0, 0),
                       "bot-like shoppers": (5, 1, 0), "k-core": (2, 1, 1)}
    assert len(cleaned) == len(raw) - 9
    assert sorted(set(cleaned.user_names[cleaned.user].tolist())) == ["u1", "u2"]


def test_load_world_builds_the_synthetic_shape_from_a_real_file(rees46):
    # Prepare
    config = FedShopConfig(**TINY, data_path=str(rees46), partition="natural:brand")
    synthetic = generate(FedShopConfig(**TINY))
    # Execute
    data, report = load_real(config)
    merchant = merchant_data(config, "m1", data)
    # Assert: the same events back, merchants m0..m2 (brand m0..m2 by shopper count), public split from brand public
    assert len(data.events) == len(synthetic.events) and data.merchant_ids == ["m0", "m1", "m2"]
    assert set(data.events.merchant_id.tolist()) == {"m0", "m1", "m2", PUBLIC_MERCHANT}
    assert report.partition.names == {"m0": "brand = m0", "m1": "brand = m1", "m2": "brand = m2"}
    assert np.isnan(data.truth_purchase_prob).all() and np.isnan(data.catalogue.quality).all()
    items, categories, _ = vocabulary(merchant.facts)
    assert categories == [f"c{k}" for k in range(6)] and set(items) == set(synthetic.catalogue.item_ids.tolist())
    assert set(report.category_names.values()) == {f"c{k}" for k in range(6)}  # the file's ids, kept in the report
    assert 0 <= data.catalogue.price_band.min() and data.catalogue.price_band.max() == 9
    assert merchant.train and merchant.test and all(np.isnan(e.truth) for e in merchant.test)
    assert describe_counts(report)["cleaning: exact duplicates"] == 0
    # a base knows its catalogue: the fingerprint decides, not the synthetic knobs
    meta = {"catalogue-sha256": "0" * 64}
    with pytest.raises(Exception, match="catalogue facts or task tokens differ"):
        check_base_matches(meta, config, data)


def test_purchases_only_data_still_gives_examples(tmp_path):
    # Prepare: a CRM transactions table (each purchase is also a view)
    log = generate(FedShopConfig(**SMALL)).events
    path = write_format(log, tmp_path / "sales.csv", "transactions")[0]
    config = FedShopConfig(**SMALL, data_path=str(path), item_column="sku", partition="iid", min_shopper_events=4,
                           min_item_events=1)
    # Execute
    merchant = merchant_data(config, "m0", load_world(config))
    # Assert
    assert merchant.train and {e.target for e in merchant.train if e.task == "intent"} == {"yes"}


def test_config_refuses_bad_data_keys():
    for key, value, words in [("partition", "natural:", "natural:<column>"), ("partition", "kmeans", "natural:"),
                              ("data-format", "excel", "one of auto"), ("time-window-start", "last week", "ISO"),
                              ("event-map", "pv=view", "raw:canonical"), ("on-bad-rows", "ignore", "error, skip")]:
        with pytest.raises(ConfigError, match=key) as error:
            from_mapping({key: value})
        assert words in str(error.value)


def test_data_synth_and_inspect_commands(tmp_path):
    # Prepare
    out = tmp_path / "shop.csv"
    synth = subprocess.run([sys.executable, "-m", "server.cli", "data", "synth", "--config",
                            str(ROOT / "configs/tiny.toml"), "--out", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    # Execute
    inspect = subprocess.run([sys.executable, "-m", "server.cli", "data", "inspect", str(out), "--set",
                              "num-merchants=3", "--set", "partition=natural:merchant_id", "--out",
                              str(tmp_path / "report")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    missing = subprocess.run([sys.executable, "-m", "server.cli", "data", "inspect", str(tmp_path / "nope.csv")],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    # Assert
    assert synth.returncode == 0, synth.stderr
    assert next(csv.reader(out.open())) == ["merchant_id", "user_id", "item_id", "event", "timestamp", "price",
                                            "category"]
    assert inspect.returncode == 0, inspect.stderr
    report = (tmp_path / "report" / "data-report.md").read_text()
    assert "| m0 | merchant_id = m" in report and "k-core" in report and "Category mix" in report
    assert (tmp_path / "report" / "data-report.png").stat().st_size > 10_000
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "does not exist" in missing.stderr


def test_simulate_runs_end_to_end_on_a_rees46_file(rees46, tmp_path):
    # Prepare
    run_dir = tmp_path / "run"
    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "simulate", "--config", str(ROOT / "configs/tiny.toml"),
         "--set", f"data-path={rees46}", "--set", "partition=natural:brand", "--set", f"base-dir={tmp_path / 'base'}",
         "--set", "public-shoppers=37",  # the synthetic knob: a real log's public split has its own size
         "--run-dir", str(run_dir), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    public = {row["user_id"] for row in csv.DictReader(rees46.open()) if row["brand"] == PUBLIC_MERCHANT}
    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(public) > 37 and f"on the public split: {len(public)} shoppers," in done.stderr
    assert f"Pretrained on {len(public)} public shoppers" in (run_dir / "report.md").read_text()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]["metrics"]
    assert final["intent-auc"] > 0.55 and final["next-hr@10"] > final["next-popularity-hr@10"]  # it learnt
    assert "intent-oracle-auc" not in final and "next-oracle-hr@10" not in final  # no truth on real data
    assert set(records[-1]["merchants"]) == {"m0", "m1", "m2"}
    report = (run_dir / "report.md").read_text()
    assert "### Purchase intent" in report and "| Bayes oracle" not in report  # no oracle row without the truth


def test_item_ids_never_collide_with_a_task_category_band_level_or_churn_token():
    from shared.sources import item_tokens

    names = np.array(["i1", "sku-1", "s1", "x0.8", "b0", "churn:", "c3", "p7", "g2", "d4", "n10", "ld31", "ls49",
                      "a b"], dtype=object)
    tokens, renamed = item_tokens(names)
    assert tokens.tolist() == ["i1", "sku-1", "item:s1", "item:x0.8", "item:b0", "item:churn:", "item:c3", "item:p7",
                               "item:g2", "item:d4", "item:n10", "item:ld31", "ls49", "a_b"]  # ls48 is the top level
    assert renamed == 11


def test_the_world_is_built_once_per_process_and_again_when_its_data_changes(tmp_path):
    # Prepare
    import os

    from shared.config import FedShopConfig
    from shared.sources import DATA_KEYS, clear_world_cache, load_world

    config = FedShopConfig(num_merchants=2, shoppers_per_merchant=20, public_shoppers=20, num_items=30,
                           num_categories=3)
    # Execute / Assert: a key that does not shape the data reuses the world; one that does builds another
    first = load_world(config)
    assert load_world(config.replace(learning_rate=0.5, run_dir="elsewhere")) is first
    assert load_world(config.replace(drift=0.5)) is not first
    clear_world_cache()  # what bench/rounds.py does to time a first message
    assert load_world(config) is not first
    assert set(DATA_KEYS) <= set(config.to_flat())
    # a file is read again when it changes (size or modification time)
    path = tmp_path / "events.csv"
    rows = ["merchant_id,user_id,item_id,event,timestamp"] + [
        f"m{u % 2},u{u},i{(u + k) % 7},view,{1_700_000_000_000 + 60_000 * k}" for u in range(40) for k in range(6)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    real = config.replace(data_path=str(path), partition="natural:merchant_id", min_shopper_events=1,
                          min_item_events=1)
    loaded = load_world(real)
    assert load_world(real) is loaded
    path.write_text("\n".join(rows[:-6]) + "\n", encoding="utf-8")
    os.utime(path, ns=(1, 1))
    assert load_world(real) is not loaded and len(load_world(real).events) < len(loaded.events)


def _few_event_shoppers_log(path: Path, fmt: str) -> Path:
    """30 regular shoppers with 8 purchases each and 70 one-time customers (one purchase), items bought often."""
    start = 1_700_000_000_000
    visits = [(f"u{u}", k) for u in range(30) for k in range(8)] + [(f"u{u}", 0) for u in range(30, 100)]
    if fmt == "transactions":
        rows = ["customer_id,date,amount,sku"] + [
            f"{user},2023-11-{1 + k:02d} 10:00:00,9.50,i{(int(user[1:]) + k) % 5}" for user, k in visits]
    else:
        rows = ["merchant_id,user_id,item_id,event,timestamp"] + [
            f"m0,{user},i{(int(user[1:]) + k) % 5},purchase,{start + 86_400_000 * k}" for user, k in visits]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def _kept_shoppers(config: FedShopConfig) -> int:
    return len(np.unique(load_real(config)[0].events.user_id))


def test_default_cleaning_keeps_one_time_customers_of_a_transactions_log(tmp_path):
    # Prepare: a CRM export where most customers bought once (a view is added beside each purchase: 2 events)
    path = _few_event_shoppers_log(tmp_path / "sales.csv", "transactions")
    config = FedShopConfig(**SMALL, data_path=str(path), partition="iid", public_fraction=0.1)
    # Execute / Assert: the by-task default keeps every customer; an explicit 5 still drops the one-time ones
    assert config.min_shopper_events == 0
    assert _kept_shoppers(config) == 100
    assert _kept_shoppers(config.replace(min_shopper_events=5)) == 30


def test_default_cleaning_stops_before_dropping_most_shoppers_and_names_the_key(tmp_path):
    # Prepare: the same shoppers in an event log (not transactions), every task on
    path = _few_event_shoppers_log(tmp_path / "events.csv", "canonical")
    config = FedShopConfig(**SMALL, data_path=str(path), partition="iid", public_fraction=0.1)
    # Execute / Assert: the default 5-event k-core would drop 70 of 100 shoppers: refused with the counts and keys
    with pytest.raises(DataError) as refused:
        load_real(config)
    message = str(refused.value)
    assert str(path) in message and "70 of 100 shoppers (70%)" in message
    assert "min-shopper-events = 1" in message and "min-shopper-events = 5" in message
    # either key decides; a churn-only run keeps one-event shoppers by default
    assert _kept_shoppers(config.replace(min_shopper_events=1)) == 100
    assert _kept_shoppers(config.replace(min_shopper_events=5)) == 30
    assert _kept_shoppers(config.replace(tasks="churn")) == 100


def test_a_process_serves_a_merchant_s_data_and_encoding_again_until_a_key_or_its_file_changes(rees46, tmp_path):
    # Prepare: a real file copied where the test may touch it, and a tokenizer of its catalogue
    import os
    import shutil

    import torch

    from shared.data import served_merchant_data
    from shared.modeling import encode, encode_teaching
    from shared.tokenizer import build_tokenizer

    path = tmp_path / "2019-Oct.csv"
    shutil.copy(rees46, path)
    config = FedShopConfig(**TINY, data_path=str(path), partition="natural:brand")
    # Execute
    first = served_merchant_data(config, "m1")
    again = served_merchant_data(config, "m1")
    other_key = served_merchant_data(config.replace(history_length=2), "m1")
    tokenizer = build_tokenizer(*vocabulary(first.facts))
    teaching, encoded = encode_teaching(first, config, tokenizer)
    kept = encode_teaching(first, config, tokenizer)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file changed on disk
    after_edit = served_merchant_data(config, "m1")
    # Assert: the same objects while nothing changed; a changed key or file builds afresh, equal to merchant_data's
    assert again is first and other_key is not first and after_edit is not first
    def written(data):  # what an example says (its truth fields are NaN on a real log, and NaN != NaN)
        return [(e.task, e.user_id, e.source, e.target) for e in data.train]

    assert written(after_edit) == written(first) == written(merchant_data(config, "m1"))
    assert written(other_key) != written(first)  # history-length 2 writes other sources
    assert kept[0] is teaching and kept[1] is encoded and teaching == first.teaching(config)
    fresh = encode(teaching, tokenizer)
    assert torch.equal(encoded.input_ids, fresh.input_ids) and torch.equal(encoded.target_ids, fresh.target_ids)
    # a tokenizer with another vocabulary gets its own encoding
    smaller = build_tokenizer(*vocabulary(first.facts)[:1], [], [])
    assert encode_teaching(first, config, smaller)[1] is not encoded


def test_a_process_keeps_at_most_its_examples_budget_of_merchants(monkeypatch):
    # Prepare: a budget of examples that holds one tiny merchant's training examples and not two
    from shared import data as data_module

    config = FedShopConfig(**TINY)
    monkeypatch.setattr(data_module, "_SERVED", {})
    one = len(merchant_data(config, "m0").train)
    monkeypatch.setattr(data_module, "SERVED_EXAMPLES_KEPT", one + 1)
    # Execute
    first = data_module.served_merchant_data(config, "m0")
    data_module.served_merchant_data(config, "m1")
    # Assert: the newest merchant stays, the oldest went; asking for it again builds it afresh
    assert [key[2] for key in data_module._SERVED] == ["m1"]
    assert data_module.served_merchant_data(config, "m0") is not first
