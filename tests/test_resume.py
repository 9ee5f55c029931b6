"""A run really killed (SIGKILL to the server process) after round 1 and finished with `fedshop simulate --resume`
ends with the same adapter, ledger and metrics as the same run left alone (the session's `tiny_run`)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import ROOT, ray_processes_of, simulate_command
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _ledger(run) -> list[tuple[str, ...]]:
    """Every ledger row, sorted (merchants append their rows in the order their replies arrive)."""
    with (run / "privacy.csv").open(newline="") as handle:
        return sorted(tuple(row.values()) for row in csv.DictReader(handle))


def _metrics(run) -> list[tuple[int, str, dict]]:
    """(round, scope, metrics) of every record, without the wall times."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["scope"], {k: v for k, v in r["metrics"].items() if "seconds" not in k}) for r in records]


@pytest.fixture(scope="module")
def killed_and_resumed(tiny_base, tmp_path_factory):
    run = tmp_path_factory.mktemp("killed") / "run"
    process = subprocess.Popen(simulate_command(run, f"base-dir={tiny_base.base_dir}"), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = run / "checkpoints" / "round-1" / "adapter_model.safetensors"
    deadline = time.monotonic() + 600
    while not checkpoint.is_file() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before round 1 was checkpointed"
    os.kill(process.pid, signal.SIGKILL)  # the server process only, as a crash would take it
    process.wait()
    stopped = {"checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
               "report": (run / "report.md").exists(), "ledger": _ledger(run)}
    resumed = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--resume", str(run), "--no-progress"],
                             cwd=ROOT, capture_output=True, text=True, timeout=900)
    return run, stopped, resumed, process.pid


def test_the_killed_run_had_stopped_after_round_1(killed_and_resumed):
    _, stopped, _, _ = killed_and_resumed
    assert "round-1" in stopped["checkpoints"] and "round-2" not in stopped["checkpoints"]
    assert not stopped["report"]
    assert {row[1] for row in stopped["ledger"]} == {"1"}  # round 2's replies never reached the ledger


def test_resume_ends_bit_exact_with_the_run_left_alone(killed_and_resumed, tiny_run):
    run, _, resumed, _ = killed_and_resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr and "from checkpoints/round-1" in resumed.stderr
    alone, after = (load_file(str(r / "adapter" / "adapter_model.safetensors")) for r in (tiny_run.path, run))
    assert alone.keys() == after.keys() and all(torch.equal(alone[k], after[k]) for k in alone)
    for n in (0, 1, 2):  # every round's checkpoint, the ones written after the resume included
        a, b = (load_file(str(r / "checkpoints" / f"round-{n}" / "adapter_model.safetensors"))
                for r in (tiny_run.path, run))
        assert all(torch.equal(a[k], b[k]) for k in a), n
    # every ledger row to the last digit of epsilon, and every metric of every round
    assert _ledger(run) == _ledger(tiny_run.path)
    assert _metrics(run) == _metrics(tiny_run.path)


def test_the_report_and_plan_say_the_run_was_resumed(killed_and_resumed):
    run, _, resumed, pid = killed_and_resumed
    plan = json.loads((run / "plan.json").read_text())
    assert plan["last-round"] == 2 and [(r["checkpoint"], r["first-round"]) for r in plan["resumed"]] == [(1, 2)]
    assert "**Resumed**" in (run / "report.md").read_text() and "`checkpoints/round-1`" in \
        (run / "report.md").read_text()
    # resuming a finished run is refused, naming what would continue it
    again = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--resume", str(run)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "nothing to resume" in again.stderr and "Traceback" not in again.stderr
    assert not ray_processes_of(pid)  # the killed server's Ray session did not outlive it
