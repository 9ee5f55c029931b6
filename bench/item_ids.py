"""Benchmark: one token per item against semantic ids (`item-ids`), on a config and with items the base never saw.

    python bench/item_ids.py [--config configs/default.toml] [--new-items 40] [--work runs/bench-item-ids]
                             [--threads 2] [--no-write]

Four runs of `fedshop simulate` on the same config and seed, each with its own base pretrained first (the pretraining
is part of the comparison: the two representations pretrain differently):
- token and semantic, as the config says;
- token and semantic with `new-items` = N: the last N catalogue items never appear in the public split, so the base
  never saw them, while merchants' shoppers view them like any other (their events are the same in all four runs).
Every run trains the config's reference runs too (local-only and centralised in configs/default.toml), so the table
shows what federating adds where the base lacks knowledge: on the items it never saw.
A finished run in the work directory is reused, with the wall time it took then. Then, for each base alone, the time
to rank the whole catalogue for 1,000 next-item sources (the cost of exact constrained decoding against one decoder
step). Prints a table and writes it into BENCHMARKS.md (the section between the markers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODES = ("token", "semantic")
WALL_FILE = "bench-wall.json"  # the wall time of the run's `fedshop simulate` and whether it pretrained the base


def simulate(config: str, work: Path, mode: str, new_items: int) -> tuple[Path, float]:
    """The run directory of one configuration (trained unless already finished) and its `training_seconds`."""
    name = f"{mode}-new{new_items}"
    run, base = work / name, work / f"base-{name}"
    if (run / "report.md").is_file() and (run / WALL_FILE).is_file():
        return run, training_seconds(run, base)
    pretrained = not (base / "fedshop_base.json").is_file()
    command = [sys.executable, "-m", "server.cli", "simulate", "--config", config, "--run-dir", str(run),
               "--set", f"base-dir={base}", "--set", f"item-ids={mode}", "--set", f"new-items={new_items}",
               "--no-progress"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    (run / WALL_FILE).write_text(json.dumps({"wall": time.perf_counter() - started, "pretrained": pretrained}) + "\n")
    return run, training_seconds(run, base)


def training_seconds(run: Path, base: Path) -> float:
    """Wall seconds of the run's `fedshop simulate` without the base's pretraining (when it pretrained the base)."""
    wall = json.loads((run / WALL_FILE).read_text())
    pretrain = json.loads((base / "fedshop_base.json").read_text())["public-valid-metrics"]["pretrain-seconds"]
    return wall["wall"] - (pretrain if wall["pretrained"] else 0.0)


def final_metrics(run: Path) -> tuple[dict, dict, dict]:
    """(final round's federated evaluation, round 0's, reference runs) of a run directory."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r for r in records if r["scope"] == "evaluate"]
    references = run / "references.json"
    return (evaluations[-1]["metrics"], evaluations[0]["metrics"],
            json.loads(references.read_text()) if references.is_file() else {})


def ranking_seconds(run: Path, sources: int = 1000) -> tuple[float, int]:
    """Seconds to score every catalogue item for `sources` next-item test sources with the run's base (median of 3),
    and the vocabulary size."""
    import statistics

    import torch

    from shared.config import load_config
    from shared.data import merchant_data
    from shared.model import load_base
    from shared.modeling import ItemScorer

    config = load_config(run / "config.toml")
    model, tokenizer, _ = load_base(config.base_dir)
    data = merchant_data(config, "m0")
    pool = [e.source for e in data.train + data.test if e.task == "next-item"]
    texts = (pool * (sources // max(1, len(pool)) + 1))[:sources]
    scorer = ItemScorer(tokenizer, data.facts)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(texts), config.eval_batch_size):
                batch = tokenizer(texts[start:start + config.eval_batch_size], padding=True, return_tensors="pt")
                scorer.scores(model, batch["input_ids"], batch["attention_mask"])
        times.append(time.perf_counter() - started)
    return statistics.median(times), len(tokenizer)


def cell(metrics: dict, key: str, digits: int = 3) -> str:
    value = metrics.get(key)
    return "—" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--new-items", type=int, default=40)
    parser.add_argument("--work", default="runs/bench-item-ids")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    rows, notes = [], []
    for new_items in (0, args.new_items):
        for mode in MODES:
            run, seconds = simulate(args.config, work, mode, new_items)
            final, start, references = final_metrics(run)
            meta = json.loads((work / f"base-{mode}-new{new_items}" / "fedshop_base.json").read_text())
            rank_s, vocab = ranking_seconds(run) if new_items == 0 else (None, None)
            local = references.get("local-only", {}).get("metrics", {})
            pooled = references.get("centralised", {}).get("metrics", {})
            rows.append(
                f"| {mode} | {new_items} | {cell(start, 'next-hr@10')} | {cell(final, 'next-hr@10')} | "
                f"{cell(final, 'next-ndcg@10')} | {cell(final, 'next-mrr')} | {cell(local, 'next-hr@10')} | "
                f"{cell(pooled, 'next-hr@10')} | {cell(start, 'next-new-hr@10')} | {cell(final, 'next-new-hr@10')} | "
                f"{cell(local, 'next-new-hr@10')} | {cell(pooled, 'next-new-hr@10')} | "
                f"{cell(final, 'next-new-examples', 0)} | {cell(final, 'intent-auc')} | {cell(final, 'churn-auc')} | "
                f"{cell(final, 'price-elasticity', 2)} | "
                f"{meta['public-valid-metrics']['pretrain-seconds']:.0f} | "
                f"{seconds:.0f} | "
                f"{'—' if rank_s is None else f'{rank_s:.2f}'} | {'—' if vocab is None else vocab} |")
            notes.append(f"{mode}/{new_items}: {run.relative_to(ROOT)}")
            print(rows[-1], flush=True)
    header = ("| item ids | new items | next HR@10 base (round 0) | next HR@10 federated | NDCG@10 | MRR | "
              "HR@10 local-only | HR@10 centralised | new items: HR@10 base | new items: federated | new items: "
              "local-only | new items: centralised | new-item targets | intent AUC | churn AUC | price elasticity | "
              "pretrain s | federation + references s | rank 1,000 sources s | vocabulary |\n" + "|---" * 20 + "|")
    command = f"python bench/item_ids.py --config {args.config} --new-items {args.new_items} --threads {args.threads}"
    section = (f"## Item identifiers\n\n`{command}` ({time.strftime('%Y-%m-%d')}, {platform.machine()}, "
               f"{args.threads} threads; one run per row, same seed and merchants' data; every row pretrains its own "
               "base). Metrics are the final round's test metrics pooled over merchants; \"new items\" are the last N "
               "catalogue items, kept out of the public split, so the base never saw them. \"rank 1,000 sources\" "
               "scores the whole catalogue for 1,000 next-item inputs with the base (median of 3); \"federation + "
               "references s\" is the wall time of `fedshop simulate` less the base's pretraining.\n\n"
               + header + "\n" + "\n".join(rows))
    print(section)
    if not args.no_write:
        write_section("item_ids", section)


if __name__ == "__main__":
    main()
