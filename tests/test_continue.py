"""Per-round checkpoints (`export --round N`) and continued training from an export (`init-adapter`): the adapter a
continued run starts from is the export's, and every merchant's epsilon composes the steps of both runs exactly as
one Opacus accountant fed all of them would."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant
from safetensors.torch import load_file

from server.continuation import check_init_adapter
from server.export import export_run
from server.manifest import verify
from shared.config import ConfigError, load_config
from shared.errors import UserError
from shared.ledger import history_from_ledger, merged_history

pytestmark = pytest.mark.slow  # whole simulations through Flower: `pytest -m "not slow"` skips them

ROOT = Path(__file__).resolve().parents[1]
FIRST_BUDGET, SECOND_BUDGET = 8.0, 16.0  # the session run's budget (configs/tiny.toml's default), then more


def _simulate(run: Path, base: Path, *sets: str) -> None:
    command = [sys.executable, "-m", "server.cli", "simulate", "--config", str(ROOT / "configs/tiny.toml"),
               "--set", f"base-dir={base}", "--run-dir", str(run), "--no-progress"]
    command += [a for s in sets for a in ("--set", s)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _steps(rows: list[dict[str, str]], merchant: str) -> list[tuple[float, float, int]]:
    return [(float(r["noise_multiplier"]), float(r["sample_rate"]), int(r["steps"])) for r in rows
            if r["merchant"] == merchant and r["status"] == "trained"]


def _independent_epsilon(steps: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    for noise, rate, count in steps:
        for _ in range(count):
            accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


@pytest.fixture(scope="module")
def first_run(tiny_run):
    """The session's finished 2-round tiny run (3 merchants, DP on, budget FIRST_BUDGET, on the session's base):
    read only; the tests export it, copy it or continue it elsewhere, never write into it."""
    assert load_config(tiny_run.path / "config.toml").target_epsilon == FIRST_BUDGET
    return tiny_run.path


@pytest.fixture(scope="module")
def continued(first_run, tiny_base, tmp_path_factory):
    """The first run exported, then continued for one round on new data: a fourth merchant joins."""
    tmp = tmp_path_factory.mktemp("continued")
    export = export_run(first_run, tmp / "export")
    _simulate(tmp / "run", Path(tiny_base.base_dir), "num-merchants=4", "num-rounds=1",
              f"target-epsilon={SECOND_BUDGET}", f"init-adapter={export}")
    return export, tmp / "run"


def test_every_round_is_checkpointed_and_export_round_takes_that_adapter(first_run, tmp_path):
    # Prepare
    checkpoints = sorted(p.name for p in (first_run / "checkpoints").iterdir())
    # Execute
    out = export_run(first_run, tmp_path / "round1", round=1)
    # Assert
    assert checkpoints == ["round-0", "round-1", "round-2"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (first_run / "checkpoints" / "round-2" / name).is_file()
    exported = (out / "adapter_model.safetensors").read_bytes()
    assert exported == (first_run / "checkpoints/round-1/adapter_model.safetensors").read_bytes()
    assert exported != (first_run / "adapter/adapter_model.safetensors").read_bytes()
    assert (first_run / "checkpoints/round-2/adapter_model.safetensors").read_bytes() == \
        (first_run / "adapter/adapter_model.safetensors").read_bytes()  # the last round is the final adapter
    rows = _rows(first_run / "privacy.csv")
    upto = [r for r in rows if int(r["round"]) <= 1]
    spent = [float(r["epsilon"]) for r in upto]
    card = (out / "README.md").read_text()
    assert f"| epsilon per merchant, max / mean | {max(spent):.3f} / {sum(spent) / len(spent):.3f} |" in card
    assert max(spent) < max(float(r["epsilon"]) for r in rows)  # round 2 spent more
    assert "round 1 of 2" in card and "| rounds | 1 |" in card
    assert _rows(out / "privacy.csv") == upto  # the ledger travels, cut at the exported round
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["round"] == 1 and {"privacy.csv", "run-config.toml"} <= set(manifest["files"])
    assert verify(out) == []


def test_a_missing_round_is_refused_listing_the_available_ones(first_run, tmp_path):
    with pytest.raises(UserError, match=r"no checkpoint of round 7; available rounds: 0, 1, 2"):
        export_run(first_run, tmp_path / "x", round=7)


def test_continued_run_starts_from_the_export_and_composes_epsilon_over_both_runs(first_run, continued):
    # Prepare
    export, run = continued
    config = load_config(run / "config.toml")
    before, after = _rows(export / "privacy.csv"), _rows(run / "privacy.csv")
    # Execute: one accountant per merchant, fed every step of both runs
    expected = {m: _independent_epsilon(_steps(before, m) + _steps(after, m), config.target_delta)
                for m in ("m0", "m1", "m2", "m3")}
    # Assert
    start = load_file(str(run / "checkpoints/round-0/adapter_model.safetensors"))
    exported = load_file(str(export / "adapter_model.safetensors"))
    assert start.keys() == exported.keys() and all(torch.equal(start[k], exported[k]) for k in start)
    assert {r["status"] for r in after} == {"trained"} and {r["merchant"] for r in after} == {"m0", "m1", "m2", "m3"}
    for merchant, epsilon in expected.items():
        reported = float(next(r["epsilon"] for r in after if r["merchant"] == merchant))
        assert math.isclose(reported, epsilon, abs_tol=1e-6), merchant
        assert merged_history(_steps(before, merchant) + _steps(after, merchant)) == \
            history_from_ledger(run, merchant)[1]  # the same steps, merged as Opacus's accountant merges them
    assert not _steps(before, "m3")  # new to the federation: started from zero
    old = max(float(r["epsilon"]) for r in before)
    assert FIRST_BUDGET - 0.1 < old <= FIRST_BUDGET < max(expected.values()) <= SECOND_BUDGET
    report = (run / "report.md").read_text()
    assert f"Continued from export `{export.resolve()}`" in report and f"max {old:.3f}" in report


def test_the_export_of_a_continued_run_states_and_carries_the_total(continued, tmp_path):
    export, run = continued
    again = export_run(run, tmp_path / "again")
    card = (again / "README.md").read_text()
    assert "Continued from export" in card
    assert "continued-from.json" in json.loads((again / "manifest.json").read_text())["files"]
    # a chain: continuing this export would compose both earlier runs' steps
    assert history_from_ledger(again, "m0")[1] == history_from_ledger(run, "m0")[1]
    every_row = _steps(_rows(export / "privacy.csv"), "m0") + _steps(_rows(run / "privacy.csv"), "m0")
    assert len(every_row) == 3 and history_from_ledger(again, "m0")[1] == merged_history(every_row)


def test_init_adapter_refuses_a_changed_export_another_base_and_another_lora_shape(first_run, continued, tiny_base,
                                                                                 tmp_path):
    # Prepare
    export, _ = continued
    base = Path(tiny_base.base_dir)
    config = load_config(ROOT / "configs/tiny.toml", [f"base-dir={base}", f"init-adapter={export}"])
    check_init_adapter(config)  # the intact export fits
    tampered = tmp_path / "tampered"
    shutil.copytree(export, tampered)
    weights = bytearray((tampered / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (tampered / "adapter_model.safetensors").write_bytes(bytes(weights))
    other_base = tmp_path / "other-base"
    shutil.copytree(base, other_base)
    weights = bytearray((other_base / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (other_base / "model.safetensors").write_bytes(bytes(weights))
    # Execute / Assert
    with pytest.raises(UserError, match="adapter_model.safetensors: sha256 differs from the manifest"):
        check_init_adapter(config.replace(init_adapter=str(tampered)))
    with pytest.raises(UserError, match="is not the base this adapter was trained on"):
        check_init_adapter(config.replace(base_dir=str(other_base)))
    with pytest.raises(UserError, match=r"lora-r = 8 there, 4 here; aggregation = 'ffa' there, 'fedavg' here"):
        check_init_adapter(config.replace(lora_r=4, aggregation="fedavg"))
    with pytest.raises(ConfigError, match="'resume-from' and 'init-adapter' cannot both be set"):
        config.replace(resume_from=str(first_run))
    done = subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--config", str(ROOT / "configs/tiny.toml"),
                           "--set", f"base-dir={base}", "--init-adapter", str(tampered), "--run-dir",
                           str(tmp_path / "refused")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "does not match its manifest" in done.stderr and not (tmp_path / "refused").exists()


def test_carried_histories_chain_and_include_the_servers_merchant_level_rows(tmp_path):
    # Prepare: an export of a run that itself continued another, with central DP rows (merchant `all`)
    columns = "merchant,round,noise_multiplier,sample_rate,steps,epsilon,delta,unit,accountant,status\n"
    (tmp_path / "privacy.csv").write_text(
        columns + "m0,1,1.1,0.25,4,0.9,1e-05,event,rdp,trained\n"
        "all,1,2.0,1.0,1,0.5,1e-05,merchant,rdp,released\n"
        "m0,2,1.1,0.25,0,0.9,1e-05,event,rdp,declined\n")
    (tmp_path / "continued-from.json").write_text(json.dumps({"histories": {
        "m0": {"noise-multiplier": 1.3, "history": [[1.3, 0.2, 5]]},
        "m9": {"noise-multiplier": 0.9, "history": [[0.9, 0.5, 2]]},
        "all": {"noise-multiplier": 2.0, "history": [[2.0, 1.0, 3]]}}}))
    # Execute / Assert
    assert history_from_ledger(tmp_path, "m0") == (1.1, [(1.3, 0.2, 5), (1.1, 0.25, 4)])
    assert history_from_ledger(tmp_path, "m9") == (0.9, [(0.9, 0.5, 2)])  # not in this run, still carried
    assert history_from_ledger(tmp_path, "all") == (2.0, [(2.0, 1.0, 4)])  # equal consecutive steps merge
    assert history_from_ledger(tmp_path, "m5") == (None, [])


def test_resuming_in_place_appends_to_the_ledger_and_composes_epsilon_over_every_row(first_run, tiny_base, tmp_path):
    # Prepare: a copy of the finished 2-round run (budget 8), resumed in its own directory for one round (budget 16)
    run = tmp_path / "run"
    shutil.copytree(first_run, run)
    ledger, metrics = (run / "privacy.csv").read_bytes(), (run / "metrics.jsonl").read_bytes()
    report = (run / "report.md").stat()
    # Execute
    _simulate(run, Path(tiny_base.base_dir), f"resume-from={run}", "num-rounds=1", f"target-epsilon={SECOND_BUDGET}")
    # Assert: nothing before was rewritten; round 3 follows round 2 everywhere
    rows = _rows(run / "privacy.csv")
    assert (run / "privacy.csv").read_bytes().startswith(ledger) and (run / "metrics.jsonl").read_bytes().startswith(
        metrics)
    assert [r["round"] for r in rows] == ["1"] * 3 + ["2"] * 3 + ["3"] * 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["scope"]) for r in records][-2:] == [(3, "train"), (3, "evaluate")]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-0", "round-1", "round-2", "round-3"]
    assert (run / "checkpoints/round-3/adapter_model.safetensors").read_bytes() == \
        (run / "adapter/adapter_model.safetensors").read_bytes()
    assert (run / "report.md").stat().st_ino != report.st_ino and "Resumed in place at round 3" in (
        run / "report.md").read_text()
    # every merchant's epsilon is one Opacus accountant fed every trained row, the first run's included
    delta = load_config(run / "config.toml").target_delta
    for merchant in ("m0", "m1", "m2"):
        reported = float(rows[-1 - [r["merchant"] for r in reversed(rows)].index(merchant)]["epsilon"])
        assert len(_steps(rows, merchant)) == 3
        assert math.isclose(reported, _independent_epsilon(_steps(rows, merchant), delta), rel_tol=1e-12), merchant
        before = [float(r["epsilon"]) for r in _rows(first_run / "privacy.csv") if r["merchant"] == merchant]
        assert reported > max(before)
    assert not (run / "continued-from.json").exists()  # in place, the ledger itself holds every step
