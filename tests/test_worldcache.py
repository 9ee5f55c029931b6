"""The on-disk world cache: a real log is loaded, cleaned and partitioned once; any later load (another process
included) reads the same world back without the loader; a changed file or data key misses; a damaged entry or a
folder that cannot be written never fails a run."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import shared.sources as sources
from shared import worldcache
from shared.config import WORLD_CACHE_DIR, FedShopConfig
from shared.formats import write_format
from shared.synthetic import SyntheticData, generate
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rees46(tmp_path_factory) -> Path:
    """The tiny synthetic world as a REES46 file: prices, categories, brands as merchants (about 8000 events)."""
    path = tmp_path_factory.mktemp("rees46") / "2019-Oct.csv"
    write_format(generate(FedShopConfig(**TINY)).events, path, "rees46")
    return path


@pytest.fixture(autouse=True)
def _fresh_process_memory(caplog):
    """Each test starts as a new process would: no world in memory (the disk cache is each test's own folder), and
    fedshop's warnings seen by caplog even after a CLI run in this process turned their propagation off."""
    sources.clear_world_cache()
    logger = logging.getLogger("fedshop")
    propagate = logger.propagate
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="fedshop")
    yield
    logger.propagate = propagate
    sources.clear_world_cache()


@pytest.fixture
def loads(monkeypatch) -> list[FedShopConfig]:
    """Every call of `load_real` that `load_world` makes (the real loader still runs)."""
    calls: list[FedShopConfig] = []
    real = sources.load_real

    def counted(config, path=None):
        calls.append(config)
        return real(config, path)

    monkeypatch.setattr(sources, "load_real", counted)
    return calls


def real_config(path: Path, cache: Path | str, **changes) -> FedShopConfig:
    return FedShopConfig(**{**TINY, "data_path": str(path), "partition": "natural:brand",
                            "world_cache_dir": str(cache), **changes})


def entries(folder: Path) -> list[str]:
    """The cache files in `folder` (not the empty lock files beside them)."""
    return sorted(p.name for p in folder.glob("*.arrow"))


def assert_same_world(got: SyntheticData, expected: SyntheticData) -> None:
    """Every array equal with the same dtype and shape (object arrays holding str), every other field equal."""
    def same_array(name, a, b):
        assert (a is None) == (b is None), name
        if a is None:
            return
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        np.testing.assert_array_equal(a, b, err_msg=name)
        if a.dtype == object:
            assert {type(x) for x in a.tolist()} == {type(x) for x in b.tolist()} == {str}, name

    for part in ("catalogue", "events"):
        for f in dataclasses.fields(getattr(expected, part)):
            same_array(f"{part}.{f.name}", getattr(getattr(got, part), f.name),
                       getattr(getattr(expected, part), f.name))
    for name in worldcache.ROW_FIELDS:
        same_array(name, getattr(got, name), getattr(expected, name))
    assert got.merchant_ids == expected.merchant_ids and all(type(m) is str for m in got.merchant_ids)
    assert got.window_end_ms == expected.window_end_ms and type(got.window_end_ms) is type(expected.window_end_ms)
    assert got.shopper_truth == expected.shopper_truth


def test_every_field_of_a_world_has_a_place_in_the_cache():
    # a field added to SyntheticData must be stored, or this fails (the cache would silently drop it)
    stored = {"catalogue", "events", "shopper_truth", *worldcache.ROW_FIELDS, *worldcache.SCALAR_FIELDS}
    assert {f.name for f in dataclasses.fields(SyntheticData)} == stored


def test_a_real_world_is_written_once_and_read_back_without_the_loader(rees46, tmp_path, loads, monkeypatch):
    # Prepare
    cache = tmp_path / "worlds"
    config = real_config(rees46, cache)
    # Execute: a first load builds and writes; a second one, memory forgotten, must not call the loader
    first = sources.load_world(config)
    written = entries(cache)
    sources.clear_world_cache()
    monkeypatch.setattr(sources, "load_real", lambda *a, **k: pytest.fail("the loader ran on a cache hit"))
    again = sources.load_world(config)
    # Assert
    assert len(loads) == 1 and len(written) == 2
    assert {name.split(".", 1)[1] for name in written} == {"events.arrow", "catalogue.arrow"}
    assert again is not first and len(again.events) == len(first.events) > 5000
    assert_same_world(again, first)
    assert sources.load_world(config) is again  # and then from memory
    assert entries(cache) == written


