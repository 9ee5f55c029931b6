"""Merchant faults injected for real (`fault-injection`) in Flower's simulation engine: a merchant that raises,
exits its process, hangs past `round-timeout` or sends garbage. The round goes on with the others, each failure is
recorded per merchant and round, a failed merchant is charged its round as if it finished, and too few merchants
stop the run with one line and a non-zero exit."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, simulate
from safetensors.torch import load_file

from shared.ledger import history_from_ledger
from shared.privacy import epsilon_of
from shared.rundir import RunDirectory

pytestmark = pytest.mark.slow  # whole simulations through Flower


def _rows(run) -> dict[tuple[str, int], dict[str, str]]:
    return {(r["merchant"], int(r["round"])): r for r in RunDirectory(run).read_privacy()}


def _steps(row: dict[str, str]) -> tuple[float, float, int]:
    return float(row["noise_multiplier"]), float(row["sample_rate"]), int(row["steps"])


def test_every_fault_kind_fails_one_merchant_and_the_run_completes_with_the_others(tiny_base, tmp_path):
    # Prepare: 5 merchants x 3 rounds (a 60 s timeout: a merchant of this tiny run answers in seconds alone, but a
    # suite beside other heavy jobs on 2 cores has seen one exceed 30 s); m0 sends garbage in round 1; in round 2 m1
    # hangs past the timeout, m2 raises, m3's process exits, and m0, m4 carry the round
    run = tmp_path / "run"
    # Execute
    done = simulate(run, f"base-dir={tiny_base.base_dir}", "num-merchants=5", "num-rounds=3", "round-timeout=60",
                    "fault-injection=garbage@m0:1,hang@m1:2,raise@m2:2,exit@m3:2")
    # Assert: the run finished every round
    assert done.returncode == 0, done.stderr[-3000:]
    rows = _rows(run)
    records = RunDirectory(run).read_metrics()
    trains = {r["round"]: r for r in records if r["scope"] == "train"}
    # garbage: m0 trained (charged as trained) and its NaN update was rejected, the round aggregated the others
    assert rows[("m0", 1)]["status"] == "trained"
    assert [r["merchant"] for r in trains[1]["rejected"]] == ["m0"] and "NaN" in trains[1]["rejected"][0]["reason"]
    assert trains[1]["metrics"]["merchants-aggregated"] == 4
    # round 2: m1, m2, m3 failed, each for its own reason; besides them at most the one message Ray handed to the
    # exited merchant's actor while it restarted (measured: bench/faults.py), and the round aggregated the rest
    reasons = {f["merchant"]: f["reason"] for f in trains[2]["failed"]}
    assert {"m1", "m2", "m3"} <= set(reasons) and len(reasons) <= 4
    assert reasons["m1"] == "no reply within round-timeout = 60 s"
    assert "injected fault: merchant m2 raised in round 2" in reasons["m2"]
    assert all(reasons[m].startswith("Actor") for m in set(reasons) - {"m1", "m2"})  # a merchant process died
    assert trains[2]["metrics"]["merchants-aggregated"] == 5 - len(reasons)
    for merchant in sorted(reasons):
        failed, first = rows[(merchant, 2)], rows[(merchant, 1)]
        # charged as if it finished: its round-1 schedule, and the epsilon of both rounds
        assert failed["status"] == "failed" and _steps(failed) == _steps(first) and _steps(first)[2] > 0
        assert float(failed["epsilon"]) == pytest.approx(epsilon_of([_steps(first)] * 2, 1e-5, "rdp"), rel=1e-9)
        # round 3: the merchant trained again and its own epsilon composes the failed round (three rounds), even
        # where Flower dropped its state with the failure (raise, exit)
        third = rows[(merchant, 3)]
        assert third["status"] == "trained"
        assert float(third["epsilon"]) == pytest.approx(epsilon_of([_steps(first)] * 3, 1e-5, "rdp"), rel=1e-6)
        noise, rate, steps = _steps(first)
        assert history_from_ledger(run, merchant)[1] == [(noise, rate, 3 * steps)]  # merged as Opacus merges
    # every merchant took part in round 3's aggregate and evaluation (the exited merchant's actor was restarted)
    assert trains[3]["metrics"]["merchants-aggregated"] == 5 and not trains[3]["failed"]
    assert set([r for r in records if r["scope"] == "evaluate"][-1]["merchants"]) == {f"m{i}" for i in range(5)}
    report = (run / "report.md").read_text()
    assert "### Merchant failures" in report and "Conservative rule:" in report
    assert "| m2 | 2 |" in report and "Rejected updates" in report


def test_too_few_replies_stop_the_run_with_one_line_and_a_resumable_checkpoint(tiny_base, tmp_path):
    # Prepare: 3 merchants, all three needed; m1 raises in round 2
    run = tmp_path / "run"
    # Execute
    done = simulate(run, f"base-dir={tiny_base.base_dir}", "min-merchants=3", "num-rounds=3",
                    "fault-injection=raise@m1:2")
    # Assert: non-zero exit; the last line names the round, who failed and why, and the last complete checkpoint
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == ("fedshop: error: round 2: 2 valid merchant update(s), fewer than min-merchants = 3 (m1 failed: "
                    "injected fault: merchant m1 raised in round 2 after training); the run stopped, "
                    "checkpoints/round-1 is the last complete round (fedshop simulate --resume RUN_DIR continues "
                    "from it)"), last
    assert "TooFewMerchants" not in done.stderr and "server_app.py" not in done.stderr  # no server traceback
    # consistent run directory: round 1 complete, round 2's ledger rows kept, no round-2 checkpoint, no adapter
    assert (run / "checkpoints/round-1").is_dir() and not (run / "checkpoints/round-2").exists()
    assert not (run / "adapter").exists()
    rows = _rows(run)
    assert {m: rows[(m, 2)]["status"] for m in ("m0", "m1", "m2")} == {"m0": "trained", "m1": "failed",
                                                                        "m2": "trained"}
    assert not math.isnan(float(rows[("m1", 2)]["epsilon"])) and int(rows[("m1", 2)]["steps"]) > 0
    stop = RunDirectory(run).read_metrics()[-1]
    assert stop["scope"] == "stopped" and stop["last-complete-round"] == 1
    assert "The run stopped:" in (run / "report.md").read_text()
    json.dumps(stop)  # a plain JSON record

    # Execute: finish it from checkpoints/round-1; round 2's rows stay (m0 and m2 trained, m1 charged), so the two
    # rounds left are numbered 3 and 4
    resumed = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--resume", str(run), "--no-progress"],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Assert
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and (run / "checkpoints/round-3").is_dir()
    # round 2 aggregated nothing: the adapter it left is round 1's, now kept as its checkpoint
    one, two = (load_file(str(run / f"checkpoints/round-{n}/adapter_model.safetensors")) for n in (1, 2))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    plan = json.loads((run / "plan.json").read_text())
    assert plan["last-round"] == 4 and [(r["checkpoint"], r["first-round"]) for r in plan["resumed"]] == [(1, 3)]
    rows = _rows(run)
    for merchant in ("m0", "m1", "m2"):
        schedule = _steps(rows[(merchant, 1)])
        three = epsilon_of([schedule] * 3, 1e-5, "rdp")
        # the stopped round's steps count (trained or charged): round 3 is each merchant's third round of the three
        # its noise was calibrated for, and round 4 would exceed the budget, so it declines at the same epsilon
        assert rows[(merchant, 3)]["status"] == "trained"
        assert float(rows[(merchant, 3)]["epsilon"]) == pytest.approx(three, rel=1e-9)
        assert rows[(merchant, 4)]["status"] == "declined" and int(rows[(merchant, 4)]["steps"]) == 0
        assert float(rows[(merchant, 4)]["epsilon"]) == pytest.approx(three, rel=1e-9) and three <= 8.0
        assert history_from_ledger(run, merchant)[1] == [(schedule[0], schedule[1], 3 * schedule[2])]
