"""Files written whole or not at all: a reader (or a run killed mid-write) never sees half a report, config or
adapter. Each file goes to a temporary name beside its target, is flushed to disk, then renamed over the target
(`os.replace`, atomic on POSIX within one file system). Append-only files (the ledger, the metrics) grow by whole
lines (`append_line`). And files read back that a disk, a copy or a hand broke
anyway: `reading` turns whatever parsing one file raises into a UserError naming that file. `sha256` is the digest
both sides name files by (export manifests, a base's origin checkpoint)."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shared.errors import UserError


def make_dir(path: str | Path, what: str) -> Path:
    """`path` created with its parents if missing (mkdir -p), or a UserError naming `what` needs it, the folder and
    why it cannot be created (a file in the way, no permission, a read-only disk ...)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{what}: cannot create folder {path}: a file of that name is in the way") from None
    except OSError as exc:
        raise UserError(f"{what}: cannot create folder {path}: {exc.strerror or exc}") from None
    return path


def _fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: some file systems refuse to open a directory)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically: the old content or the new, never a mix."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_dir(path.parent)
    return path


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write; when the block ends, the file is synced and renamed
    over `path` (the old content or the new, never a mix). On an error it is removed and `path` left as it was.
    Named by process and thread, so concurrent writers of the same `path` never share a temporary file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        yield temporary
        _fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def append_line(path: Path, text: str) -> None:
    """Append one whole line and flush it to disk; after a line a killed writer left unfinished, the new one still
    starts on a line of its own."""
    with path.open("a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                text = "\n" + text
        handle.write(text.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def save_pretrained_atomic(model: Any, directory: str | Path, also: Callable[[Path], None] | None = None) -> Path:
    """`model.save_pretrained(directory)` (PEFT) with every file replaced atomically: written into a temporary
    sibling folder, synced, then each file renamed into `directory` (created if needed). `also(folder)` writes
    more files into the temporary folder first."""
    directory = Path(directory)
    temporary = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    if temporary.exists():  # left by a killed earlier attempt of this same process id
        shutil.rmtree(temporary)
    model.save_pretrained(temporary, save_embedding_layers=False)  # the base's embedding is not the adapter's
    if also is not None:
        also(temporary)
    directory.mkdir(parents=True, exist_ok=True)
    # the weights last: a reader that finds them finds the config that goes with them
    for file in sorted(temporary.iterdir(), key=lambda f: (f.suffix == ".safetensors", f.name)):
        if file.is_dir():  # not written by PEFT for one adapter; kept whole if a version ever does
            shutil.rmtree(directory / file.name, ignore_errors=True)
        else:
            _fsync_file(file)
        os.replace(file, directory / file.name)
    temporary.rmdir()
    _fsync_dir(directory)
    return directory


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def reading(path: str | Path, expected: str) -> Iterator[None]:
    """Parse `path` inside this block: any error it raises (bad JSON or UTF-8, a truncated safetensors file, a
    missing key, the tokenizers library's plain Exception ...) becomes a UserError naming the file and what was
    expected, so the user sees one line, not a traceback. A UserError raised inside passes unchanged."""
    try:
        yield
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a parser of this one file raises means the file is broken
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path}: unreadable or corrupted ({type(exc).__name__}: {detail}); expected {expected}"
                        ) from None