def test_a_synthetic_world_is_written_once_with_its_shoppers_and_read_back_without_the_generator(tmp_path,
                                                                                                   monkeypatch):
    # Prepare
    cache = tmp_path / "worlds"
    config = FedShopConfig(**TINY, world_cache_dir=str(cache))
    # Execute: a first load draws and writes; a second one, memory forgotten, must not call the generator
    first = sources.load_world(config)
    written = entries(cache)
    sources.clear_world_cache()
    monkeypatch.setattr(sources, "generate", lambda *a, **k: pytest.fail("the generator ran on a cache hit"))
    again = sources.load_world(config)
    # Assert: the truth churn's oracle reads came back too
    assert {name.split(".", 1)[1] for name in written} == {"events.arrow", "catalogue.arrow", "shoppers.arrow"}
    assert again is not first and first.shopper_truth and len(again.shopper_truth) == len(first.shopper_truth)
    assert_same_world(again, first)


def test_the_generators_key_holds_its_codes_fingerprint_and_a_real_logs_does_not(rees46, tmp_path, monkeypatch):
    synthetic = FedShopConfig(**TINY)
    assert ("generator", sources.generator_fingerprint()) in sources.world_key(synthetic)
    assert not any(part[0] == "generator" for part in sources.world_key(real_config(rees46, tmp_path)))
    # other generator code is another key, so a world it stored is a miss
    stored = sources.world_key(synthetic)
    monkeypatch.setattr(sources, "generator_fingerprint", lambda: "another generator")
    assert sources.world_key(synthetic) != stored


def test_the_generators_world_round_trips_every_column(tmp_path):
    # Prepare: the generator's world has the truth a real one lacks (a 2-d price curve, latent catalogue, shoppers)
    world = generate(FedShopConfig(**TINY))
    # Execute
    assert worldcache.write_world(tmp_path, ("a key",), world)
    back = worldcache.read_world(tmp_path, ("a key",))
    # Assert
    assert back is not None and back.truth_price_curve.ndim == 2 and back.shopper_truth
    assert_same_world(back, world)
    assert worldcache.read_world(tmp_path, ("another key",)) is None
    # an entry under another key's name (copied by hand) holds the wrong key: a miss
    for written, other in zip((*worldcache.entry_paths(tmp_path, ("a key",)),
                               worldcache.shoppers_path(tmp_path, ("a key",))),
                              (*worldcache.entry_paths(tmp_path, ("another key",)),
                               worldcache.shoppers_path(tmp_path, ("another key",))), strict=True):
        other.write_bytes(written.read_bytes())
    assert worldcache.read_world(tmp_path, ("another key",)) is None


@pytest.mark.parametrize("part", ["catalogue", "shoppers"])
def test_files_of_two_writes_are_not_one_entry(tmp_path, part):
    # Prepare: two worlds written under one key in turn (a writer killed between its files leaves such a set)
    one, two = (generate(FedShopConfig(**{**TINY, "seed": seed})) for seed in (1, 2))
    assert worldcache.write_world(tmp_path, ("k",), one)
    path = worldcache.shoppers_path(tmp_path, ("k",)) if part == "shoppers" else \
        worldcache.entry_paths(tmp_path, ("k",))[1]
    first_write = path.read_bytes()
    assert worldcache.write_world(tmp_path, ("k",), two)
    # Execute: the first write's file beside the second write's others
    path.write_bytes(first_write)
    # Assert: a miss, not a world mixed from both
    assert worldcache.read_world(tmp_path, ("k",)) is None


