"""A run from a Hugging Face T5 checkpoint directory (config key base-model), timed command by command, beside the
`small` preset on the same world and the same number of steps.

    python bench/checkpoint.py [--config configs/tiny.toml] [--work /tmp/fedshop-checkpoint-bench]

Builds a t5-small-shaped T5 checkpoint (d_model 512, 6 + 6 layers, random weights: no weights are downloaded) with a
Unigram tokenizer trained by `tokenizers` on made-up words, saves both with `save_pretrained`, then runs
`fedshop pretrain --set base-model=DIR`, `fedshop simulate` and `fedshop export` on it, and the same pretrain and
simulate with the `small` preset. Both arms train the same steps (same config: pretraining epochs, rounds, batch).
Prints the table and writes it to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402

T5_SMALL = dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6)


def make_checkpoint(out: Path, vocab: int = 1000) -> int:
    """A random t5-small-shaped T5 and a trained Unigram tokenizer in Hugging Face format; returns the weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    core = Tokenizer(models.Unigram())
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    core.train_from_iterator([" ".join(rng.choice(words) for _ in range(12)) for _ in range(4000)],
                             trainers.UnigramTrainer(vocab_size=vocab, special_tokens=["<pad>", "</s>", "<unk>"],
                                                     unk_token="<unk>"))
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(vocab_size=vocab + 24, pad_token_id=0, eos_token_id=1,
                                                decoder_start_token_id=0, **T5_SMALL))
    model.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def fedshop(*args: str) -> float:
    """Run `fedshop ARGS` (the CLI, as a user does); returns its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"fedshop {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def arm(config: str, work: Path, name: str, sets: list[str], export: bool) -> dict:
    base, run = work / f"{name}-base", work / f"{name}-run"
    options = [a for s in sets for a in ("--set", s)]
    row = {"arm": name, "pretrain": fedshop("pretrain", "--config", config, *options, "--out", str(base))}
    row["simulate"] = fedshop("simulate", "--config", config, *options, "--set", f"base-dir={base}",
                              "--run-dir", str(run), "--no-progress")
    row["export"] = fedshop("export", str(run), "--out", str(work / f"{name}-export")) if export else None
    meta = json.loads((base / "fedshop_base.json").read_text())
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]["metrics"]
    row.update(size=meta["model-size"], valid=meta["public-valid-metrics"], final=final)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedshop-checkpoint-bench"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    checkpoint = args.work / "t5-small-checkpoint"
    started = time.perf_counter()
    weights = make_checkpoint(checkpoint)
    built = time.perf_counter() - started
    rows = [arm(args.config, args.work, "checkpoint", [f"base-model={checkpoint}"], export=True),
            arm(args.config, args.work, "small", ["model-size=small"], export=False)]
    lines = ["| base | pretrain s | simulate s | export s | public valid intent AUC / next HR@10 (base) | "
             "final intent AUC / next HR@10 / churn AUC (federated, round 2) |", "|---|---|---|---|---|---|"]
    for r in rows:
        v, f = r["valid"], r["final"]
        lines.append(f"| {r['arm']} (`{r['size']}`) | {r['pretrain']:.0f} | {r['simulate']:.0f} | "
                     + (f"{r['export']:.0f}" if r["export"] is not None else "-")
                     + f" | {v['intent-auc']:.3f} / {v['next-hr@10']:.3f} | "
                     f"{f['intent-auc']:.3f} / {f['next-hr@10']:.3f} / {f['churn-auc']:.3f} |")
    command = f"python bench/checkpoint.py --config {args.config}"
    section = "\n".join([
        "## A run from a T5 checkpoint directory (issue 18)", "",
        f"`{command}` (2 CPU cores). A t5-small-shaped checkpoint ({weights / 1e6:.1f} M weights, random: nothing is "
        f"downloaded; built and saved in {built:.0f} s) as `base-model`, against the `small` preset on the same "
        "world with the same steps (same pretraining epochs, rounds and batch). Wall times of each CLI command, "
        "imports included. The checkpoint's weights are random, so its metrics say what the t5-small shape learns "
        "in these few steps, not what a trained T5 brings.", "", *lines])
    print(section)
    write_section("checkpoint", section)


if __name__ == "__main__":
    main()
