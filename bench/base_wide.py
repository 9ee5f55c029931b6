"""The base's wide part (issue 13): round 0 on the merchants' test split, with and without the wide part pretrained
with the T5, and the wide part fitted after the T5 instead (`--after`).

For each base directory: the pretrained model as every merchant starts it (`load_base` + `add_lora`, so with the
base's wide part when it has one) scored on every merchant's test examples (metrics averaged over merchants, each
with 250 test shoppers on the default config) and on the public valid split; for a base with a wide part, also its T5
alone. With `--after`, each base pretrained without it gets a wide part fitted on the public training examples with
the T5 frozen (Adam, `--epochs` at `--lr`), the alternative to training both together.

    python bench/base_wide.py --config configs/default.toml --bases bases/small,OLD_BASE [--after] [--write]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sections import write_section  # noqa: E402

from shared.config import load_config  # noqa: E402
from shared.data import merchant_data  # noqa: E402
from shared.model import add_lora, load_base  # noqa: E402
from shared.modeling import encode, evaluate, first_step_logits  # noqa: E402
from shared.pretrain import task_weights  # noqa: E402
from shared.sources import load_world  # noqa: E402
from shared.synthetic import PUBLIC_MERCHANT  # noqa: E402
from shared.wide import wide_of  # noqa: E402

KEYS = ("intent-auc", "next-hr@10", "churn-auc")
TASKS = ["intent", "next-item", "churn"]


def scores(model, tokenizer, merchants, public) -> list[float]:
    per = {k: [] for k in KEYS}
    for data in merchants:
        result = evaluate(model, tokenizer, data.test, data.facts, tasks=TASKS)
        for key in KEYS:
            per[key].append(result[key])
    valid = evaluate(model, tokenizer, public.valid, public.facts, tasks=TASKS)
    return [float(np.mean(per[k])) for k in KEYS] + [valid[k] for k in KEYS]


def fit_after(model, tokenizer, public, config, epochs: int, lr: float) -> None:
    """The wide part fitted on the public training examples with the T5 frozen (its logits computed once)."""
    head = wide_of(model)
    train = encode(public.train, tokenizer)
    weight = task_weights(public.train, config.pretrain_weights)
    with torch.no_grad():  # the T5's logits (the wide part, built for a base without one, is still zero)
        logits = torch.cat([first_step_logits(model, train.input_ids[i:i + 512], train.attention_mask[i:i + 512])
                            for i in range(0, len(train), 512)])
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(config.seed)
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), 256):
            idx = order[i:i + 256]
            loss = (weight[idx] * torch.nn.functional.cross_entropy(
                head.add_to(logits[idx], train.input_ids[idx]), train.target_ids[idx, 0], reduction="none")).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--bases", required=True, help="comma-separated base directories")
    parser.add_argument("--after", action="store_true",
                        help="also fit a wide part after the T5 of each base without one")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config, ["wide=true"])
    world = load_world(config)
    public = merchant_data(config, PUBLIC_MERCHANT, world)
    merchants = [merchant_data(config, merchant, world) for merchant in world.merchant_ids]  # once, for every row
    rows = []
    for directory in args.bases.split(","):
        started = time.perf_counter()
        base, tokenizer, meta = load_base(directory)
        model = add_lora(base, config, seed=config.seed, tokenizer=tokenizer, facts=public.facts).eval()
        pretrained = bool(meta.get("wide"))
        label = f"`{directory}`: " + ("T5 and wide part pretrained together" if pretrained else "T5 pretrained alone")
        rows.append((label, scores(model, tokenizer, merchants, public)))
        if pretrained:
            head = model.wide
            del model.wide
            rows.append((f"`{directory}`: its T5 without the wide part",
                         scores(model, tokenizer, merchants, public)))
            model.wide = head
        elif args.after:
            fit_after(model, tokenizer, public, config, args.epochs, args.lr)
            rows.append((f"`{directory}`: wide part fitted after the T5 ({args.epochs} epochs, Adam {args.lr})",
                         scores(model, tokenizer, merchants, public)))
        print(f"{directory}: {time.perf_counter() - started:.0f} s", flush=True)
    lines = ["| round-0 model | test intent AUC | test next HR@10 | test churn AUC | public valid intent AUC | "
             "public valid next HR@10 | public valid churn AUC |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + " |" for label, values in rows]
    table = "\n".join(lines)
    print(table)
    if args.write:
        command = f"python bench/base_wide.py --config {args.config} --bases {args.bases}" + (
            " --after" if args.after else "")
        write_section("base_wide", "## The base's wide part (issue 13)\n\n"
                      f"`{command}`\n\nRound 0 (the pretrained base, as every merchant starts it) on the merchants' "
                      "test examples (mean over merchants) and on the public split's valid examples. `bases/small` is "
                      "`fedshop pretrain --config configs/default.toml` (wide = true), `bases/small-t5-only` the same "
                      "with `--set wide=false` (the base every run had before). Standard errors "
                      "on the default config's test split are about 0.011 (AUC) and 0.008 (HR@10); the rows score "
                      "the same examples.\n\n" + table)


if __name__ == "__main__":
    main()