def test_a_changed_file_or_data_key_misses_and_other_keys_hit(rees46, tmp_path, loads):
    # Prepare: a copy of the log that this test may change
    path = tmp_path / "2019-Oct.csv"
    path.write_bytes(rees46.read_bytes())
    cache = tmp_path / "worlds"
    config = real_config(path, cache)
    first = sources.load_world(config)

    def load_fresh(c: FedShopConfig) -> SyntheticData:
        sources.clear_world_cache()
        return sources.load_world(c)

    # Execute / Assert: keys that do not shape the data hit the disk entry (the loader does not run)
    load_fresh(config.replace(learning_rate=0.5, run_dir=str(tmp_path / "elsewhere")))
    assert len(loads) == 1 and len(entries(cache)) == 2
    # a data key misses: a second entry
    fewer = load_fresh(config.replace(min_item_events=50))
    assert len(loads) == 2 and len(entries(cache)) == 4 and len(fewer.events) < len(first.events)
    # the same file touched (modification time only) misses, and so does a changed size
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert_same_world(load_fresh(config), first)
    assert len(loads) == 3 and len(entries(cache)) == 6
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text("".join(lines[:-40]), encoding="utf-8")
    assert len(load_fresh(config).events) < len(first.events)
    assert len(loads) == 4 and len(entries(cache)) == 8


def test_the_key_names_files_not_spellings_of_them(rees46, monkeypatch, loads, tmp_path):
    # a relative and an absolute data-path naming the same file are one world (deploy makes paths absolute)
    monkeypatch.chdir(rees46.parent)
    cache = tmp_path / "worlds"
    sources.load_world(real_config(Path(rees46.name), cache))
    sources.clear_world_cache()
    sources.load_world(real_config(rees46, cache))
    assert len(loads) == 1 and len(entries(cache)) == 2


def test_loads_that_miss_together_build_the_world_once(rees46, tmp_path, loads, monkeypatch):
    # Prepare: a slow loader, so that a second load (a second actor or SuperNode in a run) starts while it runs
    counted = sources.load_real

    def slow(config, path=None):
        time.sleep(1.0)
        return counted(config, path)

    monkeypatch.setattr(sources, "load_real", slow)
    config = real_config(rees46, tmp_path / "worlds")
    # Execute
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(sources.load_world, [config, config])
    # Assert: the second waited for the first's entry and read it
    assert len(loads) == 1
    assert_same_world(second, first)


def test_the_key_holds_the_item_file_a_recbole_log_reads_beside_it(tmp_path):
    inter = tmp_path / "shop.inter"
    inter.write_text("user_id:token\titem_id:token\ttimestamp:float\nu1\ti1\t1\n", encoding="utf-8")
    config = FedShopConfig(data_path=str(inter))
    before = sources.world_key(config)
    (tmp_path / "shop.item").write_text("item_id:token\tclass:token_seq\ni1\tdrama\n", encoding="utf-8")
    assert sources.world_key(config) != before


def _flip_timestamp_bytes(path: Path, timestamps: np.ndarray) -> None:
    """Change one byte inside the stored timestamp column: data, not header or padding, so that only the checksum
    can tell."""
    content = bytearray(path.read_bytes())
    at = content.find(timestamps[:4].tobytes())
    assert at > 0
    content[at + 3] ^= 0xFF
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("damage", ["truncated", "garbled data", "garbled footer", "not arrow", "empty",
                                    "catalogue truncated"])
