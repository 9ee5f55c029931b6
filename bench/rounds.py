"""Where a merchant's round goes: the message's parts, the cost of a DP step, bf16 against fp32, and the CPU's peak.

    python bench/rounds.py --config configs/default.toml [--sizes t5-small] [--threads 2] [--simulate 4] [--write]

Everything is measured in this one process, one after the other, on the config's first merchant:
1. this machine's matmul peak (torch.mm of two 2048 x 2048 matrices, median of 5), fp32 and bf16;
2. the parts of a train message as the ClientApp runs them: importing it (a fresh interpreter), building the
   merchant's data (the world built; read from the disk world cache, as a new process does; then from the
   per-process cache), loading the base and adding LoRA, encoding,
   the training steps, and evaluating the test split;
3. ms per training step, plain and DP-SGD, fp32 and bf16, with the train loss and the valid metrics after the
   same steps from the same start (the round's own schedule, `--epochs` local epochs);
4. the step's FLOPs (torch's FlopCounterMode on one plain forward and backward of an expected batch) over its time:
   the achieved FLOP/s as a share of the matmul peak.
For each extra `--sizes` preset without a pretrained base (e.g. t5-small), step times use a randomly initialised
base of that shape (speed does not depend on the weights) with `--small-batch` shoppers a step and one example each.
With `--simulate N`, a real N-merchant simulation of the config (2 rounds, fp32 then bf16) gives the share of the
round spent in training steps, from its own `metrics.jsonl`.
The table goes to stdout and, with --write, to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sections import write_section  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.data import merchant_data  # noqa: E402
from shared.dptrain import PrivacyState, calibrate, records_for, train_round  # noqa: E402
from shared.model import add_lora, build_base, item_rows, load_base  # noqa: E402
from shared.modeling import encode, evaluate, per_sample_loss  # noqa: E402
from shared.sources import clear_world_cache, load_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of torch.mm on two n x n matrices, median of `repeats` after a warm-up."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - started)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def import_seconds() -> float:
    """Wall time of importing the ClientApp and its handlers' modules in a fresh interpreter (what each actor
    process pays once: `client.client_app` imports them on the first train or evaluate message)."""
    code = ("import time; t = time.perf_counter(); import client.client_app, client.training; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def message_parts(config) -> tuple[list[tuple[str, float]], object, object, object]:
    """Seconds of each part of one train message (and evaluation), as the ClientApp runs them."""
    parts = [("import the ClientApp (fresh interpreter, once per actor)", import_seconds())]
    clear_world_cache()
    world, seconds = timed(lambda: load_world(config.replace(world_cache_dir="")))
    merchant = world.merchant_ids[0]
    _, more = timed(lambda: merchant_data(config, merchant, world))
    parts.append(("build the merchant's data, the world built (no disk cache)", seconds + more))
    clear_world_cache()
    load_world(config)  # its disk cache entry written (or found): what every later process reads
    clear_world_cache()
    data, seconds = timed(lambda: merchant_data(config, merchant))
    parts.append(("build the merchant's data, first message of a process (world from the disk cache)", seconds))
    _, seconds = timed(lambda: merchant_data(config, merchant))
    parts.append(("the same, later messages (per-process cache)", seconds))
    (base, tokenizer, _), seconds = timed(lambda: load_base(config.base_dir))
    model, more = timed(lambda: add_lora(base, config, tokenizer=tokenizer, facts=data.facts))
    parts.append(("load the base, add LoRA", seconds + more))
    encoded, seconds = timed(lambda: encode(data.train, tokenizer))
    parts.append(("encode the training examples", seconds))
    state = PrivacyState(noise_multiplier=calibrate(len(records_for(len(data.train),
                                                                    [e.user_id for e in data.train], config)),
                                                    config))
    result, seconds = timed(lambda: train_round(model, encoded, config, state, seed=1,
                                                owners=[e.user_id for e in data.train],
                                                output_rows=item_rows(tokenizer, data.facts)))
    parts.append((f"DP-SGD round ({result.steps} steps)", seconds))
    _, seconds = timed(lambda: evaluate(model, tokenizer, data.test, data.facts, batch_size=config.eval_batch_size,
                                        tasks=config.task_list, precision=config.eval_precision))
    parts.append(("evaluate the test split (evaluate message)", seconds))
    return parts, data, tokenizer, encoded


def step_costs(config, data, tokenizer, encoded, base_factory, valid: bool) -> list[dict]:
    """ms per step and the metrics after one round, for plain/DP x fp32/bf16, each from the same fresh LoRA."""
    rows = []
    owners = [e.user_id for e in data.train]
    for dp in (False, True):
        for precision in ("fp32", "bf16"):
            run = config.replace(dp=dp, precision=precision)
            model = add_lora(base_factory(), run, seed=run.seed, tokenizer=tokenizer, facts=data.facts)
            state = PrivacyState(noise_multiplier=calibrate(len(records_for(len(data.train), owners, run)), run)
                                 if dp else None)
            started = time.perf_counter()
            result = train_round(model, encoded, run, state, seed=3, owners=owners,
                                 output_rows=item_rows(tokenizer, data.facts))
            seconds = time.perf_counter() - started
            row = {"dp": dp, "precision": precision, "steps": result.steps,
                   "ms": 1000 * result.train_seconds / result.steps, "other": seconds - result.train_seconds,
                   "loss": result.train_loss}
            if valid:
                metrics = evaluate(model, tokenizer, data.valid, data.facts, batch_size=run.eval_batch_size,
                                   tasks=run.task_list, precision=precision)
                row.update({k: metrics.get(k, float("nan")) for k in ("intent-auc", "next-hr@10", "churn-auc")})
            rows.append(row)
    return rows


def step_flops(config, encoded, base_factory, tokenizer, facts) -> float:
    """FLOPs of one plain forward and backward of an expected batch (LoRA model, fp32)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = add_lora(base_factory(), config, seed=config.seed, tokenizer=tokenizer, facts=facts)
    model.train()
    rows = max(1, round(config.batch_size * config.examples_per_shopper))
    idx = torch.arange(min(rows, len(encoded)))
    with FlopCounterMode(display=False) as counter:
        per_sample_loss(model, encoded.input_ids[idx], encoded.attention_mask[idx], encoded.target_ids[idx]).sum(
        ).backward()
    return float(counter.get_total_flops()) * rows / len(idx)


