"""`fedshop pretrain`: the base model, trained without DP on the platform's public split only.

Merchants' private shoppers are never seen here: the public split's shoppers are disjoint from every merchant's,
and the catalogue facts (item, category, price band, rating band) are public. Supervised pretraining on the same
tasks teaches the item embeddings what an item is, which frozen embeddings under LoRA could not learn later.

With wide = true the wide part (`shared.wide`) trains together with the T5 and is saved beside it (`WIDE_FILE`): the
public items' purchase rates and popularity, the bands' churn risk and the categories' stay weights. Fitted after
the T5 instead, on the examples the T5 had already fitted, the churn weights learnt the T5's overconfidence and lost
churn AUC; fitted with it, every task gains (BENCHMARKS.md, The base's wide part).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from shared.config import FedShopConfig
from shared.data import catalogue_facts, catalogue_fingerprint, merchant_data, public_shopper_count, vocabulary
from shared.locks import directory_lock
from shared.model import build_base, check_checkpoint, from_checkpoint, save_base
from shared.modeling import encode, evaluate, per_sample_loss, resolve_device, width_groups
from shared.semantic import SemanticIds, build_semantic_ids
from shared.sources import load_world
from shared.synthetic import PRICE_BANDS, PUBLIC_MERCHANT, SyntheticData
from shared.tasks import CatalogueFacts, Example
from shared.tokenizer import build_tokenizer, check_whole_words, domain_tokens
from shared.wide import build_wide, count_links, leaving_out, wide_of

log = logging.getLogger("fedshop")
RELATIVE_BIAS_LR_SCALE = 30.0  # the relative attention bias learns this much faster than the other weights
WIDE_LR_SCALE = 10.0  # the wide part's weights likewise (one number per token; no weight decay)
CATEGORY_INIT_SHARE = 0.8  # an item's initial embedding: this share of its category's, the rest its own noise


def init_items_from_categories(model: torch.nn.Module, tokenizer, facts: CatalogueFacts) -> None:
    """Start each item's (tied input/output) embedding near its category's, from the public catalogue facts.

    The next item mostly stays in the last item's category; with random item embeddings the output layer must learn
    every item's category from its own few target occurrences, with this it starts knowing it.
    """
    items = tokenizer.convert_tokens_to_ids(list(facts.item_ids))
    categories = tokenizer.convert_tokens_to_ids(list(facts.category))
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight[items] = (CATEGORY_INIT_SHARE * weight[categories]
                         + (1.0 - CATEGORY_INIT_SHARE ** 2) ** 0.5 * weight[items])


def task_weights(examples: list[Example], weights: dict[str, float]) -> torch.Tensor:
    """Per-example loss weights whose batch mean is, in expectation, the weighted mean of the tasks' mean losses.

    A task's examples share its weight over their count, and the weights average to 1 over the data (so the
    learning rate keeps its scale): with one example per view for intent and for next-item and a few churn cutoffs
    per shopper, plain averaging let next-item's large loss (~ln of the catalogue) decide every update.
    """
    tasks = [e.task for e in examples]
    counts = {task: tasks.count(task) for task in set(tasks)}
    total = sum(weights.get(task, 1.0) for task in counts)
    return torch.tensor([weights.get(t, 1.0) * len(tasks) / (counts[t] * total) for t in tasks], dtype=torch.float32)


def public_semantic_ids(config: FedShopConfig, data: SyntheticData) -> SemanticIds:
    """Semantic ids of every catalogue item from its public facts and the public split's co-views (in time order)."""
    facts = catalogue_facts(data)
    index = facts.index()
    events = data.events.take(np.flatnonzero((data.events.merchant_id == PUBLIC_MERCHANT)
                                             & (data.events.event == "view")))
    views: dict[str, list[int]] = {}
    for user, item in zip(events.user_id.tolist(), events.item_id.tolist(), strict=True):
        views.setdefault(user, []).append(index[item])  # the world's events are in time order per shopper
    return build_semantic_ids(facts, [f"p{b}" for b in range(PRICE_BANDS)], list(views.values()),
                              config.semantic_clusters, config.seed)


def starting_model(config: FedShopConfig, facts: CatalogueFacts) -> tuple[torch.nn.Module, object, dict]:
    """The model pretraining starts from, its tokenizer, and its origin for the base's metadata: a fresh T5 of the
    model-size preset over fedshop's own tokenizer, or the base-model checkpoint with the domain tokens added."""
    words = vocabulary(facts)
    if config.base_model:
        return from_checkpoint(config.base_model, domain_tokens(*words), seed=config.seed)
    tokenizer = build_tokenizer(*words)
    return build_base(config.model_size, tokenizer, seed=config.seed), tokenizer, {"model-size": config.model_size}


def pretrain(config: FedShopConfig, base_dir: str | Path | None = None) -> dict[str, float]:
    """Pretrain a base on the public split and write it to `base_dir` (default: base-dir), holding its lock."""
    base_dir = Path(base_dir or config.base_dir)
    resolve_device(config.device)  # a wrong device or checkpoint is named before the data is loaded
    if config.base_model:
        check_checkpoint(config.base_model)
    with directory_lock(base_dir, "base directory"):
        return _pretrain(config, base_dir)


