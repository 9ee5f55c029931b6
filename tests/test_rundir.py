"""The run directory never loses a run: the ledger and the metrics are append-only, a fresh run refuses a directory
that holds one (`--force` moves it aside), a run resuming its own directory numbers its rounds on, and `simulate`
succeeds only on a report written by this run."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server.cli import _claim_run_dir, main
from shared.config import FedShopConfig, to_toml
from shared.errors import UserError
from shared.files import write_text_atomic
from shared.ledger import PRIVACY_COLUMNS, history_from_ledger
from shared.rundir import RunDirectory

HEADER = ",".join(PRIVACY_COLUMNS) + "\n"
LEDGER = HEADER + ("m0,1,1.1,0.25,4,0.5,1e-05,event,rdp,trained\n"
                   "m0,2,1.1,0.25,4,0.7,1e-05,event,rdp,trained\n"
                   "m1,2,1.2,0.5,3,0.6,1e-05,event,rdp,trained\n")


def _finished_run(path: Path, config: FedShopConfig) -> Path:
    """A directory shaped like a finished 2-round run (ledger, metrics, report, adapter, config, references)."""
    (path / "adapter").mkdir(parents=True)
    save_file({"lora_A": torch.zeros(2, 2)}, path / "adapter" / "adapter_model.safetensors")  # resume reads it
    (path / "privacy.csv").write_text(LEDGER)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "scope": "evaluate", "metrics": {}}) + "\n"
                                                for r in (0, 1, 2)))
    (path / "report.md").write_text("# the first run's report\n")
    (path / "references.json").write_text("{}")
    (path / "config.toml").write_text(to_toml(config.replace(run_dir=str(path))))
    return path


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_a_fresh_run_refuses_a_directory_holding_a_run_and_changes_nothing(tmp_path):
    # Prepare
    config = FedShopConfig(run_dir=str(tmp_path / "run"))
    run = _finished_run(tmp_path / "run", config)
    before = _snapshot(run)
    # Execute / Assert
    with pytest.raises(UserError, match=f"run directory {run} already holds a run .*--force.*resume-from={run}"):
        RunDirectory(run).start(config)
    with pytest.raises(UserError, match="already holds a run"):
        _claim_run_dir(config, force=False)
    assert _snapshot(run) == before


def test_force_moves_the_old_run_aside_whole(tmp_path):
    # Prepare
    config = FedShopConfig(run_dir=str(tmp_path / "run"))
    run = _finished_run(tmp_path / "run", config)
    before = _snapshot(run)
    # Execute
    _claim_run_dir(config, force=True)
    offset = RunDirectory(run).start(config)
    # Assert: the old run is intact beside the new, empty one
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert _snapshot(aside) == before
    assert offset == 0 and (run / "privacy.csv").read_text() == HEADER and (run / "metrics.jsonl").read_text() == ""
    with pytest.raises(UserError, match="drop --force"):  # resuming in place keeps its directory where it is
        _claim_run_dir(config.replace(resume_from=str(aside), run_dir=str(aside)), force=True)


def test_resuming_in_place_appends_and_numbers_rounds_on(tmp_path):
    # Prepare
    config = FedShopConfig(run_dir=str(tmp_path / "run"))
    run = _finished_run(tmp_path / "run", config)
    ledger, metrics, old_config = ((run / n).read_bytes() for n in ("privacy.csv", "metrics.jsonl", "config.toml"))
    directory = RunDirectory(run)
    # Execute
    offset = directory.start(config.replace(resume_from=str(run), num_rounds=5))
    directory.append_privacy({"merchant": "m0", "round": offset + 1, "noise_multiplier": 1.1, "sample_rate": 0.25,
                              "steps": 4, "epsilon": 0.9, "delta": 1e-5, "unit": "event", "accountant": "rdp",
                              "status": "trained"})
    directory.append_metrics({"round": offset + 1, "scope": "train", "metrics": {}})
    # Assert
    assert offset == 2
    assert (run / "privacy.csv").read_bytes().startswith(ledger) and len(directory.read_privacy()) == 4
    assert (run / "metrics.jsonl").read_bytes().startswith(metrics) and directory.last_round() == 3
    assert (run / "config-before-round-3.toml").read_bytes() == old_config
    assert "num-rounds = 5" in (run / "config.toml").read_text()
    assert not (run / "references.json").exists() and (run / "references-before-round-3.json").is_file()
    # a merchant reading its history in round 3 sees rounds 1-2 only; all rows compose afterwards, merged as
    # Opacus's accountant merges equal consecutive steps
    assert history_from_ledger(run, "m0", before_round=3)[1] == [(1.1, 0.25, 8)]
    assert history_from_ledger(run, "m0")[1] == [(1.1, 0.25, 12)]
    assert json.loads((run / "plan.json").read_text()) == {"last-round": 7, "resumed": []}


def _stopped_run(path: Path, checkpoints: tuple[int, ...], ledger: str, evaluated: tuple[int, ...],
                 last_round: int = 4) -> RunDirectory:
    """A directory shaped like a run planned to `last_round` that was killed: checkpoints, ledger and metrics so far."""
    for n in checkpoints:
        (path / "checkpoints" / f"round-{n}").mkdir(parents=True)
        save_file({"lora_A": torch.full((2, 2), float(n))},
                  path / "checkpoints" / f"round-{n}" / "adapter_model.safetensors")
    (path / "checkpoints" / "round-9").mkdir(parents=True)  # begun, never completed: no weights in it
    (path / "privacy.csv").write_text(ledger)
    (path / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "scope": "evaluate", "metrics": {}}) + "\n"
                                                for r in evaluated))
    directory = RunDirectory(path)
    directory.write_plan(last_round)
    return directory


def test_a_stopped_run_resumes_from_its_last_complete_checkpoint(tmp_path):
    # Prepare: killed during round 3's training (no row of round 3 yet); round 2 checkpointed and evaluated
    directory = _stopped_run(tmp_path / "run", (0, 1, 2), LEDGER, evaluated=(0, 1, 2))
    # Execute
    point = directory.resume_point()
    # Assert: rounds 3-4 are left, numbered as the run would have numbered them
    assert (point.checkpoint, point.offset, point.rounds, point.evaluated) == (2, 2, 2, True)
    directory.record_resume(point)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["last-round"] == 4 and [(r["checkpoint"], r["first-round"]) for r in plan["resumed"]] == [(2, 3)]
    assert directory.resumes() == plan["resumed"]
    directory.write_plan(6)  # the run, finished, continued in place for two more rounds: its resume stays on record
    assert json.loads((tmp_path / "run" / "plan.json").read_text()) == {"last-round": 6, "resumed": plan["resumed"]}


def test_a_round_under_way_when_the_run_stopped_counts_and_the_rounds_number_on(tmp_path):
    # Prepare: killed after round 2's replies were in the ledger, before its checkpoint was written
    directory = _stopped_run(tmp_path / "run", (0, 1), LEDGER, evaluated=(0, 1))
    # Execute
    point = directory.resume_point()
    # Assert: round 2's steps stay in the ledger; the three rounds left after checkpoint 1 are numbered 3-5
    assert (point.checkpoint, point.offset, point.rounds, point.evaluated) == (1, 2, 3, True)
    assert history_from_ledger(tmp_path / "run", "m0", before_round=point.offset + 1)[1] == [(1.1, 0.25, 8)]
    directory.record_resume(point)
    assert directory.planned_last_round() == 5


def test_a_checkpoint_not_yet_evaluated_is_evaluated_on_resume(tmp_path):
    directory = _stopped_run(tmp_path / "run", (0, 1, 2), LEDGER, evaluated=(0, 1))
    assert directory.resume_point().evaluated is False


def test_nothing_to_resume_is_refused_with_what_to_do(tmp_path):
    # a finished run: nothing left
    config = FedShopConfig(run_dir=str(tmp_path / "done"))
    done = _finished_run(tmp_path / "done", config)
    RunDirectory(done).write_plan(2)
    (done / "checkpoints" / "round-2").mkdir(parents=True)
    save_file({"lora_A": torch.zeros(2, 2)}, done / "checkpoints" / "round-2" / "adapter_model.safetensors")
    with pytest.raises(UserError, match=f"{done} finished its 2 rounds: nothing to resume.*resume-from={done}"):
        RunDirectory(done).resume_point()
    # no checkpoint at all, no plan, a damaged plan
    empty = _stopped_run(tmp_path / "early", (), HEADER, evaluated=())
    with pytest.raises(UserError, match="no complete checkpoint.*--force"):
        empty.resume_point()
    with pytest.raises(UserError, match="plan.json does not exist"):
        RunDirectory(tmp_path / "nowhere").resume_point()
    (tmp_path / "early" / "plan.json").write_text('{"last-round": "4"}')
    with pytest.raises(UserError, match="plan.json: unreadable or corrupted"):
        empty.resume_point()


def test_resume_takes_the_runs_own_config_and_nothing_else(tmp_path, capsys):
    # Execute / Assert: one line naming what to drop, or the missing config
    assert main(["simulate", "--resume", str(tmp_path), "--set", "seed=2", "--force"]) == 2
    assert "drop --set, --force" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(tmp_path / "none")]) == 2
    assert f"{tmp_path / 'none' / 'config.toml'} does not exist" in capsys.readouterr().err


def test_an_unfinished_last_line_is_skipped_and_the_next_row_starts_a_line_of_its_own(tmp_path, caplog):
    # Prepare: a run killed while writing its ledger and its metrics
    directory = RunDirectory(tmp_path)
    (tmp_path / "privacy.csv").write_text(LEDGER + "m1,3,1.2")
    (tmp_path / "metrics.jsonl").write_text('{"round": 1, "scope": "train"}\n{"round": 2, "sc')
    # Execute
    directory.append_privacy({"merchant": "m1", "round": 3, "noise_multiplier": 1.2, "sample_rate": 0.5,
                              "steps": 3, "epsilon": 0.8, "delta": 1e-5, "unit": "event", "accountant": "rdp",
                              "status": "trained"})
    directory.append_metrics({"round": 3, "scope": "train"})
    # Assert
    rows = directory.read_privacy()
    assert [(r["merchant"], r["round"]) for r in rows] == [("m0", "1"), ("m0", "2"), ("m1", "2"), ("m1", "3")]
    assert history_from_ledger(tmp_path, "m1")[1] == [(1.2, 0.5, 6)]  # both rows, merged as Opacus merges steps
    assert [r["round"] for r in directory.read_metrics()] == [1, 3]
    assert "unfinished" in caplog.text


def test_a_ledger_with_other_columns_is_refused_not_appended_to(tmp_path):
    (tmp_path / "privacy.csv").write_text("merchant,round,epsilon\nm0,1,0.5\n")
    config = FedShopConfig(run_dir=str(tmp_path), resume_from=str(tmp_path))
    with pytest.raises(UserError, match="is not a fedshop ledger"):
        RunDirectory(tmp_path).start(config)
    assert (tmp_path / "privacy.csv").read_text() == "merchant,round,epsilon\nm0,1,0.5\n"


@pytest.mark.parametrize("writes_report, status", [(False, 1), (True, 0)])
def test_simulate_succeeds_only_on_a_report_this_run_wrote(tiny_base, tmp_path, monkeypatch, writes_report, status):
    # Prepare: a finished run resumed in place, so the earlier run's report.md is there all along
    run = _finished_run(tmp_path / "run", tiny_base)
    config_file = tmp_path / "tiny.toml"
    config_file.write_text(to_toml(tiny_base.replace(progress=False)))

    def simulation(config, verbose=False):  # a simulation that crashed (no report) or finished (a new report)
        if writes_report:
            write_text_atomic(Path(config.run_dir) / "report.md", "# this run's report\n")

    monkeypatch.setattr("server.simulation.run_simulation", simulation)
    # Execute
    code = main(["simulate", "--config", str(config_file), "--set", f"resume-from={run}", "--run-dir", str(run)])
    # Assert
    assert code == status


def test_simulate_refuses_a_used_run_directory_before_any_work(tmp_path, capsys):
    # Prepare
    run = _finished_run(tmp_path / "run", FedShopConfig())
    before = _snapshot(run)
    # Execute: the base does not exist, so any work would start by pretraining it
    code = main(["simulate", "--set", f"base-dir={tmp_path / 'base'}", "--run-dir", str(run)])
    # Assert
    err = capsys.readouterr().err
    assert code == 2 and f"run directory {run} already holds a run" in err and "Traceback" not in err
    assert not (tmp_path / "base").exists() and _snapshot(run) == before


def test_the_sweep_reads_epsilon_per_merchant_and_central_dp_from_the_one_ledger_reader(tmp_path):
    # Prepare: event-unit DP-SGD at the merchants with central DP on top (a declined row repeats what was spent)
    config = FedShopConfig(run_dir=str(tmp_path), central_dp=True)
    (tmp_path / "privacy.csv").write_text(LEDGER + "all,2,2.0,1.0,1,0.45,1e-05,merchant,rdp,released\n"
                                          "m1,3,1.2,0.5,0,0.6,1e-05,event,rdp,declined\n")
    (tmp_path / "metrics.jsonl").write_text("")
    from server.sweep import summarize
    from shared.ledger import epsilon_by_merchant

    # Execute
    spent = epsilon_by_merchant(RunDirectory(tmp_path).read_privacy())
    row = summarize(tmp_path, config, 8.0, "ok", 1.0)
    # Assert: one figure per merchant (its largest composed epsilon), the merchant-level epsilon beside it
    assert spent == {"m0": 0.7, "m1": 0.6}
    assert row["epsilon_max"] == 0.7 and row["epsilon_mean"] == pytest.approx(0.65)
    assert row["epsilon_merchant_level"] == 0.45 and row["unit"] == "event"
