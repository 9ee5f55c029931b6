"""The wide part of the model: one trainable number per feature token of a yes/no question, added to its "yes" logit.

T5 answers intent and churn through its "yes" and "no" logits, and LoRA on the output layer moves only the items'
rows (`shared.model.keep_item_rows`), so nothing a merchant trains reads those answers. What the merchants hold that
the public base lacks is per item (each item's purchase rate drifted since the public split) and per activity band
(shoppers leave more readily after a session without a purchase). `WideHead` is a linear model over those tokens,
beside the deep T5 (the "wide & deep" pattern of recommender systems):

    logit(yes) += sum over the feature tokens t of the input of  w[task, t]

- intent: the tokens after "cand" (the candidate item, its category, price and rating bands, the offered price level);
- churn: the activity-band tokens (sessions, views, mean gap, days since the last event, bought in the last session),
  and the same four numbers as numbers: each number token (`shared.tasks.number_tokens`, log2(1 + x) in quarter
  steps) reads its feature's one weight times its value, log2(1 + x) / NUMBER_UNIT. A band's weight is learnt only
  where training examples fell; the numbers' weights also reach a test shopper beyond them (BENCHMARKS.md, Churn's
  numbers as band tokens).

A next-item question has no feature tokens; its answer is an item, so the wide part gives it two terms over the
output tokens instead, added to the first decoder step's logits:

    logit(item) += NEXT_SCALE * (b[item] + [category(item) = category(last item)] * c[category(last item)])

- b: one bias per item. A change of an item's popularity is exactly a change of its log-odds of being viewed next,
  whatever came before; LoRA on `lm_head` can only approximate a constant through the decoder's varying state.
- c: one "stays in its category" weight per category: how much more likely the next item is to share the category
  of the most recent one (the category token written after `last`). Shoppers browse within a category; the small
  base learns that only in part (BENCHMARKS.md, Tuning: the wide part).

and, with a base pretrained on a public split in which shoppers viewed items one after another (`fedshop pretrain`
writes `LINKS_FILE`), a third term from which item came last:

    + NEXT_SCALE * l[category(last item)] * log(1 + n(last item -> item))

- n: how often the public split's shoppers viewed the item right after the last one (its LINK_SUCCESSORS most
  frequent successors; zero for the others): the public first-order Markov chain's counts, public knowledge like the
  catalogue's facts. Item-to-item order (a phone and its case) is per pair of items: thousands of them, each seen a
  few times, which the small T5 learns from a few hundred public shoppers only in part and which per-shopper DP noise
  drowns at a merchant; counting them costs nothing.
- l: one weight per category of the last item: how far to trust those counts. The base pretrains it with the T5 on
  leave-one-out counts (`leaving_out`: each public example's own pair counted once less, so that the weight learns
  how far counts of other shoppers predict a shopper, not a count that includes the answer), and the merchants
  train it on under DP: a dense weight that every next-item example reads.

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
The table is an embedding (`WideTable`) whose per-sample gradients under Opacus are `shared.lora_grad`'s (checked in
tests/test_wide.py).
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.tasks import NUMBER_LEVELS, NUMBER_PREFIXES, NUMBER_STEPS, churn_band_tokens

WIDE_KEY = "wide.table.weight"  # its adapter-state key (not a PEFT key: PEFT does not save it)
WIDE_FILE = "wide.safetensors"  # beside adapter_model.safetensors in a saved adapter
LINKS_FILE = "links.safetensors"  # in a base directory: the public split's item-to-item counts (`count_links`)
BLOCKS = ("intent", "churn", "next-item", "stay", "link")  # the table's row blocks, V rows each
LINK_SUCCESSORS = 20  # the most frequent public successors of an item that its link term reads
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
# A churn number enters as log2(1 + x) / NUMBER_UNIT: 0 to 3 for x up to 4,095. At 12 (0 to 1, a band's size) the
# real-shaped preset's pretraining and merchants moved the numbers' weights too little: churn 0.949 against 0.957 at 4
# (BENCHMARKS.md, Churn's numbers in the model).
NUMBER_UNIT = 4.0


class WideTable(nn.Embedding):
    """The wide part's table: an embedding whose lookup also returns one block of rows for every example, spread
    over the batch rather than looked up by a V-wide index per example (`forward`). Its per-sample gradient under
    Opacus is `shared.lora_grad.wide_table_grad_sample`. The block is the next-item block, the same V biases for
    every question: as a lookup it was three quarters of the table's indices and of its backward's work."""

    def __init__(self, num_embeddings: int, shared_rows: tuple[int, int]):
        super().__init__(num_embeddings, 1)
        self.shared_rows = shared_rows  # [start, end) of the rows every example reads

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N + shared rows, 1): the rows `ids` (B, N), then the shared rows."""
        start, end = self.shared_rows
        return torch.cat([super().forward(ids), self.weight[start:end].expand(ids.shape[0], -1, -1)], 1)


