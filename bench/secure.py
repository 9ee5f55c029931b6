"""Benchmark: what secure aggregation (SecAgg+, `secure-aggregation = true`) costs against the plain round.

    python bench/secure.py [--config configs/default.toml] [--merchants 4,16] [--rounds 2] [--set k=v] [--write]

For each merchant count, runs `fedshop simulate` twice with the same config, seed and data (no reference runs),
plain and secure, and prints a table: the round's wall time at the server, the merchants' time in their train
handler, the bytes each merchant sent and received per round (tensor data when plain; every record of the four
SecAgg+ stages when secure), the final next HR@10 and intent AUC with their standard errors, and the largest
difference between the two runs' global adapters after round 1 against SecAgg+'s quantisation bound (one level per
merchant over the sum of their weights, times `server-learning-rate`). The merchants' training is the same in both
runs (same seeds), so round 1 differs only by the aggregation.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from server.report import with_standard_errors  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.model import read_adapter  # noqa: E402
from shared.rundir import RunDirectory  # noqa: E402
from shared.secure import CLIPPING_RANGE, QUANTISATION  # noqa: E402

METRICS = (("next-hr@10", "next HR@10"), ("intent-auc", "intent AUC"))


def run_one(config: str, sets: list[str], run_dir: Path) -> dict:
    command = [sys.executable, "-m", "server.cli", "simulate", "--config", config, "--run-dir", str(run_dir),
               "--force", *(a for s in [*sets, "references=none", "progress=false"] for a in ("--set", s))]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{run_dir}: fedshop simulate failed")
    records = RunDirectory(run_dir).read_metrics()
    trains = [r for r in records if r["scope"] == "train"]
    merchants = [m for t in trains for m in t["merchants"].values()]
    return {"wall": time.perf_counter() - started,
            "round": _mean([t["metrics"]["round-seconds"] for t in trains]),
            "handler": _mean([m["message-seconds"] for m in merchants]),
            "uplink": _mean([m["uplink-bytes"] for m in merchants]),
            "downlink": _mean([m["downlink-bytes"] for m in merchants]),
            "weights": [m["num-examples"] for m in trains[0]["merchants"].values()],
            "final": with_standard_errors([r for r in records if r["scope"] == "evaluate"][-1])}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--merchants", default="4,16")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra key=value for every run")
    parser.add_argument("--out", default="runs/bench-secure")
    parser.add_argument("--write", action="store_true", help="also write the table into BENCHMARKS.md")
    args = parser.parse_args()
    base_config = load_config(args.config)
    max_weight, step = base_config.secure_max_weight, base_config.server_learning_rate
    lines = ["| merchants | aggregation | round s | train handler s | bytes / merchant / round up | down | "
             + " | ".join(f"{name} ± se" for _, name in METRICS) + " | max abs diff after round 1 | bound | wall s |",
             "|" + "---|" * (9 + len(METRICS))]
    for count in [int(c) for c in args.merchants.split(",")]:
        sets = [*args.set, f"num-merchants={count}", f"num-rounds={args.rounds}"]
        rows = {}
        for mode in ("plain", "secure"):
            print(f"{count} merchants, {mode} ...", file=sys.stderr, flush=True)
            rows[mode] = run_one(args.config, [*sets, f"secure-aggregation={str(mode == 'secure').lower()}"],
                                 ROOT / args.out / f"{count}-{mode}")
        plain, secure = (read_adapter(ROOT / args.out / f"{count}-{mode}", "checkpoints/round-1")
                         for mode in ("plain", "secure"))
        difference = max(float(abs(secure[k] - plain[k]).max()) for k in plain)
        weights = [w / max_weight for w in rows["plain"]["weights"]]
        # one level per merchant over the sum of the weights, times the server's step along the mean update
        bound = step * len(weights) * (2 * CLIPPING_RANGE / QUANTISATION) / sum(weights)
        for mode, r in rows.items():
            cells = [f"{r['final'].get(k, math.nan):.3f} ± {r['final'].get(f'{k}-se', math.nan):.3f}"
                     for k, _ in METRICS]
            diff = "—" if mode == "plain" else f"{difference:.2e}"
            lines.append(f"| {count} | {mode} | {r['round']:.1f} | {r['handler']:.1f} | {r['uplink']:,.0f} | "
                         f"{r['downlink']:,.0f} | " + " | ".join(cells)
                         + f" | {diff} | {'—' if mode == 'plain' else f'{bound:.2e}'} | {r['wall']:.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        sets = "".join(f" --set {s}" for s in args.set)
        command = (f"python bench/secure.py --config {args.config} --merchants {args.merchants} --rounds {args.rounds}"
                   f"{sets} --write")
        write_section("secure", f"## Secure aggregation: SecAgg+ against the plain round (issue 17)\n\n`{command}` "
                      f"({time.strftime('%Y-%m-%d')}, 2 cores): the config's federation at each merchant count, "
                      f"{args.rounds} rounds, no reference runs, plain and with `secure-aggregation = true`, same "
                      "seed and data. *round s*: the server's wall time of a train round (messages sent to update "
                      "aggregated: under SecAgg+ all four stages, training included); *train handler s*: a "
                      "merchant's train handler, mean; bytes per merchant per round: tensor data when plain, every "
                      "record of the four SecAgg+ stages when secure (masked vector, keys, shares, metrics); the "
                      "metrics are the final round's test figures ± the report's standard error; *max abs diff*: "
                      "the largest difference between the two runs' global adapters (LoRA and wide part) after "
                      "round 1, where the merchants' training was identical, against SecAgg+'s bound of one "
                      "quantisation level per merchant over the sum of their weights (num-examples / "
                      f"secure-max-weight), times the server's step along the mean update ({step:g}).\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
