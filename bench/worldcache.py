"""Benchmark: `load_world` on a real log, cold (parse, clean, partition, write the disk cache), warm from the disk
cache in a fresh process, and warm in memory; and the cache entry's size.

    python bench/worldcache.py --data FILE [--set KEY=VALUE ...] [--cache DIR] [--repeat 3]

Each timing runs in a fresh interpreter (imports not timed), as a new merchant message or simulation actor would.
`--cache` (default: a temporary folder) is emptied before the cold run. Prints the table and writes it to
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402


def child(data: str, cache: str, sets: list[str]) -> dict:
    """In this fresh process: `load_world` once (cold or from disk), then again (memory)."""
    sys.path.insert(0, str(ROOT))
    import shared.worldcache  # noqa: F401 - imported by load_world on first use: imports are not timed
    from shared.config import load_config
    from shared.sources import load_world

    config = load_config(None, [*sets, f"data-path={data}", f"world-cache-dir={cache}"])
    started = time.perf_counter()
    world = load_world(config)
    first = time.perf_counter() - started
    started = time.perf_counter()
    load_world(config)
    return {"first": first, "memory": time.perf_counter() - started, "events": len(world.events),
            "items": world.catalogue.num_items}


def run_child(args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--child", "--data", args.data, "--cache", args.cache]
    argv += [a for s in args.set for a in ("--set", s)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the real log (data-path)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="other config keys")
    parser.add_argument("--cache", help="world-cache-dir to use (emptied first; default a temporary folder)")
    parser.add_argument("--repeat", type=int, default=3, help="warm runs (fresh processes)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = str(Path(args.data).resolve())
    if args.child:
        print(json.dumps(child(args.data, args.cache, args.set)))
        return
    args.cache = args.cache or tempfile.mkdtemp(prefix="fedshop-worldcache-")
    shutil.rmtree(args.cache, ignore_errors=True)
    cold = run_child(args)
    warm = [run_child(args) for _ in range(args.repeat)]
    files = sorted(Path(args.cache).glob("*.arrow"))
    size = sum(f.stat().st_size for f in files)
    warm_ms = [w["first"] * 1000 for w in warm]
    memory_us = [w["memory"] * 1e6 for w in [cold, *warm]]
    lines = [
        "| load | time |", "|---|---|",
        f"| cold: parse, clean, partition, write the cache | {cold['first']:.2f} s |",
        f"| warm from disk, fresh process ({len(warm)} runs; imports not timed) | "
        f"{min(warm_ms):.0f}-{max(warm_ms):.0f} ms |",
        f"| warm in memory (the key's file stat and a lookup) | {min(memory_us):.0f}-{max(memory_us):.0f} us |",
    ]
    extra = " ".join(f"--set {s}" for s in args.set)
    section = "\n".join([
        "## A real log's world, cached on disk (issue 14)", "",
        f"`python bench/worldcache.py --data FILE{(' ' + extra) if extra else ''} --repeat {args.repeat}` on "
        f"{cold['events']:,} events after cleaning, {cold['items']:,} items "
        f"({Path(args.data).stat().st_size / 2**20:.1f} MiB CSV written by `fedshop data synth`); cache entry "
        f"{size / 2**20:.1f} MiB (Arrow IPC, uncompressed, "
        f"{len(files)} files). Each load in a fresh interpreter, as a new merchant message or simulation actor.", "",
        *lines])
    print(section)
    write_section("worldcache", section)

if __name__ == "__main__":
    main()
