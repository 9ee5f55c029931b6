"""A world on disk: a real log parsed, cleaned and partitioned once, or the generator's world drawn once, then read
by any later process in milliseconds.

`shared.sources.load_world` builds a world (a real log: load, clean, assign merchants, seconds to minutes for a large
file; the generator: a Python loop over every view, 5-10 s for the default config) and writes it here; every later
process (each deploy-mode message, each simulation actor, pretraining, references, predict) reads it instead of
building it again. This is the one module that reads and writes the format. One entry per world, named by the
sha256 of the repr of its key (`shared.sources.world_key`: every data key of the config, each file's absolute path,
size and modification time, and for the generator a fingerprint of its code):

- `<digest>.events.arrow`: an Arrow IPC file (Feather v2) of one record batch: the EventLog columns, then
  SyntheticData's per-row arrays (ROW_FIELDS; one left None is absent; the (rows, levels) price curve a fixed-size
  list). String columns are dictionary-encoded;
- `<digest>.catalogue.arrow`: the Catalogue's fields, the same way (one left None is absent);
- `<digest>.shoppers.arrow`, only for a world with the generator's per-shopper truth (what churn's Bayes oracle
  reads): a user_id column and ShopperTruth's fields, one row per shopper;
- each file's schema metadata (key b"fedshop", JSON): the format version, the full key, an entry id the files share
  (a half-replaced set is not one entry), every column's numpy dtype (so object arrays of str come back as object
  arrays of str) and a CRC-32 of its data; the events file also merchant_ids, window_end_ms and whether the entry
  has a shoppers file;
- `<digest>.lock`: empty; the process building the entry holds an flock on it, so that processes that miss the
  entry together (simulation actors, SuperNodes) wait and read it instead of each building the world.

Files are written whole (`shared.files.replacing`: a temporary file beside the target, fsync, os.replace), the
events file last. A missing entry, another key or another format version is a miss; a damaged file (truncated,
garbled, a CRC that does not match) is a miss with a warning naming it; `load_world` then builds the world and
writes the entry again. A cache problem never fails a run: a folder that cannot be written logs one warning per
process and the run goes on without the disk cache.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from shared.config import WORLD_CACHE_DIR
from shared.errors import UserError
from shared.events import COLUMNS, EventLog
from shared.files import make_dir, replacing
from shared.synthetic import Catalogue, ShopperTruth, SyntheticData

log = logging.getLogger("fedshop")
FORMAT_VERSION = 2  # 2: the generator's worlds too, with their shoppers file
ENVIRONMENT = "FEDSHOP_WORLD_CACHE_DIR"  # replaces world-cache-dir when the key is left at its default
ROW_FIELDS = ("truth_purchase_prob", "truth_next_rank", "price_level", "truth_price_curve")  # per event row
SCALAR_FIELDS = ("merchant_ids", "window_end_ms")
CATALOGUE_FIELDS = tuple(f.name for f in dataclasses.fields(Catalogue))
SHOPPER_FIELDS = tuple(f.name for f in dataclasses.fields(ShopperTruth))  # float columns beside user_id
METADATA = b"fedshop"
_WARNED: set[Path] = set()  # folders this process could not write into (one warning each)


class Damaged(Exception):
    """A cache file that exists but cannot be what this module wrote."""


def cache_dir(setting: str) -> Path | None:
    """The cache folder of config key world-cache-dir = `setting` (`~` expanded); at its default, the environment
    variable FEDSHOP_WORLD_CACHE_DIR replaces it when set. None (no disk cache) when empty."""
    if setting == WORLD_CACHE_DIR:
        setting = os.environ.get(ENVIRONMENT, setting)
    if not setting.strip():
        return None
    try:
        return Path(setting).expanduser()
    except RuntimeError as exc:  # no home directory to put in place of ~ (no HOME, no passwd entry)
        _warn_once(Path(setting), f"cannot use {setting} ({exc}); going on without the disk cache")
        return None


def entry_paths(directory: Path, key: tuple) -> tuple[Path, Path]:
    """The events and catalogue files of `key`'s entry in `directory`."""
    return directory / f"{_digest(key)}.events.arrow", directory / f"{_digest(key)}.catalogue.arrow"


def shoppers_path(directory: Path, key: tuple) -> Path:
    """The shoppers file of `key`'s entry (only a world with per-shopper truth has one)."""
    return directory / f"{_digest(key)}.shoppers.arrow"


def _digest(key: tuple) -> str:
    return hashlib.sha256(repr(key).encode("utf-8")).hexdigest()


