"""What each sampled shopper's gradient holds under DP-SGD: its norm against the clipping norm, by trained tasks.

On one merchant's training split and the pretrained base, takes 16 examples from each of 64 shoppers (all tasks,
or next-item alone), computes every shopper's mean gradient the way DP-SGD does (`shared.dptrain.shopper_backward`),
masks the rows held at zero (`shared.model.mask_grad_samples`) and prints the median per-shopper norm, the norm of
the batch mean (the signal the noise competes with) and that mean after clipping:

    python bench/shopper_gradients.py --config configs/default.toml

It prints only (its figures are quoted in BENCHMARKS.md, Tuning, with the command).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import load_config  # noqa: E402
from shared.data import merchant_data  # noqa: E402
from shared.dptrain import shopper_backward  # noqa: E402
from shared.lora_grad import LoraGradSampleModule  # noqa: E402
from shared.model import add_lora, freeze_for, item_rows, load_base, mask_grad_samples  # noqa: E402
from shared.modeling import encode  # noqa: E402
from shared.sources import load_world  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--shoppers", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    world = load_world(config)
    d = merchant_data(config, world.merchant_ids[0], world)
    base, tokenizer, _ = load_base(config.base_dir)
    model = add_lora(base, config, seed=config.seed, tokenizer=tokenizer, facts=d.facts)
    freeze_for(model, config.aggregation)
    rows = item_rows(tokenizer, d.facts)
    encoded = encode(d.train, tokenizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    private = LoraGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    users = sorted({e.user_id for e in d.train})[:args.shoppers]
    rng = np.random.default_rng(config.seed)
    clip = config.max_grad_norm
    print(f"{config.lora_targets} LoRA r {config.lora_r}: {sum(p.numel() for p in trainable)} trainable weights, "
          f"clip {clip:g}, {len(users)} shoppers of {world.merchant_ids[0]}")
    print("| trained tasks | median per-shopper norm | norm of the batch mean | after clipping |")
    print("|---|---|---|---|")
    for label, tasks in (("all", None), ("next-item", {"next-item"})):
        idx, owner = [], []
        for g, user in enumerate(users):
            mine = [i for i, e in enumerate(d.train) if e.user_id == user and (tasks is None or e.task in tasks)]
            take = rng.permutation(mine)[:config.examples_per_shopper]
            idx += [int(i) for i in take]
            owner += [g] * len(take)
        for p in trainable:
            p.grad_sample = None
        shopper_backward(private, trainable, encoded, torch.tensor(idx), torch.tensor(owner))
        mask_grad_samples(model, rows)
        flat = torch.cat([p.grad_sample.flatten(1) for p in trainable], dim=1)
        norms = flat.norm(dim=1)
        clipped = flat * torch.clamp(clip / norms, max=1.0)[:, None]
        print(f"| {label} | {float(norms.median()):.3f} | {float(flat.mean(0).norm()):.4f} | "
              f"{float(clipped.mean(0).norm()):.4f} |")
    private._close()


if __name__ == "__main__":
    main()
