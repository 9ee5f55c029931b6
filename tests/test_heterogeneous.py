"""Merchants that differ on purpose, through the real Flower simulation: one with targets the public split never
viewed and one without, one whose churn labels are all one class, one tiny merchant."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from shared.config import FedShopConfig
from shared.formats import write_format
from shared.synthetic import PUBLIC_MERCHANT, generate
from tests.conftest import TINY

pytestmark = pytest.mark.slow  # a whole simulation through Flower
ROOT = Path(__file__).resolve().parents[1]
DAY_MS = 86_400_000


def _heterogeneous_log(path: Path) -> Path:
    """The tiny synthetic world with four merchants, edited so that they differ: `novel` buys its five favourite
    items under ids the public split never saw, `plain` only views and buys items the public split saw, `loyal`'s
    shoppers come back every day until the log ends (no churn), `tiny` keeps three shoppers."""
    write_format(generate(FedShopConfig(**{**TINY, "num_merchants": 4})).events, path, "canonical")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields, rows = reader.fieldnames, list(reader)
    names = dict(zip(sorted({r["merchant_id"] for r in rows} - {PUBLIC_MERCHANT}), ("novel", "plain", "loyal", "tiny"),
                     strict=True))
    for row in rows:
        row["merchant_id"] = names.get(row["merchant_id"], row["merchant_id"])
    public_items = {r["item_id"] for r in rows if r["merchant_id"] == PUBLIC_MERCHANT}
    favourites = [i for i, _ in Counter(r["item_id"] for r in rows if r["merchant_id"] == "novel").most_common(5)]
    tiny_shoppers = sorted({r["user_id"] for r in rows if r["merchant_id"] == "tiny"})[:3]
    end = max(int(r["timestamp"]) for r in rows)
    kept, fallback = [], sorted(public_items)[0]
    for row in rows:
        merchant = row["merchant_id"]
        if merchant == "tiny" and row["user_id"] not in tiny_shoppers:
            continue
        if merchant == "novel" and row["item_id"] in favourites:
            row["item_id"] = f"new-{row['item_id']}"
        if merchant == "plain" and row["item_id"] not in public_items:
            row["item_id"] = fallback
        kept.append(row)
    loyal_first = {}
    for row in kept:
        if row["merchant_id"] == "loyal":
            loyal_first.setdefault(row["user_id"], row)
    for first in loyal_first.values():  # a view every day from the shopper's first event to the log's end
        for day in range((end - int(first["timestamp"])) // DAY_MS + 1):
            kept.append({**first, "event": "view", "timestamp": str(int(first["timestamp"]) + day * DAY_MS + 1)})
    kept.sort(key=lambda r: (r["user_id"], int(r["timestamp"])))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    return path


def test_merchants_that_differ_on_purpose_complete_a_run_with_pooled_metrics(tmp_path):
    # Prepare
    log = _heterogeneous_log(tmp_path / "shops.csv")
    run_dir = tmp_path / "run"
    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "simulate", "--config", str(ROOT / "configs/tiny.toml"),
         "--set", f"data-path={log}", "--set", "partition=natural:merchant_id", "--set", "num-merchants=4",
         "--set", "min-shopper-events=1", "--set", "min-item-events=1", "--set", f"base-dir={tmp_path / 'base'}",
         "--run-dir", str(run_dir), "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    # Assert: the run completes and every merchant is in the final evaluation and in the ledger of every round
    assert done.returncode == 0, done.stderr[-3000:]
    assert "does not exist yet: pretraining it" in done.stderr  # one command pretrains its base, then runs
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    merchants = final["merchants"]
    assert final["scope"] == "evaluate" and set(merchants) == {"m0", "m1", "m2", "m3"}
    ledger = list(csv.DictReader((run_dir / "privacy.csv").open()))
    rounds = {int(r["round"]) for r in ledger}
    assert {(r["merchant"], int(r["round"])) for r in ledger} == {(f"m{k}", n) for k in range(4) for n in rounds}
    assert rounds == {1, 2}
    # the merchants really differ: some report next-new and churn, others cannot
    new_key = "next-new-hr@10"
    with_new = {m for m, values in merchants.items() if new_key in values}
    with_churn = {m for m, values in merchants.items() if values.get("churn-auc") is not None}  # null: one class
    assert with_new and with_new != set(merchants)
    assert with_churn and with_churn != set(merchants)
    sizes = sorted(values["num-examples"] for values in merchants.values())
    assert sizes[0] * 5 < sizes[1]  # the tiny merchant
    # the report's pooled metrics: each family over the merchants that report it
    assert all(isinstance(final["metrics"].get(key), float) for key in (new_key, "churn-auc", "intent-auc"))
    assert "### Purchase intent" in (run_dir / "report.md").read_text()
