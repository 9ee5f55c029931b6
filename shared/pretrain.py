"""`fedshop pretrain`: the base model, trained without DP on the platform's public split only.

Merchants' private shoppers are never seen here: the public split's shoppers are disjoint from every merchant's,
and the catalogue facts (item, category, price band) are public. Supervised pretraining on the same tasks teaches the
item embeddings what an item is, which frozen embeddings under LoRA could not learn later.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from shared.config import FedShopConfig
from shared.data import merchant_data, vocabulary
from shared.model import build_base, save_base
from shared.modeling import encode, evaluate, per_sample_loss
from shared.synthetic import PUBLIC_MERCHANT, generate
from shared.tokenizer import build_tokenizer

log = logging.getLogger("fedshop")


def pretrain(config: FedShopConfig, base_dir: str | Path | None = None) -> dict[str, float]:
    base_dir = Path(base_dir or config.base_dir)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    data = generate(config)
    public = merchant_data(config, PUBLIC_MERCHANT, data)
    tokenizer = build_tokenizer(*vocabulary(public.facts))
    model = build_base(config.model_size, tokenizer, seed=config.seed)
    train = encode(public.train, tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.pretrain_learning_rate, weight_decay=0.01)
    steps_per_epoch = max(1, -(-len(train) // config.pretrain_batch_size))
    total_steps = steps_per_epoch * config.pretrain_epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.pretrain_learning_rate,
                                                    total_steps=max(1, total_steps), pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    log.info("pretraining %s base on the public split: %d shoppers, %d examples, %d steps", config.model_size,
             config.public_shoppers, len(train), total_steps)
    model.train()
    for epoch in range(config.pretrain_epochs):
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * config.pretrain_batch_size:(step + 1) * config.pretrain_batch_size]
            loss = per_sample_loss(model, train.input_ids[idx], train.attention_mask[idx],
                                   train.target_ids[idx]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        log.info("pretrain epoch %d/%d: loss %.4f", epoch + 1, config.pretrain_epochs, total / steps_per_epoch)
    metrics = evaluate(model, tokenizer, public.valid, public.facts, batch_size=config.eval_batch_size)
    metrics["pretrain-seconds"] = time.perf_counter() - started
    meta = {
        "model-size": config.model_size, "seed": config.seed, "trained-on": "public platform split (no DP)",
        "public-shoppers": config.public_shoppers, "num-items": config.num_items,
        "num-categories": config.num_categories, "pretrain-epochs": config.pretrain_epochs,
        "public-valid-metrics": metrics,
    }
    save_base(model, tokenizer, base_dir, meta)
    log.info("base written to %s (%.0f s): public valid %s", base_dir, metrics["pretrain-seconds"],
             ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "oracle" not in k and "examples" not in k))
    return metrics