def _pretrain(config: FedShopConfig, base_dir: Path) -> dict[str, float]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    data = load_world(config)
    semantic = public_semantic_ids(config, data) if config.item_ids == "semantic" else None
    public = merchant_data(config, PUBLIC_MERCHANT, data, semantic=semantic)
    model, tokenizer, origin = starting_model(config, public.facts)
    if config.base_model:  # a checkpoint's own tokenizer must still read every source word as one token
        check_whole_words(tokenizer, [e.source for e in public.train + public.valid],
                          f"config key 'base-model' = {config.base_model!r}")
    if not public.facts.semantic:  # semantic ids are made of category, band and code tokens: nothing per item
        init_items_from_categories(model, tokenizer, public.facts)
    links = None
    if config.wide:  # a submodule while training (first_step_logits adds it), saved apart from the T5
        if config.wide_links and not public.facts.semantic:  # the public item-to-item counts the link term reads
            links = count_links(public.train, tokenizer, public.facts)
        model.wide = build_wide(tokenizer, model.get_input_embeddings().num_embeddings, public.facts, links=links)
    device = resolve_device(config.device)
    model.to(device)
    train = encode(public.train, tokenizer)
    weight = task_weights(public.train, config.pretrain_weights).to(device)
    # T5 has no absolute positions and its cross-attention none at all: "which item came last" reaches the decoder
    # only through the relative attention bias, whose entries must grow to O(several) to attend sharply; at the
    # common lr they move ~lr per Adam step and stay near 0 for the whole of a short schedule.
    lr = config.pretrain_learning_rate
    bias = [p for n, p in model.named_parameters() if "relative_attention_bias" in n]
    wide = [p for n, p in model.named_parameters() if n.startswith("wide.")]
    rest = [p for n, p in model.named_parameters() if "relative_attention_bias" not in n and not n.startswith("wide.")]
    groups = [dict(params=rest, lr=lr, weight_decay=0.01),
              dict(params=bias, lr=lr * RELATIVE_BIAS_LR_SCALE, weight_decay=0.0)]
    if wide:
        groups.append(dict(params=wide, lr=lr * WIDE_LR_SCALE, weight_decay=0.0))
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = max(1, -(-len(train) // config.pretrain_batch_size))
    total_steps = steps_per_epoch * config.pretrain_epochs
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                    total_steps=max(1, total_steps), pct_start=0.1)
    generator = torch.Generator().manual_seed(config.seed)
    shoppers = public_shopper_count(data)  # on a real log the split's own size, not the synthetic knob
    log.info("pretraining %s on the public split: %d shoppers, %d examples, %d steps on %s",
             f"from the checkpoint {origin['base-model']}" if config.base_model else f"a {config.model_size} base",
             shoppers, len(train), total_steps, device)
    model.train()
    for epoch in range(config.pretrain_epochs):
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for step in range(steps_per_epoch):
            idx = order[step * config.pretrain_batch_size:(step + 1) * config.pretrain_batch_size]
            # drop columns that are padding in the whole batch: one pass, trimmed (`width_groups`)
            ((_, width),) = width_groups(train.attention_mask[idx], max_groups=1)
            targets = train.target_ids[idx].to(device)
            with leaving_out(model, targets[:, 0]):  # the link term's counts, without each example's own pair
                losses = per_sample_loss(model, train.input_ids[idx, :width].to(device),
                                         train.attention_mask[idx, :width].to(device), targets, config.train_precision)
            loss = (weight[idx.to(device)] * losses).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        log.info("pretrain epoch %d/%d: loss %.4f", epoch + 1, config.pretrain_epochs, total / steps_per_epoch)
    metrics = evaluate(model, tokenizer, public.valid, public.facts, batch_size=config.eval_batch_size,
                       tasks=config.task_list, precision=config.eval_precision)
    model.to("cpu")  # the base directory holds CPU tensors, whatever device trained it
    head = wide_of(model)
    if head is not None:
        del model.wide  # saved apart: the T5's own files must not hold it
    metrics["pretrain-seconds"] = time.perf_counter() - started
    meta = {
        **origin, "seed": config.seed, "trained-on": "public platform split (no DP)",
        "public-shoppers": shoppers, "num-items": config.num_items,
        "num-categories": config.num_categories, "pretrain-epochs": config.pretrain_epochs,
        "pretrain-task-weights": config.pretrain_weights,
        "catalogue-sha256": catalogue_fingerprint(public.facts), "item-ids": config.item_ids,
        "public-valid-metrics": metrics, "wide": head is not None,
        "wide-links": 0 if links is None else len(links["count"]),  # item pairs the link term counts
    }
    if semantic is not None:
        meta["semantic-clusters"] = config.semantic_clusters
    save_base(model, tokenizer, base_dir, meta, wide=head, links=links)
    if semantic is not None:
        semantic.save(base_dir)
    log.info("base written to %s (%.0f s): public valid %s", base_dir, metrics["pretrain-seconds"],
             ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if "oracle" not in k and "examples" not in k))
    return metrics
