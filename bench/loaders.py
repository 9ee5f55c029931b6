"""Benchmark: loading large event logs — events per second and peak memory, canonical CSV and REES46 CSV.

    python bench/loaders.py [--events 5000000] [--dir DIR] [--no-write]

Generates (vectorised numpy, not the synthetic shopper model) a canonical CSV and a REES46-format CSV of `--events`
events each in a temporary folder, then measures in a fresh subprocess per row (so peak RSS is that run's alone,
read with `resource.getrusage`; the files are generated in subprocesses too, because Linux carries a parent's peak RSS
across fork + exec into a child's `ru_maxrss`):
- `load`: `shared.loaders.load_events` (parse, validate, intern) into int-coded canonical columns;
- `load + clean + partition`: `shared.sources.load_real`, i.e. also duplicates / bots / 5-core cleaning, the
  flwr-datasets Dirichlet partition over shoppers, the derived catalogue and the canonical `EventLog` of str arrays.
Prints a table and writes it into BENCHMARKS.md (the section between the markers below is replaced).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 500_000
START_MS = 1_569_888_000_000  # 2019-10-01


def generate(path: Path, fmt: str, events: int, seed: int = 0) -> None:
    """`events` rows: 20 events per shopper on average, 50k items in 200 categories, 30 brands, 30 days."""
    rng = np.random.default_rng(seed)
    shoppers, items = max(1, events // 20), 50_000
    category = rng.integers(0, 200, size=items)
    price = np.round(np.exp(rng.normal(3.5, 1.0, size=items)), 2)
    brand = rng.integers(0, 30, size=items)
    kinds = np.array(["view", "cart", "purchase"])
    with path.open("w", encoding="utf-8") as handle:
        handle.write("merchant_id,user_id,item_id,event,timestamp,price,category\n" if fmt == "canonical" else
                     "event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session\n")
        for start in range(0, events, CHUNK):
            n = min(CHUNK, events - start)
            user = rng.integers(0, shoppers, size=n).astype(str)
            item = rng.zipf(1.3, size=n) % items
            kind = kinds[rng.choice(3, size=n, p=[0.85, 0.1, 0.05])]
            ts = START_MS + rng.integers(0, 30 * 86_400_000, size=n)
            cols: list[np.ndarray]
            if fmt == "canonical":
                cols = [np.char.add("b", brand[item].astype(str)), np.char.add("u", user),
                        np.char.add("i", item.astype(str)), kind, ts.astype(str), price[item].astype(str),
                        np.char.add("c", category[item].astype(str))]
            else:
                when = np.char.add(np.char.replace(np.datetime_as_string(ts.astype("datetime64[ms]").astype(
                    "datetime64[s]")), "T", " "), " UTC")
                cols = [when, kind, item.astype(str), category[item].astype(str), np.full(n, ""),
                        np.char.add("b", brand[item].astype(str)), price[item].astype(str), user,
                        np.char.add("s", user)]
            lines = cols[0]
            for col in cols[1:]:
                lines = np.char.add(np.char.add(lines, ","), col)
            handle.write("\n".join(lines.tolist()) + "\n")


def child(path: str, fmt: str, mode: str) -> None:
    """One measurement, in its own process: prints JSON with seconds, events and peak RSS."""
    import resource

    started = time.perf_counter()
    if mode == "load":
        from shared.loaders import LoadOptions, load_events

        events = len(load_events(path, LoadOptions(data_format=fmt)))
    else:
        from shared.config import FedShopConfig
        from shared.sources import load_real

        config = FedShopConfig(data_path=path, data_format=fmt, num_merchants=8, partition="dirichlet")
        data, _ = load_real(config)
        events = len(data.events)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    status = Path("/proc/self/status")
    hwm = next((int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM")),
               None) if status.exists() else None
    print(json.dumps({"seconds": seconds, "events": events, "peak-bytes": peak, "vmhwm-bytes": hwm}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=5_000_000)
    parser.add_argument("--dir", help="where to write the generated files (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "FORMAT", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--generate", nargs=2, metavar=("PATH", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    if args.generate:
        generate(Path(args.generate[0]), args.generate[1], args.events)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for fmt in ("canonical", "rees46"):
            path = Path(folder) / f"{fmt}.csv"
            started = time.perf_counter()
            # generated in a subprocess too: Linux carries a process's peak RSS across fork + exec into its children
            subprocess.run([sys.executable, __file__, "--generate", str(path), fmt, "--events", str(args.events)],
                           cwd=ROOT, check=True)
            print(f"{fmt}: {args.events:,} events, {path.stat().st_size / 2**20:.0f} MiB written in "
                  f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            for mode in ("load", "load + clean + partition"):
                done = subprocess.run([sys.executable, __file__, "--child", str(path), fmt, mode], cwd=ROOT,
                                      capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
                    rows.append({"format": fmt, "mode": mode, "ok": False})
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append({"format": fmt, "mode": mode, "ok": True, "mib": path.stat().st_size / 2**20,
                             "rows": args.events, **result})
                print(f"  {mode}: {result}", file=sys.stderr, flush=True)
    lines = ["| file | what | rows | file MiB | seconds | events / s | peak RSS MiB | events kept |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['format']} | {r['mode']} | failed | | | | | |")
            continue
        lines.append(f"| {r['format']} CSV | {r['mode']} | {r['rows']:,} | {r['mib']:.0f} | {r['seconds']:.1f} | "
                     f"{r['rows'] / r['seconds']:,.0f} | {r['peak-bytes'] / 2**20:,.0f} | {r['events']:,} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        command = f"nice -n 10 python bench/loaders.py --events {args.events}"
        section = (f"## Loaders\n\n`{command}` ({time.strftime('%Y-%m-%d')}, 2 shared cores). Each row is "
                   "a fresh process; peak RSS includes the interpreter and numpy (plus `datasets` and flwr-datasets "
                   "for the partition). `load + clean + partition` is `shared.sources.load_real`: duplicates, bots, "
                   "5-core, Dirichlet partition over shoppers into 8 merchants and a public split, catalogue and "
                   "`EventLog`; the generated files have 20 events per shopper on average, so 5-core keeps most of "
                   "them.\n\n" + text)
        write_section("loaders", section)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
