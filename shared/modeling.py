"""Tensors in, losses and scores out: encoding, the per-sample loss, and evaluation of a T5 (base or LoRA).

The per-sample loss is computed here, outside the model: passing `labels=` to T5 averages tokens over the whole
batch, which under DP-SGD would weight each example by its share of the batch's tokens.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerFast

from shared.baselines import Baselines
from shared.config import DEVICES, ConfigError
from shared.metrics import binary_metrics, elasticity, ranking_metrics, target_rank
from shared.outputs import Outputs
from shared.tasks import PRICE_LEVELS, CatalogueFacts, Example, level_token
from shared.wide import wide_of

if TYPE_CHECKING:
    from shared.config import FedShopConfig
    from shared.data import MerchantData

IGNORE = -100  # a target position past the end of a shorter target


@dataclass
class Encoded:
    input_ids: torch.Tensor  # (N, L) int64, right-padded
    attention_mask: torch.Tensor  # (N, L) int64
    target_ids: torch.Tensor  # (N, T) int64: T is 1 unless a semantic item id is a target; IGNORE past the end
    tasks: tuple[str, ...] = ()  # the task of each row (empty: unknown)

    def __len__(self) -> int:
        return len(self.target_ids)


def encode_teaching(data: MerchantData, config: FedShopConfig, tokenizer: PreTrainedTokenizerFast
                    ) -> tuple[list[Example], Encoded]:
    """A merchant's training examples (`MerchantData.teaching`) and their encoding, kept on `data` for the next
    round (a process keeps a merchant's data between messages: `served_merchant_data`), keyed by the train tasks
    and the tokenizer's vocabulary. Encoding a merchant's 6,000 examples took 0.4 s a message."""
    key = ("teaching", tuple(config.train_task_list), hash(tuple(sorted(tokenizer.get_vocab().items()))))
    if key not in data.derived:
        teaching = data.teaching(config)
        data.derived[key] = (teaching, encode(teaching, tokenizer))
    return data.derived[key]


def encode(examples: list[Example], tokenizer: PreTrainedTokenizerFast) -> Encoded:
    if not examples:
        return Encoded(torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1), dtype=torch.long),
                       torch.zeros((0, 1), dtype=torch.long))
    batch = tokenizer([e.source for e in examples], padding=True, return_tensors="pt")
    pieces = [e.target.split() for e in examples]
    flat = tokenizer.convert_tokens_to_ids([t for piece in pieces for t in piece])
    if tokenizer.unk_token_id in flat:
        bad = next(e.target for e, piece in zip(examples, pieces, strict=True)
                   if tokenizer.unk_token_id in tokenizer.convert_tokens_to_ids(piece))
        raise ValueError(f"target {bad!r} is not in the tokenizer's vocabulary")
    width = max(len(piece) for piece in pieces)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    at = 0
    for row, piece in enumerate(pieces):
        targets[row, :len(piece)] = torch.tensor(flat[at:at + len(piece)], dtype=torch.long)
        at += len(piece)
    return Encoded(batch["input_ids"], batch["attention_mask"], targets, tuple(e.task for e in examples))


def autocast(precision: str, device: torch.device | str = "cpu"):
    """The context of a forward pass at `precision` (config key `precision`): bf16 is torch's autocast (matmuls run
    in bfloat16 on bfloat16 copies, the weights stay float32; callers read the logits as float32), fp32 does
    nothing. Backward passes run outside it. `precision` is what the config's train_precision or eval_precision
    gives."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast's precision must be fp32 or bf16, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def resolve_device(name: str) -> torch.device:
    """Config key `device` as a torch device: auto is cuda when torch sees a CUDA device, else cpu; cuda without one
    is a ConfigError."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config key 'device' = 'cuda': torch {torch.__version__} sees no CUDA device on this "
                          "machine (torch.cuda.is_available() is false); use device = auto or cpu")
    return torch.device(name)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's weights (its inputs go there; scores come back to the CPU)."""
    return next(model.parameters()).device