@contextmanager
def building(directory: Path, key: tuple) -> Iterator[bool]:
    """Held while this process builds and writes `key`'s entry (an exclusive flock on `<digest>.lock`), so that
    processes missing it at the same moment (simulation actors, SuperNodes starting together) build it once: the
    others wait, then read the entry. Yields whether it had to wait (then the entry is worth reading again). Where
    no lock can be taken (a folder that cannot be written, a file system without flock) it holds nothing."""
    handle, waited = None, False
    try:
        make_dir(directory, "world-cache-dir")
        handle = os.open(directory / f"{_digest(key)}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = True
            fcntl.flock(handle, fcntl.LOCK_EX)  # the other process's build: seconds to minutes
    except (OSError, UserError):
        if handle is not None:
            os.close(handle)
        handle, waited = None, False
    try:
        yield waited
    finally:
        if handle is not None:
            os.close(handle)  # releases the lock (the kernel does too when a process dies holding it)


def write_world(directory: Path, key: tuple, data: SyntheticData) -> bool:
    """Store `data` as `key`'s entry; False (and a warning) when it cannot. Never raises."""
    try:
        make_dir(directory, "world-cache-dir")
        events_path, catalogue_path = entry_paths(directory, key)
        header = {"format": FORMAT_VERSION, "key": repr(key), "entry": os.urandom(8).hex()}
        rows = {name: getattr(data, name) for name in ROW_FIELDS if getattr(data, name) is not None}
        events = {**{name: getattr(data.events, name) for name in COLUMNS}, **rows}
        catalogue = {name: getattr(data.catalogue, name) for name in CATALOGUE_FIELDS
                     if getattr(data.catalogue, name) is not None}  # links: the generator's only
        end = None if data.window_end_ms is None else int(data.window_end_ms)
        truth = data.shopper_truth
        _write_table(catalogue_path, catalogue, header)
        if truth is not None:
            shoppers = {"user_id": np.array(list(truth), dtype=object)}
            shoppers |= {name: np.array([getattr(t, name) for t in truth.values()], dtype=np.float64)
                         for name in SHOPPER_FIELDS}
            _write_table(shoppers_path(directory, key), shoppers, header)
        _write_table(events_path, events, {**header, "merchant_ids": list(data.merchant_ids), "window_end_ms": end,
                                           "shoppers": truth is not None})
    except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: whatever fails, the run goes on
        _warn_once(directory, f"cannot write into {directory} ({type(exc).__name__}: {exc}); going on without the "
                   "disk cache")
        return False
    return True


def _warn_once(directory: Path, message: str) -> None:
    if directory not in _WARNED:
        _WARNED.add(directory)
        log.warning("world cache: %s", message)


def read_world(directory: Path, key: tuple) -> SyntheticData | None:
    """`key`'s entry in `directory`, or None when there is none, it holds another key or format version, or it is
    damaged (with a warning naming the file). Never raises."""
    events_path, catalogue_path = entry_paths(directory, key)
    if not (events_path.is_file() and catalogue_path.is_file()):
        return None
    path = events_path
    try:
        events, header = _read_table(events_path)
        if header.get("format") != FORMAT_VERSION or header.get("key") != repr(key):
            log.info("world cache: %s holds format %s of another key or version; building the world again",
                     events_path, header.get("format"))
            return None
        path = catalogue_path
        catalogue = _companion(catalogue_path, header, events_path)
        if catalogue is None:
            return None
        truth = None
        if header.get("shoppers"):
            path = shoppers_path(directory, key)
            shoppers = _companion(path, header, events_path)
            if shoppers is None:
                return None
            truth = {str(user): ShopperTruth(**{name: float(shoppers[name][i]) for name in SHOPPER_FIELDS})
                     for i, user in enumerate(shoppers["user_id"])}
        rows = {name: events.pop(name, None) for name in ROW_FIELDS}
        data = SyntheticData(catalogue=Catalogue(**catalogue), events=EventLog(**events), **rows,
                             merchant_ids=[str(m) for m in header["merchant_ids"]],
                             window_end_ms=header["window_end_ms"], shopper_truth=truth)
    except Exception as exc:  # noqa: BLE001 - a damaged or unreadable file is a miss, never a failed run
        log.warning("world cache: %s is damaged or unreadable (%s: %s); building the world again and rewriting it",
                    path, type(exc).__name__, str(exc)[:200])
        return None
    return data


def _companion(path: Path, header: dict, events_path: Path) -> dict[str, np.ndarray] | None:
    """The columns of a file of the entry whose events file (at `events_path`) has `header`: the catalogue or the
    shoppers; None (a miss) when it is of another write than the events file."""
    columns, own = _read_table(path)
    if own.get("entry") != header["entry"]:
        log.info("world cache: %s and %s are of different writes; building the world again", events_path, path)
        return None
    return columns


# --- one table: numpy columns <-> an Arrow IPC file -------------------------------------------------------------
def _write_table(path: Path, columns: dict[str, np.ndarray], header: dict) -> None:
    arrays = {name: _to_arrow(name, values) for name, values in columns.items()}
    described = {name: {"dtype": values.dtype.str, "crc": _crc(arrays[name])} for name, values in columns.items()}
    schema = pa.schema([(name, array.type) for name, array in arrays.items()],
                       metadata={METADATA: json.dumps({**header, "columns": described})})
    batch = pa.record_batch(list(arrays.values()), schema=schema)
    with replacing(path) as temporary, pa.OSFile(str(temporary), "wb") as sink:
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_batch(batch)


def _read_table(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    with pa.OSFile(str(path)) as source:  # read, not mapped: a file cut short meanwhile is an error, not a SIGBUS
        reader = pa.ipc.open_file(source)
        header = json.loads(reader.schema.metadata[METADATA])
        if header.get("format") != FORMAT_VERSION:
            return {}, header
        if reader.num_record_batches != 1:
            raise Damaged(f"{reader.num_record_batches} record batches, expected 1")
        batch = reader.get_batch(0)
        described = header["columns"]
        if batch.schema.names != list(described):
            raise Damaged(f"columns {batch.schema.names} do not match their description {list(described)}")
        columns = {}
        for name, array in zip(batch.schema.names, batch.columns, strict=True):
            if array.null_count or _crc(array) != described[name]["crc"]:
                raise Damaged(f"column {name}: its data does not match its checksum")
            columns[name] = _to_numpy(array, np.dtype(described[name]["dtype"]))
    return columns, header


def _to_arrow(name: str, values: np.ndarray) -> pa.Array:
    if values.dtype.kind in "OU":  # strings (object arrays of str, as `build_world` makes them)
        array = pa.array(values, type=pa.string()).dictionary_encode()
    elif values.ndim == 2:
        array = pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])
    else:
        array = pa.array(values)
    if values.ndim not in (1, 2) or array.null_count:
        raise ValueError(f"column {name}: {values.ndim}-d or holding None; only 1-d and 2-d arrays without None")
    return array


