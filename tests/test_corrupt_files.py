"""A damaged file (truncated, or garbled bytes) that a command reads gives one line naming the file, never a
traceback: the run's adapter, privacy.csv and metrics.jsonl, the base's config.json, fedshop_base.json, weights and
tokenizer, and an export's manifest."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.cli import main
from server.export import export_run
from shared.config import to_toml
from shared.files import save_pretrained_atomic
from shared.model import add_lora, load_base
from shared.rundir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tiny_base, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(run directory, its base, an export of it): a run directory as `simulate` leaves it, written without a
    simulation (adapter at init, two ledger rows, one evaluate record)."""
    root = tmp_path_factory.mktemp("finished")
    base = root / "base"
    shutil.copytree(tiny_base.base_dir, base)
    config = tiny_base.replace(base_dir=str(base), run_dir=str(root / "run"))
    run = RunDirectory(config.run_dir)
    run.start(config)
    (run.path / "config.toml").write_text(to_toml(config), encoding="utf-8")
    save_pretrained_atomic(add_lora(load_base(base)[0], config, seed=0), run.adapter_dir)
    for merchant in ("m0", "m1"):
        run.append_privacy(dict(merchant=merchant, round=1, noise_multiplier=1.1, sample_rate=0.1, steps=10,
                                epsilon=0.9, delta=1e-5, unit="event", accountant="rdp", status="trained"))
    run.append_metrics({"round": 1, "scope": "evaluate", "metrics": {"intent-auc": 0.6}, "merchants": {}})
    return run.path, base, export_run(run.path, root / "export")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:len(data) // 2])
    else:  # garbled: bytes that are no UTF-8, no JSON, no CSV and no safetensors header, in the middle
        middle = len(data) // 3
        path.write_bytes(data[:middle] + b"\xff\xfe\x00garbage\xff" * 4 + data[middle + 40:])


def _run_cli(argv: list[str], capsys) -> tuple[int, str]:
    status = main(argv)
    return status, capsys.readouterr().err


# (file as a path under run / base / export, the command that reads it)
CASES = {
    "adapter": ("run", "adapter/adapter_model.safetensors", "export"),
    "privacy.csv": ("run", "privacy.csv", "export"),
    "metrics.jsonl": ("run", "metrics.jsonl", "export"),
    "base config.json": ("base", "config.json", "simulate"),
    "fedshop_base.json": ("base", "fedshop_base.json", "simulate"),
    "base weights": ("base", "model.safetensors", "simulate"),
    "tokenizer": ("base", "tokenizer.json", "simulate"),
    "export manifest (verify)": ("export", "manifest.json", "verify"),
    "export manifest (predict)": ("export", "manifest.json", "predict"),
}
# a run killed mid-write leaves its last ledger or metrics line unfinished: that line is skipped with a warning
# naming the file (resume relies on it), so truncation there is a warning, garbled bytes an error
WARNED_WHEN_TRUNCATED = ("privacy.csv", "metrics.jsonl")


@pytest.mark.parametrize("how", ["truncated", "garbled"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_file_is_named_in_one_line_not_a_traceback(finished, tmp_path, capsys, caplog, case, how):
    # Prepare: a copy of the finished run, its base and its export with one file damaged
    run, base, export = (Path(shutil.copytree(p, tmp_path / p.name)) for p in finished)
    config = tmp_path / "config.toml"
    config.write_text((run / "config.toml").read_text().replace(str(finished[1]), str(base)), encoding="utf-8")
    (run / "config.toml").write_text(config.read_text(), encoding="utf-8")
    where, name, command = CASES[case]
    damaged = {"run": run, "base": base, "export": export}[where] / name
    _damage(damaged, how)
    argv = {"export": ["export", str(run), "--out", str(tmp_path / "out")],
            "simulate": ["simulate", "--config", str(config), "--run-dir", str(tmp_path / "new-run")],
            "verify": ["export", "--verify", str(export)],
            "predict": ["predict", "--adapter", str(export), "--history", "i1 i2"]}[command]
    # Execute: main() lets anything but a UserError through, which would fail this test with its traceback
    status, err = _run_cli(argv, capsys)
    # Assert
    if name in WARNED_WHEN_TRUNCATED and how == "truncated":
        assert status == 0 and str(damaged) in caplog.text and "unfinished" in caplog.text
        return
    assert status == 2, err
    assert err.startswith("fedshop: error: ") and err.count("\n") == 1 and str(damaged) in err, err


def test_a_ledger_row_with_a_garbled_value_names_file_line_and_column(finished, tmp_path, capsys):
    # Prepare: the ledger's second row says epsilon "0.9x"
    run = Path(shutil.copytree(finished[0], tmp_path / "run"))
    ledger = run / "privacy.csv"
    lines = ledger.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace(",0.9,", ",0.9x,")
    ledger.write_text("".join(lines))
    # Execute
    status, err = _run_cli(["export", str(run), "--out", str(tmp_path / "out")], capsys)
    # Assert
    assert status == 2 and f"{ledger}:3: column epsilon = '0.9x' is not a number" in err


def test_the_real_command_prints_no_traceback(finished, tmp_path):
    # Prepare
    run = Path(shutil.copytree(finished[0], tmp_path / "run"))
    _damage(run / "adapter" / "adapter_model.safetensors", "truncated")
    # Execute
    done = subprocess.run([sys.executable, "-m", "server.cli", "export", str(run), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Assert
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{run / 'adapter' / 'adapter_model.safetensors'}: unreadable or corrupted" in done.stderr


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_a_damaged_links_file_of_a_base_is_named(tiny_base, tmp_path, how):
    """The public item-to-item counts a wide base keeps beside its T5 (`links.safetensors`; the session's tiny base
    has no wide part, so a copy gets one): damaged, loading the base names the file."""
    from safetensors.torch import save_file

    from shared.errors import UserError
    from shared.model import load_base
    from shared.wide import LINKS_FILE

    base = Path(shutil.copytree(tiny_base.base_dir, tmp_path / "base"))
    save_file({"from": torch.tensor([3]), "to": torch.tensor([4]), "count": torch.tensor([2])}, str(base / LINKS_FILE))
    assert load_base(base)[0].fedshop_links["count"].tolist() == [2]
    _damage(base / LINKS_FILE, how)
    with pytest.raises(UserError, match=str(base / LINKS_FILE)):
        load_base(base)
