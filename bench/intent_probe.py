"""Can the base's intent head learn the merchants' (drifted) purchase rates at all? No DP, no federation.

Trains LoRA on the intent examples alone, pooled from every merchant's training split, with plain Adam on random
batches, and prints intent AUC and next-item HR@10 on the first 4 merchants' valid split every quarter of the run:

    python bench/intent_probe.py --targets embed --lr 1e-3 --steps 400

It prints only (its figures are quoted in BENCHMARKS.md, Tuning, with the command).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import load_config  # noqa: E402
from shared.data import merchant_data  # noqa: E402
from shared.model import add_lora, item_rows, keep_item_rows, load_base  # noqa: E402
from shared.modeling import encode, evaluate, per_sample_loss  # noqa: E402
from shared.sources import load_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--targets", default="embed", help="lora-targets")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config).replace(lora_targets=args.targets)
    world = load_world(config)
    data = [merchant_data(config, m, world) for m in world.merchant_ids]
    base, tokenizer, _ = load_base(config.base_dir)
    model = add_lora(base, config, seed=config.seed, tokenizer=tokenizer, facts=data[0].facts)
    rows = item_rows(tokenizer, data[0].facts)
    train = encode([e for d in data for e in d.train if e.task == "intent"], tokenizer)
    valid = [e for d in data[:4] for e in d.valid]

    def score() -> str:
        m = evaluate(model, tokenizer, valid, data[0].facts, batch_size=config.eval_batch_size,
                     tasks=["intent", "next-item"])
        return f"intent AUC {m['intent-auc']:.3f}, next HR@10 {m['next-hr@10']:.3f}"

    print(f"{len(train)} intent training examples; start: {score()}", flush=True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        model.train()
        idx = torch.randint(0, len(train), (args.batch,), generator=generator)
        loss = per_sample_loss(model, train.input_ids[idx], train.attention_mask[idx], train.target_ids[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        keep_item_rows(model, rows)
        if step % max(1, args.steps // 4) == 0:
            print(f"step {step}: train loss {float(loss.detach()):.4f}, {score()} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