class WideHead(nn.Module):
    """Linear weights over the vocabulary, one block of V rows each (`BLOCKS`): rows [0, V) answer intent, [V, 2V)
    churn, [2V, 3V) are the next-item biases of the output tokens, [3V, 4V) the "stays in its category" weights and
    [4V, 5V) the link weights, each one per category token."""

    def __init__(self, vocab_size: int, ids: dict[str, int], churn_ids: list[int],
                 numbers: dict[int, tuple[int, float]] | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        next_block = BLOCKS.index("next-item") * vocab_size
        self.table = WideTable(len(BLOCKS) * vocab_size, (next_block, next_block + vocab_size))
        nn.init.zeros_(self.table.weight)
        # the base's weights (pretrained with the T5 on the public split; zero without): where round 0 starts
        self.register_buffer("start", torch.zeros_like(self.table.weight), persistent=False)
        self.ids = dict(ids)  # intent:, next:, churn:, cand, yes, last, pad, eos
        churn = torch.zeros(vocab_size, dtype=torch.bool)
        churn[churn_ids] = True
        self.register_buffer("churn_feature", churn, persistent=False)
        # a churn number token's row (its feature's weight: the row of the feature's first token), -1 for every
        # other token; and the value each token enters with: a number's, 1 for every other token
        number_row = torch.full((vocab_size,), -1, dtype=torch.long)
        feature_value = torch.ones(vocab_size)
        for token, (row, value) in (numbers or {}).items():
            number_row[token], feature_value[token] = row, value
        self.register_buffer("number_row", number_row, persistent=False)
        self.register_buffer("feature_value", feature_value, persistent=False)
        # the category token of each item token, each category token itself, -1 for every other token
        self.register_buffer("category_of", torch.full((vocab_size,), -1, dtype=torch.long), persistent=False)
        self.has_catalogue = False
        # the public successors of each token (LINK_SUCCESSORS, as token ids; 0 with strength 0 where fewer) and
        # log(1 + count): `set_links`; None without
        self.register_buffer("successors", None, persistent=False)
        self.register_buffer("strength", None, persistent=False)
        self.left_out: torch.Tensor | None = None  # (B,) answers whose own pair a pretraining batch leaves out
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

    def set_links(self, links: dict[str, torch.Tensor]) -> None:
        """The public split's item-to-item counts (`count_links`): each token's LINK_SUCCESSORS most frequent."""
        sources, targets, counts = (links[k].to(torch.long) for k in ("from", "to", "count"))
        order = np.lexsort((-counts.numpy(), sources.numpy()))  # by source, most frequent first
        sources, targets, counts = sources[order], targets[order], counts[order]
        first = torch.searchsorted(sources, sources)  # each pair's rank among its source's
        keep = (torch.arange(len(sources)) - first) < LINK_SUCCESSORS
        slot = (torch.arange(len(sources)) - first)[keep]
        successors = torch.zeros(self.vocab_size, LINK_SUCCESSORS, dtype=torch.long)
        strength = torch.zeros(self.vocab_size, LINK_SUCCESSORS)
        successors[sources[keep], slot] = targets[keep]
        strength[sources[keep], slot] = torch.log1p(counts[keep].to(torch.float32))
        device = self.table.weight.device
        self.successors, self.strength = successors.to(device), strength.to(device)

    @contextmanager
    def leaving_out(self, answers: torch.Tensor):
        """Inside the block each example's link counts leave out its own pair (last item -> `answers`, (B,) token
        ids): the public split's counts include every pretraining example's own answer."""
        self.left_out = answers
        try:
            yield
        finally:
            self.left_out = None

    def category_tokens(self) -> torch.Tensor:
        """The category tokens (each its own category in `category_of`)."""
        tokens = torch.arange(self.vocab_size, device=self.category_of.device)
        return torch.nonzero(self.category_of == tokens).flatten()

    def link_rows(self) -> torch.Tensor:
        """The link block's rows: one per category token."""
        return 4 * self.vocab_size + self.category_tokens()

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
            categories = self.category_tokens()
            live[3 * vocab + categories] = True
            if self.successors is not None:
                live[4 * vocab + categories] = True
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
        is_churn = task == self.ids["churn:"]
        number = is_churn & (self.number_row[input_ids] >= 0) & real
        churn = is_churn & self.churn_feature[input_ids] & real
        rows = torch.where(number, self.number_row[input_ids], input_ids) + self.vocab_size * is_churn.to(torch.int64)
        return rows, intent | churn | number

    def weights(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(table rows, weight of each position), both (B, L): 1 at the intent candidate, the one feature of its own
        (an item), DENSE_SCALE at the other feature tokens (times its value at a churn number), 0 elsewhere."""
        rows, mask = self.features(input_ids)
        candidate = torch.roll(input_ids == self.ids["cand"], 1, dims=1)
        dtype = self.table.weight.dtype
        scale = torch.where(candidate, 1.0, DENSE_SCALE * self.feature_value[input_ids]).to(dtype)
        return rows, mask.to(dtype) * scale

    def last_category(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,): the first category token after the `last` mark (the most recent item's category), -1 if none."""
        after = torch.cumsum((input_ids == self.ids["last"]).to(torch.int64), dim=1) > 0
        found = after & (self.category_of[input_ids] == input_ids)
        first = torch.argmax(found.to(torch.int64), dim=1, keepdim=True)
        return torch.where(found.any(1), input_ids.gather(1, first).squeeze(1), -1)

    def last_item(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,): the item token right after the `last` mark, -1 if none (or it is no item: semantic ids)."""
        after = torch.roll(input_ids == self.ids["last"], 1, dims=1)
        after[:, 0] = False  # what the roll brought round from the end
        position = torch.argmax(after.to(torch.int64), dim=1, keepdim=True)
        token = input_ids.gather(1, position).squeeze(1)
        category = self.category_of[token]
        return torch.where(after.any(1) & (category >= 0) & (category != token), token, -1)

    def link_counts(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, V): log(1 + public count of last item -> token) for every output token; zero without links."""
        batch = input_ids.shape[0]
        counts = torch.zeros(batch, self.vocab_size, device=input_ids.device)
        if self.successors is None:
            return counts
        last = self.last_item(input_ids)
        rows = last.clamp(min=0)
        strength = self.strength[rows] * (last >= 0).to(counts.dtype)[:, None]
        if self.left_out is not None:  # log(1 + n) -> log(1 + n - 1) on each example's own pair
            own = (self.successors[rows] == self.left_out[:, None]) & (strength > 0)
            strength = torch.where(own, torch.log(torch.expm1(strength).clamp(min=1.0)), strength)
        return counts.scatter_add(1, self.successors[rows], strength)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the "yes" term of each example (B,), the output-token terms of each example (B, V)): zero for an example
        without feature tokens, and the output terms zero but for next-item questions. One lookup of the table, so
        Opacus sees one use of it per example."""
        rows, weight = self.weights(input_ids)
        length, vocab = input_ids.shape[1], self.vocab_size
        is_next = (input_ids[:, :1] == self.ids["next:"]).to(weight.dtype)  # (B, 1)
        if is_next.any() and not self.has_catalogue:
            raise ValueError("the wide part scores next-item questions only with the catalogue's categories "
                             "(WideHead.set_catalogue, or add_lora / load_saved_adapter with facts)")
        last = self.last_category(input_ids)
        same = (self.category_of[None, :] == last[:, None]) & (last[:, None] >= 0)  # (B, V)
        category_rows = last.clamp(min=0)[:, None]
        # the last category's stay and link weights are one row each, spread over the output tokens after the
        # lookup, and the items' next-item biases the table's shared rows (`WideTable`): a lookup of V rows per
        # example for each of the three made the table's backward ~10x the work
        values = self.table(torch.cat([rows, 3 * vocab + category_rows, 4 * vocab + category_rows],
                                      1)).squeeze(-1)  # (B, L + 2 + V)
        scale = NEXT_SCALE * is_next
        links = self.link_counts(input_ids).to(weight.dtype) * (last[:, None] >= 0).to(weight.dtype)
        stay, link, items = values[:, length:length + 1], values[:, length + 1:length + 2], values[:, length + 2:]
        output = scale * (items + stay * same.to(weight.dtype) + link * links)
        return (values[:, :length] * weight).sum(1), output

    def add_to(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """`logits` (B, V) of the first decoder step with the wide term added to "yes" and a next-item question's
        terms to every output token."""
        yes_term, bias = self(input_ids)
        yes = torch.tensor([self.ids["yes"]], device=logits.device)
        logits = logits.index_add(1, yes, yes_term.to(logits.dtype).unsqueeze(1))
        return logits + bias[:, :logits.shape[1]].to(logits.dtype)


def set_wide_weights(head: WideHead, weights: torch.Tensor, *, start: bool = False) -> None:
    """Copy saved or received weights into `head` (with `start`, also as the base's weights it starts from). A wide
    part saved before the next-item or link terms existed (the intent and churn blocks alone, or all but the link
    block) loads with them zero, which is the model it was."""
    rows, vocab = head.table.weight.shape[0], head.vocab_size
    older = (2 * vocab, 4 * vocab)
    if weights.shape[1:] != head.table.weight.shape[1:] or weights.shape[0] not in (rows, *older):
        raise ValueError(f"{WIDE_KEY} has shape {tuple(weights.shape)}; this base's wide part needs "
                         f"({rows}, 1) (or ({older[1]}, 1) or ({older[0]}, 1), saved before the link or next-item "
                         "terms)")
    with torch.no_grad():
        head.table.weight.zero_()
        head.table.weight[:weights.shape[0]].copy_(weights)
        if start:
            head.start.copy_(head.table.weight)


def build_wide(tokenizer, vocab_size: int, facts=None, start: torch.Tensor | None = None,
               links: dict[str, torch.Tensor] | None = None) -> WideHead:
    """The wide part for a base's tokenizer, at the base's weights `start` (zero if None); with the catalogue's
    `facts` it can score next-item questions too (the server, which only averages the weights, builds it without),
    and with the base's public `links` (`read_links`) its link term reads them."""
    names = ["intent:", "next:", "churn:", "cand", "yes", "last"]
    ids = dict(zip(names, tokenizer.convert_tokens_to_ids(names), strict=True))
    if tokenizer.unk_token_id in ids.values():
        missing = [n for n, i in ids.items() if i == tokenizer.unk_token_id]
        raise ValueError(f"the base's tokenizer lacks the task tokens {missing} that the wide part reads")
    ids.update(pad=int(tokenizer.pad_token_id), eos=int(tokenizer.eos_token_id))
    unknown = tokenizer.unk_token_id
    churn_ids = [i for i in tokenizer.convert_tokens_to_ids(churn_band_tokens()) if i != unknown]
    numbers = {}
    for prefix in NUMBER_PREFIXES:
        levels = tokenizer.convert_tokens_to_ids([f"{prefix}{k}" for k in range(NUMBER_LEVELS + 1)])
        if levels[0] != unknown:  # a tokenizer from before the number tokens has none of them
            numbers.update({token: (levels[0], k / NUMBER_STEPS / NUMBER_UNIT)
                            for k, token in enumerate(levels) if token != unknown})
    head = WideHead(vocab_size, ids, churn_ids, numbers)
    if start is not None:
        set_wide_weights(head, start, start=True)
    if facts is not None:
        head.set_catalogue(tokenizer, facts)
        if links is not None:
            head.set_links(links)
    return head


def count_links(examples, tokenizer, facts) -> dict[str, torch.Tensor]:
    """The public split's item-to-item counts: how often each item was viewed right after another (the last item of
    a next-item example's history and its answer, as the report's Markov chain counts them), as token ids."""
    pairs = Counter((e.seen[-1], e.label) for e in examples if e.task == "next-item" and e.seen)
    items = sorted({i for pair in pairs for i in pair})
    tokens = dict(zip(items, tokenizer.convert_tokens_to_ids([str(facts.item_ids[i]) for i in items]), strict=True))
    known = [(tokens[a], tokens[b], n) for (a, b), n in sorted(pairs.items())
             if tokens[a] != tokenizer.unk_token_id and tokens[b] != tokenizer.unk_token_id]
    sources, targets, counts = zip(*known) if known else ((), (), ())
    return {"from": torch.tensor(sources, dtype=torch.int64), "to": torch.tensor(targets, dtype=torch.int64),
            "count": torch.tensor(counts, dtype=torch.int64)}


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


@contextmanager
def leaving_out(model: nn.Module, answers: torch.Tensor):
    """`WideHead.leaving_out` on the model's wide part, if it has one with links; else nothing."""
    head = wide_of(model)
    if head is None or head.successors is None:
        yield
        return
    with head.leaving_out(answers):
        yield


def save_links(links: dict[str, torch.Tensor], directory: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in links.items()}, str(Path(directory) / LINKS_FILE))


def read_links(directory: Path) -> dict[str, torch.Tensor] | None:
    """A base directory's public item-to-item counts (`count_links`), or None when it has none."""
    from safetensors.torch import load_file

    path = Path(directory) / LINKS_FILE
    return load_file(str(path)) if path.is_file() else None


def read_wide(directory: Path) -> dict[str, torch.Tensor]:
    """{WIDE_KEY: weights} from a saved adapter folder, or {} when it has none."""
    from safetensors.torch import load_file

    path = Path(directory) / WIDE_FILE
    return load_file(str(path)) if path.is_file() else {}
