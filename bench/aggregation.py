"""Benchmark: fedavg vs ffa vs svd aggregation at several privacy budgets, same config and seed.

    python bench/aggregation.py [--config configs/default.toml] [--epsilons 1,8,inf] [--out runs/bench-aggregation]

Runs `fedshop simulate` once per (aggregation, budget), then prints a table and writes it into BENCHMARKS.md (the
section between the markers below is replaced) with the command that made it. Every figure comes from the run
directories: final test metrics (metrics.jsonl), uplink bytes per merchant per round, the SVD truncation's dropped
energy, and the wall time of the simulate process.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
STRATEGIES = ("fedavg", "ffa", "svd")
METRICS = (("intent-auc", "intent AUC"), ("next-hr@10", "next HR@10"), ("next-ndcg@10", "NDCG@10"),
           ("next-mrr", "MRR"))


def run_one(config: str, aggregation: str, epsilon: float, run_dir: Path) -> dict:
    budget = ["dp=false"] if math.isinf(epsilon) else ["dp=true", f"target-epsilon={epsilon!r}"]
    sets = [f"aggregation={aggregation}", *budget, "progress=false"]
    command = [sys.executable, "-m", "server.cli", "simulate", "--config", config, "--run-dir", str(run_dir),
               *(a for s in sets for a in ("--set", s))]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    row = {"aggregation": aggregation, "epsilon": "inf" if math.isinf(epsilon) else f"{epsilon:g}",
           "seconds": seconds, "ok": done.returncode == 0}
    if not row["ok"]:
        print(done.stderr[-2000:], file=sys.stderr)
        return row
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    final = [r for r in records if r["scope"] == "evaluate"][-1]["metrics"]
    trains = [r for r in records if r["scope"] == "train"]
    uplink = [m["uplink-bytes"] for r in trains for m in r["merchants"].values() if m.get("uplink-bytes")]
    row.update({key: final.get(key, math.nan) for key, _ in METRICS})
    row["uplink-bytes"] = sum(uplink) / len(uplink) if uplink else math.nan
    row["downlink-bytes"] = trains[-1]["metrics"].get("downlink-bytes-mean", math.nan) if trains else math.nan
    dropped = [r["metrics"].get("svd-dropped-energy-max") for r in trains]
    row["svd-dropped"] = max((d for d in dropped if d is not None), default=math.nan)
    row["epsilon-max"] = trains[-1]["metrics"].get("epsilon-max", math.nan) if trains else math.nan
    return row


def table(rows: list[dict]) -> str:
    lines = ["| aggregation | target ε | ε max (δ 1e-5) | " + " | ".join(n for _, n in METRICS)
             + " | uplink KiB / merchant / round | downlink KiB | SVD dropped energy (max) | wall s |",
             "|" + "---|" * (7 + len(METRICS))]
    for r in rows:
        if not r["ok"]:
            lines.append(f"| {r['aggregation']} | {r['epsilon']} | run failed |" + " |" * (5 + len(METRICS)))
            continue
        eps = r["epsilon-max"]
        eps_text = "inf" if eps == "inf" or (isinstance(eps, float) and math.isinf(eps)) else f"{float(eps):.2f}"
        dropped = "—" if math.isnan(r["svd-dropped"]) else f"{r['svd-dropped']:.3f}"
        lines.append(f"| {r['aggregation']} | {r['epsilon']} | {eps_text} | "
                     + " | ".join(f"{r[k]:.3f}" for k, _ in METRICS)
                     + f" | {r['uplink-bytes'] / 1024:.1f} | {r['downlink-bytes'] / 1024:.1f} | {dropped} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--epsilons", default="1,8,inf")
    parser.add_argument("--out", default="runs/bench-aggregation")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",")]
    rows = []
    for epsilon in epsilons:
        for aggregation in STRATEGIES:
            label = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
            print(f"{aggregation} at epsilon {label} ...", file=sys.stderr, flush=True)
            rows.append(run_one(args.config, aggregation, epsilon, ROOT / args.out / f"{aggregation}-eps-{label}"))
    text = table(rows)
    print(text)
    if not args.no_write:
        command = f"python bench/aggregation.py --config {args.config} --epsilons {args.epsilons}"
        section = (f"## Aggregation strategies\n\n`{command}` ({time.strftime('%Y-%m-%d')}, 2 cores, one "
                   "run per row, same seed and data; the base pretrained beforehand). Metrics are the final round's "
                   "test metrics weighted over merchants; bytes are the float32 adapter tensors a merchant sends "
                   "(uplink) and receives (downlink) per round.\n\n" + text)
        write_section("aggregation", section)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