def _to_numpy(array: pa.Array, dtype: np.dtype) -> np.ndarray:
    """A writable numpy copy of `array` as `dtype` (nothing left pointing into the file)."""
    if pa.types.is_dictionary(array.type):
        names = np.empty(len(array.dictionary), dtype=object)
        names[:] = array.dictionary.to_pylist()  # str objects
        return names[_view(array.indices)].astype(dtype, copy=False)
    if pa.types.is_fixed_size_list(array.type):
        return _to_numpy(array.flatten(), dtype).reshape(len(array), array.type.list_size)
    if pa.from_numpy_dtype(dtype) != array.type:
        raise Damaged(f"a column of {array.type} described as {dtype}")
    return _view(array).copy()


def _view(array: pa.Array) -> np.ndarray:
    """The values of a primitive array as a numpy view of its buffer: Arrow's own `to_numpy` imports pandas (0.25 s
    in a fresh process, more than reading the whole file). Booleans, bit-packed, are unpacked into a copy."""
    dtype = np.dtype(array.type.to_pandas_dtype())
    if pa.types.is_boolean(array.type):
        bits = np.frombuffer(array.buffers()[1], np.uint8)
        return np.unpackbits(bits, bitorder="little")[array.offset:array.offset + len(array)].astype(bool)
    return np.frombuffer(array.buffers()[1], dtype, count=len(array), offset=array.offset * dtype.itemsize)


def _crc(array: pa.Array, crc: int = 0) -> int:
    """CRC-32 of an array's values (not of its buffers' padding): equal for the array written and the one read."""
    if pa.types.is_dictionary(array.type):
        return _crc(array.dictionary, _crc(array.indices, crc))
    if pa.types.is_fixed_size_list(array.type):
        return _crc(array.flatten(), crc)
    if pa.types.is_string(array.type):
        if not len(array):
            return crc
        _, offsets, text = array.buffers()
        offsets = np.frombuffer(offsets, np.int32, count=len(array) + 1, offset=4 * array.offset)
        crc = zlib.crc32((offsets - offsets[0]).tobytes(), crc)
        return zlib.crc32(memoryview(text)[offsets[0]:offsets[-1]], crc) if offsets[-1] > offsets[0] else crc
    return zlib.crc32(_view(array).tobytes() if pa.types.is_boolean(array.type) else _view(array).data, crc)
