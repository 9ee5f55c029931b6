"""The wide part of the model: one trainable number per feature token of a yes/no question, added to its "yes" logit.

T5 answers intent and churn through its "yes" and "no" logits, and LoRA on the output layer moves only the items'
rows (`shared.model.keep_item_rows`), so nothing a merchant trains reads those answers. What the merchants hold that
the public base lacks is per item (each item's purchase rate drifted since the public split) and per activity band
(shoppers leave more readily after a session without a purchase). `WideHead` is a linear model over those tokens,
beside the deep T5 (the "wide & deep" pattern of recommender systems):

    logit(yes) += sum over the feature tokens t of the input of  w[task, t]

- intent: the tokens after "cand" (the candidate item, its category, price and rating bands, the offered price level);
- churn: the activity-band tokens (sessions, views, mean gap, days since the last event, bought in the last session).

A next-item question has no feature tokens; its answer is an item, so the wide part gives it two terms over the
output tokens instead, added to the first decoder step's logits:

    logit(item) += NEXT_SCALE * (b[item] + [category(item) = category(last item)] * c[category(last item)])

- b: one bias per item. A change of an item's popularity is exactly a change of its log-odds of being viewed next,
  whatever came before; LoRA on `lm_head` can only approximate a constant through the decoder's varying state.
- c: one "stays in its category" weight per category: how much more likely the next item is to share the category
  of the most recent one (the category token written after `last`). Shoppers browse within a category; the small
  base learns that only in part (BENCHMARKS.md, Tuning: the wide part).

Which item has which category is public catalogue knowledge (`CatalogueFacts`): `set_catalogue` gives it to the
head. With semantic ids the first decoder step is the id's first code, its category: b is then per category, and c
the weight of keeping the last item's category.

The candidate item's weight enters at scale 1, every other (dense) feature's at `DENSE_SCALE`. The base's pretraining
on the public split trains the wide part together with the T5 (`fedshop pretrain` with wide = true) and writes it as
`WIDE_FILE` in the base directory: the public items' purchase rates, their popularity, the bands' churn risk and the
categories' stay weights, learnt without DP from public data. Round 0 starts there (`WideHead.start`; zero for a base
pretrained without it). The weights travel with the adapter under the key `WIDE_KEY`; a saved adapter keeps them in
`WIDE_FILE` beside PEFT's files (plain PEFT does not read it: `shared.model.load_saved_wide`). They train in the
same DP-SGD step as the LoRA tensors: one clipped, noised gradient per sampled shopper covers both, so they cost no
privacy of their own.
`torch.nn.Embedding` is the table, so Opacus's own per-sample gradients apply (checked in tests/test_wide.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from shared.tasks import churn_tokens

WIDE_KEY = "wide.table.weight"  # its adapter-state key (not a PEFT key: PEFT does not save it)
WIDE_FILE = "wide.safetensors"  # beside adapter_model.safetensors in a saved adapter
BLOCKS = ("intent", "churn", "next-item", "stay")  # the table's row blocks, V rows each
# A weight read by many examples of every shopper (a category, band or price level: "dense") enters at this scale, the
# candidate item's own weight at 1. Adam steps every weight by about the learning rate whatever its gradient, so the
# scale is the dense weights' step relative to the items': at 1 the churn bands swung by 0.07 AUC from round to
# round and intent fell back in round 2, at 0.2 both rose steadily (BENCHMARKS.md, Tuning: the wide part).
DENSE_SCALE = 0.2
# The next-item terms' scale: a next-item example's gradient on a bias is NEXT_SCALE * (softmax - one-hot), so the
# scale sets both their Adam step (in logits) and their share of a shopper's clipping norm. With the biases alone, at 1
# next HR@10 rose fastest but drifted with the noise from round 2 on and intent lost 0.010 AUC; at 0.2 it gained half
# as much; 0.5 gained most by round 4 (BENCHMARKS.md, Tuning: the wide part).
NEXT_SCALE = 0.5


class WideHead(nn.Module):
    """Linear weights over the vocabulary, one block of V rows each (`BLOCKS`): rows [0, V) answer intent, [V, 2V)
    churn, [2V, 3V) are the next-item biases of the output tokens, [3V, 4V) the "stays in its category" weights, one
    per category token."""

    def __init__(self, vocab_size: int, ids: dict[str, int], churn_ids: list[int]):
        super().__init__()
        self.vocab_size = vocab_size
        self.table = nn.Embedding(len(BLOCKS) * vocab_size, 1)
        nn.init.zeros_(self.table.weight)
        # the base's weights (pretrained with the T5 on the public split; zero without): where round 0 starts
        self.register_buffer("start", torch.zeros_like(self.table.weight), persistent=False)
        self.ids = dict(ids)  # intent:, next:, churn:, cand, yes, last, pad, eos
        churn = torch.zeros(vocab_size, dtype=torch.bool)
        churn[churn_ids] = True
        self.register_buffer("churn_feature", churn, persistent=False)
        # the category token of each item token, each category token itself, -1 for every other token
        self.register_buffer("category_of", torch.full((vocab_size,), -1, dtype=torch.long), persistent=False)
        self.has_catalogue = False
        self.frozen: torch.Tensor | None = None  # rows held during training (`train_only`), and their values
        self.held: torch.Tensor | None = None
        # live rows whose step is damped (`train_only`): (rows, the share of each optimizer step they keep), and
        # their values before the step
        self.damped: list[tuple[torch.Tensor, float]] = []
        self.before: list[torch.Tensor] | None = None

    def set_catalogue(self, tokenizer, facts) -> None:
        """Which item has which category (public catalogue facts), for the next-item "stay" term."""
        unknown = tokenizer.unk_token_id
        category_of = torch.full((self.vocab_size,), -1, dtype=torch.long)
        categories = [c for c in tokenizer.convert_tokens_to_ids(sorted(set(facts.category))) if c != unknown]
        category_of[categories] = torch.tensor(categories, dtype=torch.long)
        pairs = [(i, c) for i, c in zip(tokenizer.convert_tokens_to_ids(list(facts.item_ids)),
                                        tokenizer.convert_tokens_to_ids(list(facts.category)), strict=True)
                 if i != unknown and c != unknown]  # with semantic ids the items have no token of their own
        if pairs:
            items, item_categories = zip(*pairs)
            category_of[list(items)] = torch.tensor(item_categories, dtype=torch.long)
        self.category_of = category_of.to(self.table.weight.device)
        self.has_catalogue = True

    def train_only(self, tasks: list[str] | tuple[str, ...], item_rows: list[int] | None,
                   dense_step: float = 1.0, item_step: float = 1.0) -> None:
        """Let only the rows that `tasks` read move in the training that follows: the blocks of the tasks trained and,
        of next item's, the items' biases (`item_rows`; None: every token) and the categories' "stay" weights. The
        other rows get no share of the clipping norm (`mask`) and are put back to their values after every step
        (`hold`): the noise on a row no trained example reads would only move answers at random (restoring them is
        post-processing, no privacy).

        `dense_step` (config key `wide-dense-step`): the live dense rows (intent's features other than the candidate
        item, every churn band, the categories' stay weights: each read by many examples of every shopper) keep this
        share of each optimizer step (`snapshot` before it, `hold` after). Adam moves every weight by about the
        learning rate whatever its gradient, so under DP noise the few dense weights a whole task reads wander; the
        first-order gain of a step scales with it, the second-order loss from the noise with its square.

        `item_step` (config key `wide-item-step`): the same for the live per-item rows (intent's candidate-item weights,
        the next-item biases); above 1 they go further along the step they took."""
        vocab, weight = self.vocab_size, self.table.weight
        live = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
        live[:vocab] = "intent" in tasks
        live[vocab:2 * vocab] = "churn" in tasks
        if "next-item" in tasks:
            live[2 * vocab + torch.as_tensor(item_rows, dtype=torch.long, device=weight.device)
                 if item_rows is not None else slice(2 * vocab, 3 * vocab)] = True
            categories = torch.nonzero(self.category_of == torch.arange(vocab, device=weight.device)).flatten()
            live[3 * vocab + categories] = True
        self.frozen = torch.nonzero(~live).flatten()
        self.held = weight.detach()[self.frozen].clone()
        dense = torch.zeros_like(live)
        dense[:2 * vocab] = True
        if item_rows is not None:
            dense[torch.as_tensor(item_rows, dtype=torch.long, device=weight.device)] = False
        dense[3 * vocab:] = True
        self.damped = [(torch.nonzero(rows & live).flatten(), float(step))
                       for rows, step in ((dense, dense_step), (~dense, item_step)) if step != 1.0]

    def snapshot(self) -> None:
        """Before an optimizer step: remember the damped rows' values (`train_only` with a step other than 1)."""
        if self.damped:
            self.before = [self.table.weight.detach()[rows].clone() for rows, _ in self.damped]

    def mask(self) -> None:
        """Zero the held rows of the table's per-sample gradients (before DP-SGD clips them)."""
        sample = getattr(self.table.weight, "grad_sample", None)
        if sample is not None and self.frozen is not None:
            sample[:, self.frozen] = 0.0

    def hold(self) -> None:
        """After an optimizer step: put the held rows back to their values before training, and let the damped rows
        keep their share of the step they took since `snapshot`."""
        with torch.no_grad():
            if self.frozen is not None:
                self.table.weight[self.frozen] = self.held
            if self.before is not None:
                weight = self.table.weight
                for (rows, step), before in zip(self.damped, self.before, strict=True):
                    weight[rows] = before + step * (weight[rows] - before)
                self.before = None

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

    def last_category(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,): the first category token after the `last` mark (the most recent item's category), -1 if none."""
        after = torch.cumsum((input_ids == self.ids["last"]).to(torch.int64), dim=1) > 0
        found = after & (self.category_of[input_ids] == input_ids)
        first = torch.argmax(found.to(torch.int64), dim=1, keepdim=True)
        return torch.where(found.any(1), input_ids.gather(1, first).squeeze(1), -1)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the "yes" term of each example (B,), the output-token terms of each example (B, V)): zero for an example
        without feature tokens, and the output terms zero but for next-item questions. One lookup of the table, so
        Opacus sees one use of it per example."""
        rows, weight = self.weights(input_ids)
        (batch, length), vocab = input_ids.shape, self.vocab_size
        is_next = (input_ids[:, :1] == self.ids["next:"]).to(weight.dtype)  # (B, 1)
        if is_next.any() and not self.has_catalogue:
            raise ValueError("the wide part scores next-item questions only with the catalogue's categories "
                             "(WideHead.set_catalogue, or add_lora / load_saved_adapter with facts)")
        tokens = torch.arange(vocab, device=input_ids.device)
        last = self.last_category(input_ids)
        same = (self.category_of[None, :] == last[:, None]) & (last[:, None] >= 0)  # (B, V)
        values = self.table(torch.cat([rows, (2 * vocab + tokens).expand(batch, -1),
                                       (3 * vocab + last.clamp(min=0))[:, None].expand(batch, vocab)], 1)).squeeze(-1)
        scale = NEXT_SCALE * is_next
        values = values * torch.cat([weight, scale.expand(-1, vocab), scale * same.to(weight.dtype)], 1)
        return values[:, :length].sum(1), values[:, length:length + vocab] + values[:, length + vocab:]

    def add_to(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """`logits` (B, V) of the first decoder step with the wide term added to "yes" and a next-item question's
        terms to every output token."""
        yes_term, bias = self(input_ids)
        yes = torch.tensor([self.ids["yes"]], device=logits.device)
        logits = logits.index_add(1, yes, yes_term.to(logits.dtype).unsqueeze(1))
        return logits + bias[:, :logits.shape[1]].to(logits.dtype)


def set_wide_weights(head: WideHead, weights: torch.Tensor, *, start: bool = False) -> None:
    """Copy saved or received weights into `head` (with `start`, also as the base's weights it starts from). A wide
    part saved before the next-item terms existed (the intent and churn blocks alone) loads with them zero, which is
    the model it was."""
    rows, old = head.table.weight.shape[0], 2 * head.vocab_size
    if weights.shape[1:] != head.table.weight.shape[1:] or weights.shape[0] not in (rows, old):
        raise ValueError(f"{WIDE_KEY} has shape {tuple(weights.shape)}; this base's wide part needs "
                         f"({rows}, 1) (or ({old}, 1), saved without the next-item terms)")
    with torch.no_grad():
        head.table.weight.zero_()
        head.table.weight[:weights.shape[0]].copy_(weights)
        if start:
            head.start.copy_(head.table.weight)


def build_wide(tokenizer, vocab_size: int, facts=None, start: torch.Tensor | None = None) -> WideHead:
    """The wide part for a base's tokenizer, at the base's weights `start` (zero if None); with the catalogue's
    `facts` it can score next-item questions too (the server, which only averages the weights, builds it without)."""
    names = ["intent:", "next:", "churn:", "cand", "yes", "last"]
    ids = dict(zip(names, tokenizer.convert_tokens_to_ids(names), strict=True))
    if tokenizer.unk_token_id in ids.values():
        missing = [n for n, i in ids.items() if i == tokenizer.unk_token_id]
        raise ValueError(f"the base's tokenizer lacks the task tokens {missing} that the wide part reads")
    ids.update(pad=int(tokenizer.pad_token_id), eos=int(tokenizer.eos_token_id))
    churn_ids = [i for i in tokenizer.convert_tokens_to_ids(churn_tokens()) if i != tokenizer.unk_token_id]
    head = WideHead(vocab_size, ids, churn_ids)
    if start is not None:
        set_wide_weights(head, start, start=True)
    if facts is not None:
        head.set_catalogue(tokenizer, facts)
    return head


def wide_of(model: nn.Module) -> WideHead | None:
    """The model's wide part (through an Opacus wrapper), or None."""
    while hasattr(model, "_module"):
        model = model._module
    head = getattr(model, "wide", None)
    return head if isinstance(head, WideHead) else None


@contextmanager
def at_base(model: nn.Module):
    """The model's wide part at the base's weights inside the block (with PEFT's `disable_adapter`: the base alone);
    its trained weights are put back after."""
    head = wide_of(model)
    if head is None:
        yield
        return
    trained = head.table.weight.detach().clone()
    with torch.no_grad():
        head.table.weight.copy_(head.start)
    try:
        yield
    finally:
        with torch.no_grad():
            head.table.weight.copy_(trained)


def save_wide(head: WideHead, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({WIDE_KEY: head.table.weight.detach().cpu().contiguous()}, str(Path(directory) / WIDE_FILE))


def read_wide(directory: Path) -> dict[str, torch.Tensor]:
    """{WIDE_KEY: weights} from a saved adapter folder, or {} when it has none."""
    from safetensors.torch import load_file

    path = Path(directory) / WIDE_FILE
    return load_file(str(path)) if path.is_file() else {}
