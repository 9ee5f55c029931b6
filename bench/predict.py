"""Benchmark: batch predict throughput (`fedshop predict --input FILE.csv`) from an export, shoppers per second.

    python bench/predict.py [--shoppers 2000] [--threads 2] [--work runs/bench-predict] [--export DIR] [--no-write]

With --export, times that export (e.g. of the default run: `fedshop export runs/default --out exports/default`).
Otherwise self-contained: trains a tiny run (configs/tiny.toml, one round, base pretrained into the work directory)
unless the work directory already holds one, exports it, writes a CSV of random shoppers (histories of 1 to history-
length catalogue items, one intent candidate each), then times `Predictor.predict_file` (CSV reading, checks, model,
output) for next-item (top 10) and intent at the export's eval-batch-size and, for comparison, one shopper per
forward pass on a tenth of the shoppers. Prints a table and writes it into BENCHMARKS.md (the section between the
markers).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(work: Path) -> Path:
    """The export of a tiny one-round run (made once per work directory)."""
    export = work / "export"
    if (export / "manifest.json").is_file():
        return export
    run = work / "run"
    command = [sys.executable, "-m", "server.cli", "simulate", "--config", "configs/tiny.toml", "--run-dir", str(run),
               "--set", f"base-dir={work / 'base'}", "--set", "num-rounds=1", "--no-progress"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    from server.export import export_run

    return export_run(run, export)


def write_shoppers(path: Path, items: tuple[str, ...], history_length: int, count: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    lines = ["shopper_id,history,candidates,sessions,days_since_last,mean_gap_days,bought_last_session"]
    for i in range(count):
        chosen = rng.choice(len(items), size=int(rng.integers(1, history_length + 1)) + 1, replace=False)
        history = " ".join(items[j] for j in chosen[:-1])
        sessions = int(rng.integers(1, 6))
        gap = f"{rng.uniform(0.5, 12):.1f}" if sessions > 1 else ""
        lines.append(f"s{i},{history},{items[chosen[-1]]},{sessions},{rng.uniform(0, 20):.1f},{gap},"
                     f"{int(rng.random() < 0.3)}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def timed(predictor, path: Path, task: str, repeats: int) -> float:
    """Median wall seconds of `predict_file` over `repeats` runs (after one warm-up)."""
    predictor.predict_file(path, task, 10, explain=False)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        predictor.predict_file(path, task, 10, explain=False)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shoppers", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default="runs/bench-predict")
    parser.add_argument("--export", help="an existing export to time (default: a tiny one-round run made here)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    import torch

    from server.predict import Predictor

    torch.set_num_threads(args.threads)
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    export = Path(args.export) if args.export else prepare(work)
    from server.report import base_words
    from shared.model import read_base_meta

    predictor = Predictor(export)
    batch_size = predictor.batch_size
    many, few = work / "shoppers.csv", work / "shoppers-few.csv"
    write_shoppers(many, predictor.facts.item_ids, predictor.history_length, args.shoppers)
    write_shoppers(few, predictor.facts.item_ids, predictor.history_length, max(1, args.shoppers // 10))
    rows = []
    for task in ("next-item", "intent", "price", "churn"):
        for size, path, count in ((batch_size, many, args.shoppers), (1, few, max(1, args.shoppers // 10))):
            predictor.batch_size = size
            print(f"{task}, batch {size}, {count} shoppers ...", file=sys.stderr, flush=True)
            seconds = timed(predictor, path, task, args.repeats)
            rows.append((task, size, count, seconds, count / seconds))
    lines = ["| task | sources per forward pass | shoppers | seconds (median of "
             f"{args.repeats}) | shoppers / s |", "|---|---|---|---|---|"]
    lines += [f"| {task} | {size} | {count} | {seconds:.2f} | {rate:,.0f} |" for task, size, count, seconds, rate
              in rows]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        command = (f"python bench/predict.py --shoppers {args.shoppers} --threads {args.threads}"
                   + (f" --export {args.export}" if args.export else ""))
        source = (f"the export `{args.export}`" if args.export else "the export of a one-round `configs/tiny.toml` run")
        config = predictor.config
        section = (f"## Predict\n\n`{command}` ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, "
                   f"torch threads {args.threads}, {platform.machine()}). Batch predict (`fedshop predict --input "
                   f"FILE.csv`) from {source} ({base_words(read_base_meta(export / 'base'), config)}, "
                   f"LoRA r = {config.lora_r} on {config.lora_targets}, {config.num_items} items): random shoppers "
                   f"with 1 to {predictor.history_length} history items; next-item returns the top 10, intent scores "
                   "one candidate per shopper, price scores it at each of the 5 price levels, churn scores one "
                   "return probability. Times cover reading and checking the CSV, the model and building the "
                   "output; the batch-1 rows (one forward pass per shopper, a tenth of the shoppers) show what "
                   "batching buys.\n\n" + text)
        write_section("predict", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
