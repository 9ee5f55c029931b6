"""Tensors in, losses and scores out: encoding, the per-sample loss, and evaluation of a T5 (base or LoRA).

The per-sample loss is computed here, outside the model: passing `labels=` to T5 averages tokens over the whole
batch, which under DP-SGD would weight each example by its share of the batch's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from shared.metrics import ranking_metrics, roc_auc, target_rank
from shared.tasks import CatalogueFacts, Example


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (N, L) int64, right-padded
    attention_mask: torch.Tensor  # (N, L) int64
    target_ids: torch.Tensor  # (N,) int64: every target is one token

    def __len__(self) -> int:
        return len(self.target_ids)


def encode(examples: list[Example], tokenizer: PreTrainedTokenizerFast) -> Encoded:
    if not examples:
        return Encoded(torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1), dtype=torch.long),
                       torch.zeros((0,), dtype=torch.long))
    batch = tokenizer([e.source for e in examples], padding=True, return_tensors="pt")
    targets = tokenizer.convert_tokens_to_ids([e.target for e in examples])
    if tokenizer.unk_token_id in targets:
        bad = examples[targets.index(tokenizer.unk_token_id)].target
        raise ValueError(f"target {bad!r} is not in the tokenizer's vocabulary")
    return Encoded(batch["input_ids"], batch["attention_mask"], torch.tensor(targets, dtype=torch.long))


def first_step_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the first decoder step, (B, vocab). Every fedshop target is a single token."""
    start = torch.full((input_ids.shape[0], 1), model_start_token(model), dtype=torch.long)
    out = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start)
    return out.logits[:, 0, :]


def model_start_token(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    while config is None and hasattr(model, "_module"):
        model = model._module  # Opacus GradSampleModule
        config = getattr(model, "config", None)
    return int(config.decoder_start_token_id)


def per_sample_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    target_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example's target token, shape (B,)."""
    logits = first_step_logits(model, input_ids, attention_mask)
    return nn.functional.cross_entropy(logits, target_ids, reduction="none")


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerFast, examples: list[Example], facts: CatalogueFacts,
             *, batch_size: int = 256, popularity: np.ndarray | None = None) -> dict[str, float]:
    """Task metrics of the model on `examples`, with the Bayes oracle and a popularity ranking beside them.

    intent: AUC of p(yes)/(p(yes)+p(no)); next-item: rank of the target among all catalogue items the shopper has not
    seen (ties counted against), HR@10, NDCG@10, MRR.
    """
    model.eval()
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    item_token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(facts.item_ids)), dtype=torch.long)
    out: dict[str, float] = {}
    intent = [e for e in examples if e.task == "intent"]
    if intent:
        scores = []
        for start in range(0, len(intent), batch_size):
            chunk = encode(intent[start:start + batch_size], tokenizer)
            logits = first_step_logits(model, chunk.input_ids, chunk.attention_mask)
            scores.append((logits[:, yes] - logits[:, no]).float().numpy())
        labels = np.array([e.label for e in intent])
        out["intent-auc"] = roc_auc(labels, np.concatenate(scores))
        truth = np.array([e.truth for e in intent])
        if not np.isnan(truth).any():  # real data has no oracle (NaN truth): leave the key out, reports say n/a
            out["intent-oracle-auc"] = roc_auc(labels, truth)
        out["intent-positive-rate"] = float(labels.mean())
        out["intent-examples"] = float(len(intent))
    following = [e for e in examples if e.task == "next-item"]
    if following:
        ranks = []
        for start in range(0, len(following), batch_size):
            part = following[start:start + batch_size]
            chunk = encode(part, tokenizer)
            logits = first_step_logits(model, chunk.input_ids, chunk.attention_mask)[:, item_token_ids]
            for row, example in zip(logits.float().numpy(), part, strict=True):
                ranks.append(target_rank(row, example.label, example.seen))
        for name, value in ranking_metrics(np.array(ranks)).items():
            out[f"next-{name}"] = value
        truth = np.array([e.truth for e in following])
        if not np.isnan(truth).any():
            for name, value in ranking_metrics(truth).items():
                out[f"next-oracle-{name}"] = value
        if popularity is not None:
            popular = [target_rank(popularity, e.label, e.seen) for e in following]
            for name, value in ranking_metrics(np.array(popular)).items():
                out[f"next-popularity-{name}"] = value
        out["next-examples"] = float(len(following))
    return out