def first_step_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of the first decoder step, (B, vocab): all a one-token target (yes/no, an item token) needs."""
    start = torch.full((input_ids.shape[0], 1), model_start_token(model), dtype=torch.long, device=input_ids.device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=start).logits[:, 0, :]
    head = wide_of(model)
    return logits if head is None else head.add_to(logits, input_ids)


def model_config(model: nn.Module):
    config = getattr(model, "config", None)
    while config is None and hasattr(model, "_module"):
        model = model._module  # Opacus GradSampleModule
        config = getattr(model, "config", None)
    return config


def model_start_token(model: nn.Module) -> int:
    return int(model_config(model).decoder_start_token_id)


WIDTH_GROUPS = 3  # at most this many forward passes a training batch (`width_groups`)
WIDTH_SAVING = 0.05  # a batch is split further only where that saves this share of its padded tokens


def width_groups(attention_mask: torch.Tensor, max_groups: int | None = None) -> list[tuple[torch.Tensor, int]]:
    """The rows of a batch as (row positions, width) groups of similar source length: each group runs trimmed to
    the width of its longest source and pays for no padding its rows do not need. A merchant's encoding pads every
    source to its longest, and the tasks differ in length (with the default config a churn question is 20 tokens,
    next item's 10, intent's 16: a quarter of a mixed batch's encoder tokens were padding). Greedy: split where a
    split saves the most padded tokens while it saves at least `WIDTH_SAVING` of the batch's, into at most `max_groups`
    (default `WIDTH_GROUPS`). A row's width is its last attended position + 1, so a left-padded batch is never cut
    short. Every row is in exactly one group. Pretraining keeps one pass a batch: its backward runs through the
    whole T5, and three passes of 128 rows cost more than the padding they save (an epoch 27 s against 20 s)."""
    count, full = attention_mask.shape
    if count == 0:
        return []
    attended = attention_mask.detach().cpu().numpy() != 0
    widths = np.where(attended.any(1), full - np.argmax(attended[:, ::-1], axis=1), 1)
    order = np.argsort(widths, kind="stable")
    ascending = widths[order]
    cuts = [0, count]  # group k holds the sorted rows cuts[k]:cuts[k + 1]
    padded = count * int(ascending[-1])
    while len(cuts) - 1 < (max_groups or WIDTH_GROUPS):
        best = (0, 0)  # (tokens saved, cut)
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            at = np.arange(a + 1, b)  # a cut before sorted row p keeps rows a..p-1 at the width of row p-1
            if len(at):
                saved = (at - a) * (int(ascending[b - 1]) - ascending[at - 1])
                p = int(np.argmax(saved))
                best = max(best, (int(saved[p]), int(at[p])))
        if best[0] < WIDTH_SAVING * padded:
            break
        cuts = sorted([*cuts, best[1]])
    return [(torch.from_numpy(np.sort(order[a:b])).to(attention_mask.device), int(ascending[b - 1]))
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def per_sample_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    target_ids: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
    """Negative log-likelihood of each example's target, shape (B,): the cross-entropy of its one token, or the sum
    over the tokens of a longer target (a semantic item id: -log P(item), on the scale of a one-token item).
    The forward pass runs at `precision` (`autocast`); the loss is float32."""
    if target_ids.shape[1] == 1:
        with autocast(precision, input_ids.device):
            logits = first_step_logits(model, input_ids, attention_mask)
        return nn.functional.cross_entropy(logits.float(), target_ids[:, 0], reduction="none")
    start = torch.full((input_ids.shape[0], 1), model_start_token(model), dtype=torch.long, device=input_ids.device)
    previous = target_ids[:, :-1].masked_fill(target_ids[:, :-1] == IGNORE, int(model_config(model).pad_token_id))
    with autocast(precision, input_ids.device):
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       decoder_input_ids=torch.cat([start, previous], dim=1)).logits  # (B, T, V), causal decoder
    logits = logits.float()
    head = wide_of(model)
    if head is not None:  # a yes/no answer is the first step's token, as in first_step_logits
        logits = torch.cat([head.add_to(logits[:, 0, :], input_ids).unsqueeze(1), logits[:, 1:, :]], dim=1)
    token_loss = nn.functional.cross_entropy(logits.transpose(1, 2), target_ids, ignore_index=IGNORE,
                                             reduction="none")
    return token_loss.sum(1)


class ItemScorer:
    """Next-item scores of every catalogue item, (B, items), whose softmax over a row is P(item | source).

    One token per item: the first decoder step's logits of the item tokens. Semantic ids: log P(id) under decoding
    constrained to valid ids (each step's distribution renormalised over the codes that continue some item's id), from
    one decoder pass per distinct id prefix, the encoder run once per source; these sum (as probabilities) to one.

    With `backoff` (the default), an item the base never saw (no view in the public split) is scored by its id's
    prefix: its slot token was only ever trained on other items, so the model's slot distribution says nothing about
    it. It gets the share 1/G of its group's probability (G items share its first three codes), and the group's items
    the base knows share the rest by the model's slot distribution renormalised over their own slots. Without new
    items this is exactly the constrained decoding above; either way the probabilities sum to one.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerFast, facts: CatalogueFacts, chunk: int = 4096,
                 backoff: bool = True):
        self.semantic = facts.semantic
        self.chunk = chunk  # decoder sequences per forward pass
        if not self.semantic:
            self.items = torch.tensor(tokenizer.convert_tokens_to_ids(list(facts.item_ids)), dtype=torch.long)
            return
        codes = [tokenizer.convert_tokens_to_ids(code.split()) for code in facts.codes]
        if any(tokenizer.unk_token_id in code for code in codes) or len({len(c) for c in codes}) != 1:
            raise ValueError("a semantic item id has a code the tokenizer does not know")
        self.codes = torch.tensor(codes, dtype=torch.long)  # (I, D)
        depth = self.codes.shape[1]
        prefixes = sorted({tuple(code[:-1]) for code in codes})
        row = {prefix: r for r, prefix in enumerate(prefixes)}
        self.prefixes = torch.tensor(prefixes, dtype=torch.long).reshape(len(prefixes), depth - 1)
        self.item_prefix = torch.tensor([row[tuple(code[:-1])] for code in codes], dtype=torch.long)
        # the slot of an item the base never saw was trained only on other items: it gets the uniform share 1/G of
        # its group's probability (G items in the group), the group's known items share the rest by the model's
        # slot distribution renormalised over their own slots (so a new item's slot is never a valid continuation)
        new = [bool(facts.public_views) and backoff and not facts.public_views[i] for i in range(len(codes))]
        self.new = torch.tensor(new, dtype=torch.bool)
        children: dict[tuple[int, ...], set[int]] = {}
        for code, fresh in zip(codes, new, strict=True):
            for j in range(depth - 1 if fresh else depth):
                children.setdefault(tuple(code[:j]), set()).add(code[j])
        self.allowed = torch.zeros((len(prefixes), depth, len(tokenizer)), dtype=torch.bool)
        for r, prefix in enumerate(prefixes):
            for j in range(depth):
                self.allowed[r, j, sorted(children.get(prefix[:j], ()))] = True
        size = Counter(tuple(c[:-1]) for c in codes)
        known = Counter(tuple(c[:-1]) for c, fresh in zip(codes, new, strict=True) if not fresh)
        self.slot_share = torch.tensor([-math.log(size[tuple(c[:-1])]) if n else
                                        math.log(known[tuple(c[:-1])] / size[tuple(c[:-1])])
                                        for c, n in zip(codes, new)], dtype=torch.float32)

    @torch.no_grad()
    def score_sources(self, model: nn.Module, tokenizer: PreTrainedTokenizerFast, sources: list[str],
                      batch_size: int) -> torch.Tensor:
        """`scores` of every source, (len(sources), items) on the CPU, `batch_size` sources a forward pass."""
        out = []
        device = model_device(model)
        for start in range(0, len(sources), batch_size):
            batch = tokenizer(sources[start:start + batch_size], padding=True, return_tensors="pt").to(device)
            out.append(self.scores(model, batch["input_ids"], batch["attention_mask"]))
        return torch.cat(out) if out else torch.zeros((0, len(self.codes if self.semantic else self.items)))

    @torch.no_grad()
    def scores(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.semantic:
            logits = first_step_logits(model, input_ids, attention_mask)
            return logits[:, self.items.to(logits.device)].float().cpu()
        from transformers.modeling_outputs import BaseModelOutput

        hidden = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        count, depth = len(self.prefixes), self.codes.shape[1]
        decoder = torch.cat([torch.full((count, 1), model_start_token(model), dtype=torch.long), self.prefixes],
                            1).to(hidden.device)
        positions = torch.arange(depth)
        head = wide_of(model)
        out = []
        per_pass = max(1, self.chunk // count)
        for start in range(0, len(input_ids), per_pass):
            h, m = hidden[start:start + per_pass], attention_mask[start:start + per_pass]
            b = len(h)
            logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=h.repeat_interleave(count, 0)),
                           attention_mask=m.repeat_interleave(count, 0),
                           decoder_input_ids=decoder.repeat(b, 1)).logits.float().cpu()  # (b * P, D, V)
            logits = logits.reshape(b, count, depth, -1)
            if head is not None:  # the wide part's next-item terms reach the first step, as in first_step_logits
                bias = head(input_ids[start:start + per_pass])[1].float().cpu()
                logits[:, :, 0, :] += bias[:, None, :logits.shape[-1]]
            logits = logits.masked_fill(~self.allowed, -torch.inf)
            log_p = torch.log_softmax(logits, dim=-1)
            # item i: sum over steps j of log p(code_j | its prefix), read at its prefix's row
            steps = log_p[:, self.item_prefix[:, None], positions[None, :], self.codes]  # (b, I, D)
            slot = torch.where(self.new, 0.0, steps[:, :, -1]) + self.slot_share
            out.append(steps[:, :, :-1].sum(-1) + slot)
        return torch.cat(out)