def simulated_rounds(config_path: str, merchants: int, precision: str) -> list[str]:
    """The report's timing line of a real `fedshop simulate` of `merchants` x 2 rounds (no references)."""
    import tempfile

    from server.report import timing_lines
    from shared.rundir import RunDirectory

    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "server.cli", "simulate", "--config", config_path, "--run-dir", tmp,
                   "--force", "--set", f"num-merchants={merchants}", "--set", "num-rounds=2", "--set",
                   "references=none", "--set", f"precision={precision}", "--set", "torch-threads=1"]
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
        return timing_lines([r for r in RunDirectory(tmp).read_metrics() if r.get("scope") == "train"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--sizes", default="", help="extra model-size presets for step times (e.g. t5-small)")
    parser.add_argument("--epochs", type=int, default=2, help="local epochs of the timed rounds")
    parser.add_argument("--small-batch", type=int, default=32, help="shoppers a step for the extra presets")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--simulate", type=int, default=0, help="also time a real simulation of this many merchants")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config).replace(torch_threads=args.threads, local_epochs=args.epochs)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    parts, data, tokenizer, encoded = message_parts(config)
    base_dir = config.base_dir
    steps = step_costs(config, data, tokenizer, encoded, lambda: load_base(base_dir)[0], valid=True)
    flops = step_flops(config, encoded, lambda: load_base(base_dir)[0], tokenizer, data.facts)
    plain32 = next(r for r in steps if not r["dp"] and r["precision"] == "fp32")
    extra = {}
    for size in [s for s in args.sizes.split(",") if s]:
        small = config.replace(model_size=size, batch_size=args.small_batch, examples_per_shopper=1, local_epochs=1)
        extra[size] = (small, step_costs(small, data, tokenizer, encoded,
                                         lambda s=size: build_base(s, tokenizer, seed=1), valid=False),
                       step_flops(small, encoded, lambda s=size: build_base(s, tokenizer, seed=1), tokenizer,
                                  data.facts))

    def in_first_message(name: str) -> bool:
        return not any(word in name for word in ("later messages", "import", "no disk cache"))

    total = sum(s for name, s in parts if in_first_message(name))
    sizes = args.sizes or '""'
    lines = [
        "## Rounds: where a merchant's message goes (issue 14)",
        "",
        f"`python bench/rounds.py --config {args.config} --sizes {sizes} --epochs {args.epochs} "
        f"--threads {args.threads} --simulate {args.simulate} --write` ({time.strftime('%Y-%m-%d')}, "
        f"{args.threads} threads, one process, the config's first merchant: {len(data.train)} training examples, "
        f"{config.privacy_unit} unit).",
        "",
        f"Matmul peak (torch.mm 2048², median of 5): **fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s** "
        f"({peak16 / peak32:.1f}×).",
        "",
        "| part of a train message | s | share of a first message |",
        "|---|---|---|",
    ]
    for name, seconds in parts:
        share = f"{100 * seconds / total:.0f} %" if in_first_message(name) else ""
        lines.append(f"| {name} | {seconds:.2f} | {share} |")
    lines += ["", "The share column is a first message of a process whose world is in the disk cache (the simulation "
              "below reads the entry written here); it leaves out the import (paid once per actor process), the "
              "world built without the cache and the per-process rebuild.", "",
              f"Training steps on `{config.model_size}` ({args.epochs} local epochs, the config's batch: "
              f"{config.batch_size} shoppers × {config.examples_per_shopper} examples expected), each row from the "
              "same fresh LoRA and seed; metrics on the merchant's valid split after that one round:", "",
              "| model | DP | precision | steps | ms / step | vs plain fp32 | rest of the round, s | train loss | "
              "intent AUC | next HR@10 | churn AUC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in steps:
        lines.append(f"| {config.model_size} | {'yes' if r['dp'] else 'no'} | {r['precision']} | {r['steps']} | "
                     f"{r['ms']:.0f} | {r['ms'] / plain32['ms']:.2f}× | {r['other']:.2f} | {r['loss']:.3f} | "
                     f"{r['intent-auc']:.3f} | {r['next-hr@10']:.3f} | {r['churn-auc']:.3f} |")
    lines += ["", "ms / step is the step loop's own time (`train-seconds` / steps; under DP it includes Opacus "
              "wrapping the model once); \"rest of the round\" is the rest of `train_round`: under DP the "
              "accountant's budget check before the round and its ε after it."]
    achieved = flops / (plain32["ms"] / 1000) / 1e9
    lines += ["", f"Plain fp32 step on `{config.model_size}`: {flops / 1e9:.2f} GFLOP (forward + backward of an "
              f"expected batch, FlopCounterMode) in {plain32['ms']:.0f} ms = **{achieved:.1f} GFLOP/s, "
              f"{100 * achieved / peak32:.0f} % of the fp32 matmul peak**."]
    for size, (small, rows, f) in extra.items():
        base32 = next(r for r in rows if not r["dp"] and r["precision"] == "fp32")
        lines += ["", f"`{size}` shape, randomly initialised (speed only), {small.batch_size} shoppers × 1 example "
                  f"a step expected, LoRA `{small.lora_targets}` r {small.lora_r}:", "",
                  "| model | DP | precision | steps | ms / step | vs plain fp32 | rest of the round, s | train loss |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {size} | {'yes' if r['dp'] else 'no'} | {r['precision']} | {r['steps']} | "
                         f"{r['ms']:.0f} | {r['ms'] / base32['ms']:.2f}× | {r['other']:.2f} | {r['loss']:.3f} |")
        got = f / (base32["ms"] / 1000) / 1e9
        lines.append("")
        lines.append(f"Plain fp32 step: {f / 1e9:.2f} GFLOP in {base32['ms']:.0f} ms = {got:.1f} GFLOP/s, "
                     f"{100 * got / peak32:.0f} % of the fp32 peak.")
    for precision in ("fp32", "bf16") if args.simulate else ():
        lines += ["", f"`fedshop simulate --config {args.config}` with {args.simulate} merchants × 2 rounds, no "
                  f"references, precision {precision}, one thread per merchant actor; the report's line:", "",
                  *simulated_rounds(args.config, args.simulate, precision)]
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("rounds", table)


if __name__ == "__main__":
    main()
