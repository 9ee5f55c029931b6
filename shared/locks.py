"""One writer per directory: a run directory or a base directory is written by one process at a time.

The lock is an exclusive `fcntl.flock` on a file beside the directory (`.<name>.lock` in its parent, so that it also
covers creating the directory and `--force` moving an old one aside). The kernel drops a flock when its process
ends, killed or not, so a crashed writer never leaves a stale lock behind. The holder writes its PID into the file;
a second process is refused at once with a UserError naming the directory and that PID.

Within one process the lock is re-entrant (the CLI holds a run directory while the ServerApp, in the same process,
takes it again): a flock conflicts between two opens of the file even in one process, so held locks are counted
here per path.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.errors import UserError
from shared.files import make_dir

_HELD: dict[Path, tuple[int, int]] = {}  # lock file -> (descriptor, times taken by this process)
_GUARD = threading.Lock()


def lock_file(directory: str | Path) -> Path:
    """The lock file of `directory`: `.<name>.lock` beside it. The file system's root has no "beside": refused."""
    directory = Path(directory).resolve()
    if not directory.name:
        raise UserError(f"{directory} is the file system's root, which fedshop does not write into as a run or base "
                        "directory; choose a folder below it")
    return directory.with_name(f".{directory.name}.lock")


@contextmanager
def directory_lock(directory: str | Path, what: str) -> Iterator[Path]:
    """Hold `directory` (a `what`, e.g. "run directory") for writing while the block runs; UserError at once if
    another process holds it."""
    path = lock_file(directory)
    with _GUARD:
        held = _HELD.get(path)
        if held is not None:
            _HELD[path] = (held[0], held[1] + 1)
        else:
            _HELD[path] = (_acquire(path, Path(directory), what), 1)
    try:
        yield path
    finally:
        with _GUARD:
            descriptor, count = _HELD[path]
            if count > 1:
                _HELD[path] = (descriptor, count - 1)
            else:
                del _HELD[path]
                os.close(descriptor)  # releases the flock; the file stays (removing it would race a new holder)


def _acquire(path: Path, directory: Path, what: str) -> int:
    make_dir(path.parent, f"{what} {directory}")
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UserError(f"{what} {directory}: cannot create its lock file {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(descriptor)
        raise UserError(f"{what} {directory} is in use by another fedshop process (PID {holder}, lock {path}); "
                        "wait for it to finish, or choose another directory") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode("ascii"), 0)
    return descriptor