@torch.no_grad()
def binary_probability(model: nn.Module, tokenizer: PreTrainedTokenizerFast, sources: list[str],
                       batch_size: int) -> np.ndarray:
    """p("yes") / (p("yes") + p("no")) of the first decoder step for each source."""
    yes, no = tokenizer.convert_tokens_to_ids(["yes", "no"])
    out = []
    device = model_device(model)
    for start in range(0, len(sources), batch_size):
        batch = tokenizer(sources[start:start + batch_size], padding=True, return_tensors="pt").to(device)
        logits = first_step_logits(model, batch["input_ids"], batch["attention_mask"]).float()
        out.append(torch.sigmoid(logits[:, yes] - logits[:, no]).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def with_level(source: str, level: float) -> str:
    """An intent input with its price level (its last token) replaced."""
    return source.rsplit(" ", 1)[0] + " " + level_token(level)


def evaluate(model: nn.Module, tokenizer: PreTrainedTokenizerFast, examples: list[Example], facts: CatalogueFacts,
             *, batch_size: int = 256, baselines: Baselines | None = None,
             tasks: list[str] | tuple[str, ...] = ("intent", "next-item", "churn", "price"), precision: str = "fp32"
             ) -> dict[str, float]:
    """Task metrics of the model on `examples`, with the baselines and the Bayes oracle beside them.

    intent and churn: AUC, log-loss and expected calibration error of p(yes)/(p(yes)+p(no)); next-item: rank of the
    target among all catalogue items the shopper has not seen (ties counted against), HR@5/10, NDCG@5/10, MRR;
    price: the intent head at every price level, its mean curve, elasticity and distance to the true curve.
    Oracle keys appear only when the examples carry the truth (synthetic data); baseline keys when `baselines` is
    given. `evaluate_with_outputs` also returns the per-example outputs behind these figures.
    """
    return evaluate_with_outputs(model, tokenizer, examples, facts, batch_size=batch_size, baselines=baselines,
                                 tasks=tasks, precision=precision)[0]


@torch.no_grad()
def evaluate_with_outputs(model: nn.Module, tokenizer: PreTrainedTokenizerFast, examples: list[Example],
                          facts: CatalogueFacts, *, batch_size: int = 256, baselines: Baselines | None = None,
                          tasks: list[str] | tuple[str, ...] = ("intent", "next-item", "churn", "price"),
                          precision: str = "fp32") -> tuple[dict[str, float], Outputs]:
    """`evaluate`'s metrics and the per-example outputs they are computed from (model and baselines); the model's
    forward passes run at `precision` (`autocast`) on the model's device, its scores are read as float32 on the CPU."""
    with autocast(precision, model_device(model)):
        return _evaluate_with_outputs(model, tokenizer, examples, facts, batch_size, baselines, tasks)


def _evaluate_with_outputs(model: nn.Module, tokenizer: PreTrainedTokenizerFast, examples: list[Example],
                           facts: CatalogueFacts, batch_size: int, baselines: Baselines | None,
                           tasks: list[str] | tuple[str, ...]) -> tuple[dict[str, float], Outputs]:
    model.eval()
    out: dict[str, float] = {}
    outputs = Outputs()
    intent = [e for e in examples if e.task == "intent"]
    curve = price_curves(model, tokenizer, intent, batch_size) if intent and "price" in tasks else None
    if intent and "intent" in tasks:
        fitted = baselines.intent_probability(intent) if baselines is not None else None
        probability = own_level(curve, intent) if curve is not None else None
        if probability is None:
            probability = binary_probability(model, tokenizer, [e.source for e in intent], batch_size)
        out.update(_binary("intent", intent, probability, fitted, outputs))
    if curve is not None:
        out.update(_price_metrics(curve, intent, baselines))
    following = [e for e in examples if e.task == "next-item"]
    if following and "next-item" in tasks:
        scores = ItemScorer(tokenizer, facts).score_sources(model, tokenizer, [e.source for e in following],
                                                            batch_size)
        ranks = [target_rank(row, example.label, example.seen)
                 for row, example in zip(scores.float().numpy(), following, strict=True)]
        out.update(_ranking("next", ranks))
        outputs.shoppers["next"] = np.array([e.user_id for e in following])
        outputs.labels["next"] = np.array([e.label for e in following])
        outputs.ranks["next"] = np.asarray(ranks)
        new = [k for k, e in enumerate(following) if facts.public_views and not facts.public_views[e.label]]
        if new:  # targets pretraining never saw: how an item representation copes with new items
            out.update(_ranking("next-new", [ranks[k] for k in new]))
            out["next-new-examples"] = float(len(new))
        truth = np.array([e.truth for e in following])
        if not np.isnan(truth).any():
            out.update(_ranking("next-oracle", truth))
        if baselines is not None:
            for name, ranked in (("next-popularity", [target_rank(baselines.popularity, e.label, e.seen)
                                                      for e in following]),
                                 ("next-markov", [target_rank(baselines.markov_scores(e), e.label, e.seen)
                                                  for e in following])):
                out.update(_ranking(name, ranked))
                outputs.ranks[name] = np.asarray(ranked)
        out["next-examples"] = float(len(following))
    churn = [e for e in examples if e.task == "churn"]
    if churn and "churn" in tasks:
        fitted = baselines.churn_probability(churn) if baselines is not None else None
        out.update(_binary("churn", churn, binary_probability(model, tokenizer, [e.source for e in churn],
                                                              batch_size), fitted, outputs))
    return out, outputs


def _binary(task: str, examples: list[Example], probability: np.ndarray, baseline: np.ndarray | None,
            outputs: Outputs) -> dict[str, float]:
    """The metrics of a yes/no task (model, Bayes oracle when the truth is known, baseline when fitted), its
    per-example outputs recorded in `outputs`."""
    labels = np.array([e.label for e in examples])
    out = binary_metrics(task, labels, probability)
    truth = np.array([e.truth for e in examples])
    if not np.isnan(truth).any():
        out.update(binary_metrics(f"{task}-oracle", labels, truth))
    outputs.shoppers[task], outputs.labels[task], outputs.probabilities[task] = (
        np.array([e.user_id for e in examples]), labels, probability)
    if baseline is not None:
        out.update(binary_metrics(f"{task}-baseline", labels, baseline))
        outputs.probabilities[f"{task}-baseline"] = baseline
    out[f"{task}-positive-rate"] = float(labels.mean())
    out[f"{task}-examples"] = float(len(examples))
    return out


def _ranking(prefix: str, ranks) -> dict[str, float]:
    return {f"{prefix}-{name}": value for name, value in ranking_metrics(np.asarray(ranks), ks=(5, 10)).items()}


def price_curves(model: nn.Module, tokenizer: PreTrainedTokenizerFast, intent: list[Example], batch_size: int
                 ) -> np.ndarray:
    """(examples, PRICE_LEVELS): the intent head's purchase probability of each intent question at every price level."""
    return np.stack([binary_probability(model, tokenizer, [with_level(e.source, lv) for e in intent], batch_size)
                     for lv in PRICE_LEVELS], axis=1)


def own_level(curve: np.ndarray, intent: list[Example]) -> np.ndarray | None:
    """Each intent question's probability at the price level it was offered, read from its `price_curves` row (the
    same question, scored in the same batch: intent's own pass would repeat a sixth of the work); None when a source
    does not end in a price level token."""
    column = {level_token(lv): k for k, lv in enumerate(PRICE_LEVELS)}
    levels = [column.get(e.source.rsplit(" ", 1)[-1]) for e in intent]
    if None in levels or any(with_level(e.source, PRICE_LEVELS[k]) != e.source
                             for e, k in zip(intent, levels, strict=True)):
        return None
    return curve[np.arange(len(intent)), levels]


def _price_metrics(curve: np.ndarray, intent: list[Example], baselines: Baselines | None) -> dict[str, float]:
    """The intent head's purchase probability at every price level: mean curve, elasticity, error against the truth."""
    curves = {"price": curve}
    if all(len(e.curve) == len(PRICE_LEVELS) for e in intent):
        curves["price-oracle"] = np.array([e.curve for e in intent], dtype=np.float64)
    if baselines is not None and baselines.intent is not None:
        curves["price-baseline"] = np.stack([baselines.intent_probability(intent, lv) for lv in PRICE_LEVELS], axis=1)
    out: dict[str, float] = {}
    for prefix, curve in curves.items():
        mean = curve.mean(0)
        out[f"{prefix}-elasticity"] = elasticity(PRICE_LEVELS, mean)
        for level, value in zip(PRICE_LEVELS, mean, strict=True):
            out[f"{prefix}-p@{level_token(level)}"] = float(value)
        if "price-oracle" in curves and prefix != "price-oracle":
            out[f"{prefix}-curve-mae"] = float(np.abs(curve - curves["price-oracle"]).mean())
    return out
