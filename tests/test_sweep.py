"""`fedshop sweep` on the tiny config: real runs, one of them made to fail, the sweep goes on and reports it."""

import csv
import json
import math
import subprocess
from pathlib import Path

import pytest

from server import sweep
from server.cli import main
from shared.config import to_toml

pytestmark = pytest.mark.slow  # whole simulations through Flower: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]


def test_a_sweep_reports_a_failed_run_and_goes_on(tiny_base, tmp_path, monkeypatch):
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(to_toml(tiny_base.replace(audit_holdout=0.2, progress=False)))
    real_run = subprocess.run

    def run(command, **kwargs):
        if "target-epsilon=1.0" in command:  # this budget's run dies, as a crashed simulation would
            return subprocess.CompletedProcess(command, returncode=1)
        return real_run(command, cwd=ROOT, **kwargs)

    monkeypatch.setattr(sweep.subprocess, "run", run)
    stale = tmp_path / "out" / "eps-4"  # a sweep directory used before: its run is moved aside, not written over
    stale.mkdir(parents=True)
    (stale / "report.md").write_text("an earlier sweep's run\n")
    rows = sweep.run_sweep(config_file, ["audit-canaries=20"], sweep.parse_epsilons("inf,4,1"), tmp_path / "out")

    assert [r["target_epsilon"] for r in rows] == ["1", "4", "inf"]
    assert [r["status"] for r in rows] == ["simulate failed", "ok", "ok"]
    table = list(csv.DictReader(open(tmp_path / "out" / "sweep.csv")))
    assert [t["status"] for t in table] == ["simulate failed", "ok", "ok"]
    private, public = rows[1], rows[2]
    assert 0 < private["epsilon_max"] <= 4.0 and private["unit"] == "event" and private["accountant"] == "rdp"
    assert public["unit"] == "none" and math.isinf(public["epsilon_max"])
    for row in (private, public):  # the table holds each run's own final evaluation and audit
        run_dir = tmp_path / "out" / f"eps-{row['target_epsilon']}"
        final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
        audit = json.loads((run_dir / "audit.json").read_text())
        assert row["intent-auc"] == final["metrics"]["intent-auc"] and final["scope"] == "evaluate"
        assert row["mia-auc"] == audit["mia-auc"] and row["eps-emp"] == audit["eps-emp"]
    assert private["eps-emp"] <= private["epsilon_max"]  # the empirical lower bound stays under the accounted epsilon
    (aside,) = (tmp_path / "out").glob("eps-4.old-*")
    assert (aside / "report.md").read_text() == "an earlier sweep's run\n"
    text = (tmp_path / "out" / "sweep.md").read_text()
    assert "simulate failed" in text and "delta 1e-05" in text and "rdp accountant" in text
    assert (tmp_path / "out" / "privacy_utility.png").stat().st_size > 1000
    assert (tmp_path / "out" / "eps-4" / "audit.json").is_file()


def test_sweep_and_audit_refuse_bad_input_in_one_line(tmp_path, capsys):
    for args, message in (
        (["sweep", "--epsilons", "1,abc"], "--epsilons: 'abc' is not a number or inf"),
        (["sweep", "--epsilons", "0,1"], "must be > 0"),
        (["sweep", "--epsilons", "1", "--set", "privacy-unit=user"], "expected one of event, shopper, merchant"),
        (["audit", str(tmp_path)], f"{tmp_path} is not a fedshop run directory"),
    ):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err, err
