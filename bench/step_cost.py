"""What a merchant's training step costs: ms per DP-SGD step and per plain step, now and (optionally) before.

    python bench/step_cost.py [--config configs/default.toml] [--before DIR] [--repeats 2] [--write]

Each variant runs in a fresh interpreter with one torch thread, the variants taking turns over `--repeats`: the
config's first merchant and the base of its base-dir (pretrain it first: `fedshop pretrain --config ...`), one round
of training from the same start and seed, DP-SGD and plain (the same sampler and steps, no clipping or noise), the
median of the repeats. Each interpreter first trains one untimed round of each kind (a process's first round pays
its kernels' first-call set-up: 188 ms a DP step first in a process, 161-173 ms later ones; until stop 40 the DP
round was timed first and the plain one second), and the order of the two
timed rounds alternates between repeats. Variants:
- this checkout: each batch in `shared.modeling.width_groups` (a pass per group of similar question length);
- this checkout with one pass a batch (`WIDTH_GROUPS` = 1: every question padded to the merchant's longest);
- with `--before DIR`, the code of an earlier checkout at DIR (e.g. `git worktree add /tmp/before a8acd14`).
The train loss is the round's mean; the same start, seed and sampler give the same batches in every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[3])  # the code timed, ahead of the working directory
import torch
torch.set_num_threads(1)
import shared.modeling
groups = int(sys.argv[2])
order = [kind == "dp" for kind in sys.argv[4].split(",")]
if groups:
    shared.modeling.WIDTH_GROUPS = groups
from shared.config import load_config
from shared.data import merchant_data
from shared.dptrain import PrivacyState, train_round
from shared.model import add_lora, item_rows, load_base
from shared.modeling import encode
from shared.sources import load_world
config = load_config(sys.argv[1])
world = load_world(config)
data = merchant_data(config, world.merchant_ids[0], world)
base, tokenizer, _ = load_base(config.base_dir)
teaching = data.teaching(config)
encoded, owners = encode(teaching, tokenizer), [e.user_id for e in teaching]
out = {}
for timed, dp in [(False, dp) for dp in order] + [(True, dp) for dp in order]:
    model = add_lora(load_base(config.base_dir)[0], config, seed=config.seed, tokenizer=tokenizer, facts=data.facts)
    started = time.perf_counter()
    result = train_round(model, encoded, config.replace(dp=dp), PrivacyState(), seed=1, owners=owners,
                         output_rows=item_rows(tokenizer, data.facts))
    if timed:
        out["dp" if dp else "plain"] = {"ms": 1000 * result.train_seconds / result.steps, "loss": result.train_loss,
                                        "round": time.perf_counter() - started, "steps": result.steps}
print(json.dumps(out))
"""


def measure(code: Path, config: str, groups: int, order: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, config, str(groups), str(code), order], cwd=ROOT, env=env,
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--before", default="", help="an earlier checkout to time beside this one")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    variants = [("this checkout, a pass per width group", ROOT, 0), ("this checkout, one pass a batch", ROOT, 1)]
    if args.before:
        variants.append((f"before ({args.before})", Path(args.before).resolve(), 0))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    for repeat in range(args.repeats):
        for name, code, groups in variants:
            runs[name].append(measure(code, args.config, groups, "dp,plain" if repeat % 2 == 0 else "plain,dp"))
    lines = ["| code | DP-SGD ms/step | plain ms/step | DP / plain | DP round s | plain round s | steps | "
             "DP train loss | plain train loss |", "|---|---|---|---|---|---|---|---|---|"]
    for name, results in runs.items():
        dp, plain, dp_round, plain_round = (statistics.median(r[kind][key] for r in results)
                                            for kind, key in (("dp", "ms"), ("plain", "ms"), ("dp", "round"),
                                                              ("plain", "round")))
        first = results[0]
        lines.append(f"| {name} | {dp:.0f} | {plain:.0f} | {dp / plain:.2f} | {dp_round:.2f} | {plain_round:.2f} | "
                     f"{first['dp']['steps']} | {first['dp']['loss']:.5f} | {first['plain']['loss']:.5f} |")
    command = "python bench/step_cost.py " + " ".join(sys.argv[1:])
    section = ("## A merchant's training step (issue 14)\n\n"
               f"`{command.strip()}`\n\n"
               f"{args.config}, its first merchant, one round from the same start and seed, one torch thread, the "
               f"median of {args.repeats} runs a variant taken in turns, each after an untimed round of both kinds, "
               "the two kinds' order alternating. ms/step is the step loop's own time "
               "(`train-seconds` / steps; under DP it includes Opacus wrapping the model once); a round's seconds "
               "are `train_round`'s whole call (under DP also the noise's calibration and the accountant's epsilon "
               "after, which a fresh process pays in full).\n\n" + "\n".join(lines))
    print(section)
    if args.write:
        write_section("step_cost", section)


if __name__ == "__main__":
    main()
