"""One writer per run or base directory: a second process is refused with the directory and the holder's PID, a
killed holder leaves no stale lock, and one process may take its own lock again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shared.errors import UserError
from shared.locks import directory_lock, lock_file

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


TRY_LOCK = """
    import sys
    from shared.errors import UserError
    from shared.locks import directory_lock
    try:
        with directory_lock(sys.argv[1], "run directory"):
            print("acquired")
    except UserError as exc:
        print(exc)
"""


def test_a_second_process_is_refused_with_the_directory_and_the_holders_pid(tmp_path):
    # Prepare: this process holds the run directory
    run_dir = tmp_path / "run"
    with directory_lock(run_dir, "run directory"):
        # Execute: another process asks for it
        out, _ = _python(TRY_LOCK, str(run_dir)).communicate(timeout=60)
    # Assert: refused at once, naming the directory and this process as the holder
    assert "acquired" not in out
    assert f"run directory {run_dir.resolve()} is in use" in out and f"(PID {os.getpid()}," in out
    # released: the other process gets it now
    assert _python(TRY_LOCK, str(run_dir)).communicate(timeout=60)[0].strip() == "acquired"


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    # Prepare: another process takes the base directory and is killed while holding it
    base = tmp_path / "base"
    holder = _python("""
        import sys, time
        from shared.locks import directory_lock
        with directory_lock(sys.argv[1], "base directory"):
            print("held", flush=True)
            time.sleep(600)
    """, str(base))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=rf"base directory .*base is in use .*\(PID {holder.pid},"):
        with directory_lock(base, "base directory"):
            pass
    # Execute
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    # Assert: the kernel dropped its flock; the lock file stays (with the dead PID) and does not block
    with directory_lock(base, "base directory") as path:
        assert path == lock_file(base) and path.read_text().strip() == str(os.getpid())


def test_one_process_takes_its_own_lock_again():
    # Prepare / Execute: the CLI holds a run directory and the ServerApp, in the same process, takes it again
    run_dir = Path("runs-not-created") / "run"
    with directory_lock(run_dir, "run directory"), directory_lock(run_dir, "run directory"):
        held_inside = True
    # Assert: released once the outer block ends (another process could take it)
    assert held_inside
    out, _ = _python(TRY_LOCK, str(run_dir)).communicate(timeout=60)
    assert out.strip() == "acquired"
    lock_file(run_dir).unlink()
    lock_file(run_dir).parent.rmdir()


@pytest.mark.parametrize("command", ["simulate", "pretrain"])
def test_the_cli_refuses_a_directory_another_process_writes(tmp_path, command):
    # Prepare: this process holds the directory the command would write
    target = tmp_path / ("run" if command == "simulate" else "base")
    option = "--run-dir" if command == "simulate" else "--out"
    with directory_lock(target, "run directory" if command == "simulate" else "base directory"):
        # Execute
        done = subprocess.run([sys.executable, "-m", "server.cli", command, "--config", "configs/tiny.toml",
                               option, str(target)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Assert: one clear line, exit status 2, nothing written
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"{target.resolve()} is in use by another fedshop process (PID {os.getpid()}," in done.stderr
    assert not target.exists()
