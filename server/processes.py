"""The processes `fedshop deploy` starts, and stopping every one of them by PID.

Flower's daemons start children in sessions of their own (each SuperLink and SuperNode spawns a `flower-superexec`,
which spawns a ServerApp or ClientApp process per run or message), so killing a process group is not enough: every
stop walks the process tree from /proc, signals each process group and each PID it finds, and repeats until nothing
of the tree is left. Every PID ever seen is kept, so a caller (or a test) can check afterwards that none is alive.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger("fedshop")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (bound to port 0, then released)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process {process.pid} exited with code {process.returncode} before listening")
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout_s:.0f} s")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the command name (field 2) is in parentheses and may hold spaces: the parent PID follows the last ")"
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, found, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, None if there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks after boot): with the PID, it names one process even if the PID is reused."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def alive(pid: int, started: int | None = None) -> bool:
    """Whether `pid` runs (and, given `started`, is still the process that started then); a zombie, exited but not
    yet reaped, counts as gone."""
    fields = _stat(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


class Processes:
    """Started processes (each in a session of its own, output to a log file), stopped together by PID."""

    def __init__(self, env: dict[str, str], log_dir: Path):
        self.env, self.log_dir = env, log_dir
        self.started: dict[str, subprocess.Popen] = {}
        self.seen: dict[int, int | None] = {}  # every PID of the trees ever seen -> its start time

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (self.log_dir / f"{name}.log").open("ab") as out:
            process = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.started[name] = process
        self.seen[process.pid] = start_time(process.pid)
        log.debug("started %s (pid %d): %s", name, process.pid, " ".join(argv))
        return process

    def stop(self, name: str, grace_s: float = 5.0) -> None:
        """Stop one started process and everything below it."""
        process = self.started.pop(name)
        tree = [process.pid, *descendants(process.pid)]
        for pid in tree:
            self.seen.setdefault(pid, start_time(pid))
        _stop_tree([process], tree, self.seen, grace_s)

    def stop_all(self, grace_s: float = 5.0) -> None:
        processes = list(self.started.values())
        self.started.clear()
        for process in processes:  # before any signal: the whole trees as they stand
            for pid in descendants(process.pid):
                self.seen.setdefault(pid, start_time(pid))
        _stop_tree(processes, list(self.seen), self.seen, grace_s)

    def left_running(self) -> list[int]:
        return sorted(pid for pid, started in self.seen.items() if alive(pid, started))


def _signal_tree(pids: list[int], seen: dict[int, int | None], sig: int) -> None:
    for pid in pids:
        for member in [pid, *descendants(pid)]:
            seen.setdefault(member, start_time(member))
            for send in (os.killpg, os.kill):
                try:
                    send(member, sig)
                except (ProcessLookupError, PermissionError):
                    pass


def _stop_tree(processes: list[subprocess.Popen], pids: list[int], seen: dict[int, int | None], grace_s: float
               ) -> None:
    """SIGTERM `pids` and their trees (Flower's daemons then stop their own children), SIGKILL what is left after
    `grace_s`, twice; `processes` (ours) are reaped on the way."""
    mine = [pid for pid in pids if alive(pid, seen.get(pid))]
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0), (signal.SIGKILL, 2.0)):
        _signal_tree([pid for pid in mine if alive(pid, seen[pid])], seen, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            for process in processes:
                process.poll()  # reap our direct children so they do not linger as zombies
            if not any(alive(pid, seen[pid]) for pid in mine):
                return
            time.sleep(0.1)
    for process in processes:
        process.poll()
    left = [pid for pid in mine if alive(pid, seen[pid])]
    if left:
        log.error("processes still running after SIGKILL: %s", left)
