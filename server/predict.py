"""`fedshop predict --adapter DIR --history "i3 i17 ..." [--task ...] [--top-k K] [--format json|table] [--explain]`.

Reads an export folder (`fedshop export`): the base under `base/`, the adapter, the tokenizer and the run's config
(for the catalogue facts the inputs are written with). Output schema `fedshop-predict/1` (JSON):

    {"schema": "fedshop-predict/1", "task": "next-item" | "intent", "history": [item, ...],
     "predictions": [{"item": str, "score": float}, ...],            # next-item: top-K by probability among
                                                                     # unseen items; intent: P(buy) per candidate
     "explanations": [{"item": str, "score": float,                  # only with --explain
                       "attributions": [{"event": int, "item": str, "delta": float}, ...]}]}

An attribution is occlusion: delta = score with the full history - score with that one history event removed.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

from shared.config import load_config
from shared.data import catalogue_facts
from shared.errors import UserError
from shared.modeling import first_step_logits
from shared.sources import load_world

SCHEMA = "fedshop-predict/1"


class Predictor:
    def __init__(self, adapter: str | Path, history_length: int | None = None):
        adapter = Path(adapter)
        if not (adapter / "manifest.json").is_file() or not (adapter / "run-config.toml").is_file():
            raise UserError(f"{adapter} is not a fedshop export (run `fedshop export RUN_DIR --out DIR` first)")
        manifest = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
        from server.export import sha256

        if sha256(adapter / "base" / "model.safetensors") != manifest.get("base-model-sha256"):
            raise UserError(f"{adapter}/base/model.safetensors is not the base this adapter was trained on (its "
                            "sha256 differs from manifest.json's base-model-sha256)")
        from peft import PeftModel
        from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.config = load_config(adapter / "run-config.toml")
        self.facts = catalogue_facts(load_world(self.config))
        self.index = self.facts.index()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(adapter)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                    category=FutureWarning)
            self.model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(adapter / "base"),
                                                   str(adapter))
        self.model.eval()
        self.history_length = history_length or self.config.history_length
        self.items = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(self.facts.item_ids)))

    def check_items(self, items: list[str], what: str) -> None:
        unknown = [i for i in items if i not in self.index]
        if unknown:
            raise UserError(f"{what}: unknown item(s) {', '.join(unknown)}; the catalogue has "
                            f"{len(self.index)} items ({self.facts.item_ids[0]} ... {self.facts.item_ids[-1]})")

    def _history_text(self, history: list[str]) -> str:
        return " ".join(f"{h} {self.facts.category[self.index[h]]}" for h in history[-self.history_length:])

    @torch.no_grad()
    def _logits(self, sources: list[str]) -> torch.Tensor:
        batch = self.tokenizer(sources, padding=True, return_tensors="pt")
        return first_step_logits(self.model, batch["input_ids"], batch["attention_mask"])

    def next_item_scores(self, histories: list[list[str]]) -> torch.Tensor:
        """(H, items) probabilities over the catalogue, items already in the history set to 0."""
        logits = self._logits([f"next: {self._history_text(h)}" for h in histories])[:, self.items]
        for row, history in enumerate(histories):
            logits[row, [self.index[i] for i in history]] = -math.inf
        return torch.softmax(logits, dim=1)

    def intent_scores(self, histories: list[list[str]], candidate: str) -> torch.Tensor:
        i = self.index[candidate]
        facts = f"{candidate} {self.facts.category[i]} {self.facts.price_band[i]} {self.facts.rating_band[i]}"
        logits = self._logits([f"intent: {self._history_text(h)} cand {facts}" for h in histories])
        yes, no = self.tokenizer.convert_tokens_to_ids(["yes", "no"])
        return torch.sigmoid(logits[:, yes] - logits[:, no])  # p(yes) / (p(yes) + p(no))

    def predict(self, history: list[str], task: str, top_k: int, candidates: list[str], explain: bool) -> dict:
        if top_k <= 0:
            raise UserError(f"--top-k {top_k}: expected a positive number of items")
        if not history:
            raise UserError("--history is empty: give the shopper's viewed items, oldest first")
        self.check_items(history, "--history")
        occluded = [history[:j] + history[j + 1:] for j in range(len(history))] if explain else []
        if task == "next-item":
            scores = self.next_item_scores([history, *occluded]) if occluded else self.next_item_scores([history])
            top = torch.topk(scores[0], k=min(top_k, len(self.facts.item_ids) - len(set(history))))
            chosen = [(self.facts.item_ids[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
            rows = {item: scores[:, self.index[item]] for item, _ in chosen}
        elif task == "intent":
            if not candidates:
                raise UserError("--task intent needs --candidates ITEM[,ITEM...]")
            self.check_items(candidates, "--candidates")
            rows = {c: self.intent_scores([history, *occluded], c) for c in candidates}
            chosen = [(c, float(rows[c][0])) for c in candidates]
        else:
            raise UserError(f"--task {task!r}: expected next-item or intent")
        out: dict = {"schema": SCHEMA, "task": task, "history": history,
                     "predictions": [{"item": item, "score": score} for item, score in chosen]}
        if explain:
            out["explanations"] = [{"item": item, "score": score, "attributions": [
                {"event": j, "item": history[j], "delta": score - float(rows[item][j + 1])}
                for j in range(len(history))]} for item, score in chosen]
        return out


def render(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=2)
    label = "P(next)" if result["task"] == "next-item" else "P(buy)"
    lines = [f"{result['task']} for history {' '.join(result['history'])}", "", f"| item | {label} |", "|---|---|"]
    lines += [f"| {p['item']} | {p['score']:.4f} |" for p in result["predictions"]]
    for e in result.get("explanations", []):
        lines += ["", f"why {e['item']} ({e['score']:.4f}): score minus the score without each event", "",
                  "| event | item | delta |", "|---|---|---|"]
        lines += [f"| {a['event']} | {a['item']} | {a['delta']:+.4f} |" for a in e["attributions"]]
    return "\n".join(lines)