def test_a_damaged_entry_is_rebuilt_with_a_warning_and_rewritten(rees46, tmp_path, loads, caplog, damage):
    # Prepare
    cache = tmp_path / "worlds"
    config = real_config(rees46, cache)
    first = sources.load_world(config)
    events, catalogue = worldcache.entry_paths(cache, sources.world_key(config))
    damaged = catalogue if damage.startswith("catalogue") else events
    size = damaged.stat().st_size
    if damage == "garbled data":
        _flip_timestamp_bytes(events, first.events.timestamp)
    elif damage == "garbled footer":  # where the reader finds the schema and the record batch
        damaged.write_bytes(damaged.read_bytes()[:-80] + b"\x5a" * 70 + damaged.read_bytes()[-10:])
    elif damage == "not arrow":
        damaged.write_bytes(os.urandom(size))
    else:
        with damaged.open("r+b") as handle:
            handle.truncate(0 if damage == "empty" else size // 2)
    sources.clear_world_cache()
    # Execute
    rebuilt = sources.load_world(config)
    # Assert: one warning naming the file, the world built again and the entry rewritten (a later load hits it)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(damaged) in warnings[0] and "damaged" in warnings[0]
    assert len(loads) == 2
    assert_same_world(rebuilt, first)
    sources.clear_world_cache()
    assert_same_world(sources.load_world(config), first)
    assert len(loads) == 2 and damaged.stat().st_size == size


def test_another_format_version_is_a_quiet_miss_and_is_replaced(rees46, tmp_path, loads, caplog, monkeypatch):
    cache = tmp_path / "worlds"
    config = real_config(rees46, cache)
    sources.load_world(config)
    monkeypatch.setattr(worldcache, "FORMAT_VERSION", worldcache.FORMAT_VERSION + 1)
    sources.clear_world_cache()
    sources.load_world(config)
    sources.clear_world_cache()
    sources.load_world(config)
    assert len(loads) == 2 and len(entries(cache)) == 2  # rebuilt once, in place of the old entry
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_unwritable_cache_folder_warns_once_and_the_run_goes_on(rees46, tmp_path, loads, caplog):
    # Prepare: the folder would have to be created under a regular file
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = real_config(rees46, blocker / "worlds")
    # Execute: two loads as two messages of one process would do them (memory forgotten in between)
    first = sources.load_world(config)
    sources.clear_world_cache()
    second = sources.load_world(config)
    # Assert
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(blocker / "worlds") in warnings[0] and "without the disk cache" in warnings[0]
    assert len(loads) == 2 and len(first.events) > 5000
    assert_same_world(second, first)


def test_an_empty_world_cache_dir_writes_nothing(rees46, tmp_path, loads, monkeypatch):
    # the environment's folder is not used either: it replaces the default only, and empty means no disk cache
    monkeypatch.setenv(worldcache.ENVIRONMENT, str(tmp_path / "from-environment"))
    config = real_config(rees46, "")
    sources.load_world(config)
    sources.clear_world_cache()
    sources.load_world(config)
    assert len(loads) == 2 and entries(tmp_path / "from-environment") == []


def test_the_environment_replaces_only_the_default(monkeypatch, tmp_path):
    monkeypatch.setenv(worldcache.ENVIRONMENT, str(tmp_path))
    assert worldcache.cache_dir(WORLD_CACHE_DIR) == tmp_path
    assert worldcache.cache_dir("~/worlds") == Path.home() / "worlds"
    assert worldcache.cache_dir("") is None
    monkeypatch.setenv(worldcache.ENVIRONMENT, "")
    assert worldcache.cache_dir(WORLD_CACHE_DIR) is None
    monkeypatch.delenv(worldcache.ENVIRONMENT)
    assert worldcache.cache_dir(WORLD_CACHE_DIR) == Path.home() / ".cache" / "fedshop" / "worlds"
    assert FedShopConfig().world_cache_dir == WORLD_CACHE_DIR
    assert "world-cache-dir" not in sources.DATA_KEYS


def test_no_home_directory_for_the_default_means_no_disk_cache_not_a_failed_run(monkeypatch, caplog):
    monkeypatch.setattr(os.path, "expanduser", lambda path: path)  # neither HOME nor a passwd entry: ~ stays ~
    assert worldcache.cache_dir("~/no-home/worlds") is None
    assert "~/no-home/worlds" in caplog.text and "without the disk cache" in caplog.text


def test_a_new_process_reads_the_entry_without_loading(rees46, tmp_path):
    # Prepare: this process writes the entry
    cache = tmp_path / "worlds"
    config = real_config(rees46, cache)
    world = sources.load_world(config)
    # Execute: another interpreter (its own hash seed) loads the same config with the loader disabled
    script = ("import sys, shared.sources as s\n"
              "from shared.config import from_mapping\n"
              "s.load_real = lambda *a, **k: sys.exit('the loader ran')\n"
              f"w = s.load_world(from_mapping({config.to_flat()!r}))\n"
              "print(len(w.events), w.events.user_id[-1], float(w.events.price[:100].sum()))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "random"})
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [str(len(world.events)), world.events.user_id[-1],
                                   str(float(world.events.price[:100].sum()))]
