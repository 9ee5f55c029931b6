"""The wide part of the model: one trainable number per feature token of a yes/no question, added to its "yes" logit.

T5 answers intent and churn through its "yes" and "no" logits, and LoRA on the output layer moves only the items'
rows (`shared.model.keep_item_rows`), so nothing a merchant trains reads those answers. What the merchants hold that
the public base lacks is per item (each item's purchase rate drifted since the public split) and per activity band
(shoppers leave more readily after a session without a purchase). `WideHead` is a linear model over those tokens,
beside the deep T5 (the "wide & deep" pattern of recommender systems):

    logit(yes) += sum over the feature tokens t of the input of  w[task, t]

- intent: the tokens after "cand" (the candidate item, its category, price and rating bands, the offered price level);
- churn: the activity-band tokens (sessions, views, mean gap, days since the last event, bought in the last session).

The candidate item's weight enters at scale 1, every other (dense) feature's at `DENSE_SCALE`. Next-item inputs have
no feature tokens, so their scores are untouched. The weights start at zero (round 0 is the base alone) and travel
with the adapter under the key `WIDE_KEY`; a saved adapter keeps them in `WIDE_FILE` beside PEFT's files (plain PEFT
does not read it: `shared.model.load_saved_wide`). They train in the same DP-SGD step as the LoRA tensors: one
clipped, noised gradient per sampled shopper covers both, so they cost no privacy of their own.
`torch.nn.Embedding` is the table, so Opacus's own per-sample gradients apply (checked in tests/test_wide.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shared.tasks import churn_tokens

WIDE_KEY = "wide.table.weight"  # its adapter-state key (not a PEFT key: PEFT does not save it)
WIDE_FILE = "wide.safetensors"  # beside adapter_model.safetensors in a saved adapter
TASKS = ("intent", "churn")
# A weight read by many examples of every shopper (a category, band or price level: "dense") enters at this scale, the
# candidate item's own weight at 1. Adam steps every weight by about the learning rate whatever its gradient, so the
# scale is the dense weights' step relative to the items': at 1 the churn bands swung by 0.07 AUC from round to
# round and intent fell back in round 2, at 0.2 both rose steadily (BENCHMARKS.md, Tuning: the wide part).
DENSE_SCALE = 0.2


class WideHead(nn.Module):
    """Per-task linear weights over the vocabulary: rows [0, V) answer intent, rows [V, 2V) churn."""

    def __init__(self, vocab_size: int, ids: dict[str, int], churn_ids: list[int]):
        super().__init__()
        self.vocab_size = vocab_size
        self.table = nn.Embedding(len(TASKS) * vocab_size, 1)
        nn.init.zeros_(self.table.weight)
        self.ids = dict(ids)  # intent:, churn:, cand, yes, pad, eos
        churn = torch.zeros(vocab_size, dtype=torch.bool)
        churn[churn_ids] = True
        self.register_buffer("churn_feature", churn, persistent=False)

    def features(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table rows, mask), both (B, L): the row each position would read and whether it is a feature token."""
        task = input_ids[:, :1]
        real = (input_ids != self.ids["pad"]) & (input_ids != self.ids["eos"])
        cand = input_ids == self.ids["cand"]
        after_cand = (torch.cumsum(cand.to(torch.int64), dim=1) > 0) & ~cand & real
        intent = (task == self.ids["intent:"]) & after_cand
        churn = (task == self.ids["churn:"]) & self.churn_feature[input_ids] & real
        rows = input_ids + self.vocab_size * (task == self.ids["churn:"]).to(torch.int64)
        return rows, intent | churn

    def weights(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table rows, weight of each position), both (B, L): 1 at the intent candidate, the one feature of its own
        (an item), DENSE_SCALE at the other feature tokens, 0 elsewhere."""
        rows, mask = self.features(input_ids)
        candidate = torch.roll(input_ids == self.ids["cand"], 1, dims=1)
        scale = torch.where(candidate, 1.0, DENSE_SCALE).to(self.table.weight.dtype)
        return rows, mask.to(self.table.weight.dtype) * scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The wide term of each example, (B,): 0 for an example without feature tokens."""
        rows, weight = self.weights(input_ids)
        return (self.table(rows).squeeze(-1) * weight).sum(1)

    def add_to(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """`logits` (B, V) of the first decoder step with the wide term added to "yes"."""
        yes = torch.tensor([self.ids["yes"]], device=logits.device)
        return logits.index_add(1, yes, self(input_ids).to(logits.dtype).unsqueeze(1))


def build_wide(tokenizer, vocab_size: int) -> WideHead:
    names = ["intent:", "churn:", "cand", "yes"]
    ids = dict(zip(names, tokenizer.convert_tokens_to_ids(names), strict=True))
    if tokenizer.unk_token_id in ids.values():
        missing = [n for n, i in ids.items() if i == tokenizer.unk_token_id]
        raise ValueError(f"the base's tokenizer lacks the task tokens {missing} that the wide part reads")
    ids.update(pad=int(tokenizer.pad_token_id), eos=int(tokenizer.eos_token_id))
    churn_ids = [i for i in tokenizer.convert_tokens_to_ids(churn_tokens()) if i != tokenizer.unk_token_id]
    return WideHead(vocab_size, ids, churn_ids)


def wide_of(model: nn.Module) -> WideHead | None:
    """The model's wide part (through an Opacus wrapper), or None."""
    while hasattr(model, "_module"):
        model = model._module
    head = getattr(model, "wide", None)
    return head if isinstance(head, WideHead) else None


def save_wide(head: WideHead, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({WIDE_KEY: head.table.weight.detach().cpu().contiguous()}, str(Path(directory) / WIDE_FILE))


def read_wide(directory: Path) -> dict[str, torch.Tensor]:
    """{WIDE_KEY: weights} from a saved adapter folder, or {} when it has none."""
    from safetensors.torch import load_file

    path = Path(directory) / WIDE_FILE
    return load_file(str(path)) if path.is_file() else {}
