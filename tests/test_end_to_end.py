"""`fedshop simulate --config configs/tiny.toml`: 3 merchants x 2 rounds through the real Flower simulation engine."""

import csv
import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from helpers import simulate
from safetensors.torch import load_file

from shared.config import load_config

pytestmark = pytest.mark.slow  # whole simulations through Flower: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


def test_simulate_tiny_writes_a_complete_run_directory(tiny_run, tiny_base, tmp_path):
    run_dir = tiny_run.path
    base_dir = Path(tiny_base.base_dir)

    config = load_config(run_dir / "config.toml")
    assert config.num_merchants == 3 and config.num_rounds == 2 and config.base_dir == str(base_dir)
    assert tomllib.loads((run_dir / "config.toml").read_text())["run-dir"] == str(run_dir)

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["scope"]) for r in records] == [
        (0, "evaluate"), (1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]
    final, merchants = records[-1]["metrics"], records[-1]["merchants"]
    # the summary is the per-merchant values weighted by test shoppers, and the model learnt: better than chance
    # (AUC 0.5) and than recommending the most popular items
    for key in ("intent-auc", "next-hr@10", "churn-auc"):
        expected = sum(m[key] * m["num-examples"] for m in merchants.values()) / sum(
            m["num-examples"] for m in merchants.values())
        assert math.isclose(final[key], expected, rel_tol=1e-12), key
    assert final["intent-auc"] > 0.55 and final["next-hr@10"] > final["next-popularity-hr@10"] + 0.1
    assert final["next-oracle-hr@10"] >= final["next-hr@10"] - 0.2
    assert set(records[-1]["merchants"]) == {"m0", "m1", "m2"}

    rows = list(csv.DictReader((run_dir / "privacy.csv").open()))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"trained"}
    for merchant in ("m0", "m1", "m2"):
        epsilons = [float(r["epsilon"]) for r in rows if r["merchant"] == merchant]
        assert 0 < epsilons[0] < epsilons[1] <= config.target_epsilon  # composed, within budget
    assert all(r["unit"] == "event" and r["accountant"] == "rdp" and float(r["delta"]) == config.target_delta
               for r in rows)

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    report = (run_dir / "report.md").read_text()
    assert "Bayes oracle" in report and "popularity" in report
    assert f"delta = {config.target_delta:g}" in report and "unit" in report and "rdp accountant" in report
    assert tiny_run.ray_left_running == []  # the simulation left no Ray process of its own behind

    # A resumed run carries every merchant's ledger on: the budget is spent, so every merchant declines (one round
    # shows it; a second declines the same way)
    resumed = tmp_path / "resumed"
    done = simulate(resumed, f"base-dir={base_dir}", f"resume-from={run_dir}", "num-rounds=1")
    assert done.returncode == 0, done.stderr[-3000:]
    again = list(csv.DictReader((resumed / "privacy.csv").open()))
    assert len(again) == 3 and {r["status"] for r in again} == {"declined"}
    spent = {r["merchant"]: float(r["epsilon"]) for r in rows if r["round"] == "2"}
    assert all(math.isclose(float(r["epsilon"]), spent[r["merchant"]], rel_tol=1e-9) for r in again)
    before = load_file(str(adapter / "adapter_model.safetensors"))
    after = load_file(str(resumed / "adapter" / "adapter_model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_user_mistake_is_one_clear_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("target-epsilon = 0\n")
    done = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--config", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"{bad}: config key 'target-epsilon' = 0" in done.stderr and "(0, 1e+06]" in done.stderr
