"""`fedshop predict --adapter DIR (--history "i3 i17 ..." | --input FILE.csv) [--task ...] [--top-k K]
[--format json|table] [--explain]`.

Reads an export folder (`fedshop export`): the base under `base/`, the adapter, the tokenizer and the run's config
(for the catalogue facts the inputs are written with). Output schema `fedshop-predict/1` (JSON, one history):

    {"schema": "fedshop-predict/1", "task": "next-item" | "intent", "history": [item, ...],
     "predictions": [{"item": str, "score": float}, ...],            # next-item: top-K by probability among
                                                                     # unseen items; intent: P(buy) per candidate
     "explanations": [{"item": str, "score": float,                  # only with --explain
                       "attributions": [{"event": int, "item": str, "delta": float}, ...]}]}

An attribution is occlusion: delta = score with the full history - score with that one history event removed.

Batch (`--input FILE.csv`, header `shopper_id,history[,candidates]`, history and candidates space-separated item
ids, history oldest first; candidates needed for intent) — schema `fedshop-predict-batch/1`, one entry per CSV row in
file order, each the one-history object above less `schema` and `task`, plus the shopper and its CSV line:

    {"schema": "fedshop-predict-batch/1", "task": ..., "input": "FILE.csv", "top-k": int,
     "predictions": [{"shopper_id": str, "line": int, "history": [...], "predictions": [...],
                      "explanations": [...]}, ...]}

The shoppers go through the model in batches (`batch_size` sources a forward pass). A task is one `predict_*`
method over a list of requests; `TASKS` maps the task names to them and is the only dispatch on the name.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import UserError

if TYPE_CHECKING:
    import torch

SCHEMA = "fedshop-predict/1"
BATCH_SCHEMA = "fedshop-predict-batch/1"
TASKS = {"next-item": "predict_next_item", "intent": "predict_intent"}  # task name -> Predictor method
CSV_COLUMNS = ("shopper_id", "history", "candidates")
CSV_HEADER = "shopper_id,history[,candidates]"


@dataclass
class Request:
    """One shopper to predict for; `history_label` / `candidates_label` name where the items came from in errors."""

    history: list[str]
    candidates: list[str] = field(default_factory=list)
    shopper_id: str | None = None
    line: int | None = None
    history_label: str = "--history"
    candidates_label: str = "--candidates"


class Predictor:
    def __init__(self, adapter: str | Path, history_length: int | None = None, batch_size: int | None = None):
        adapter = Path(adapter)
        if not (adapter / "manifest.json").is_file() or not (adapter / "run-config.toml").is_file():
            raise UserError(f"{adapter} is not a fedshop export (run `fedshop export RUN_DIR --out DIR` first)")
        from server.export import check_base

        check_base(adapter, adapter / "base" / "model.safetensors", "predict")
        import torch
        from peft import PeftModel
        from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration
        from transformers.utils import logging as hf_logging

        from shared.config import load_config
        from shared.data import catalogue_facts
        from shared.synthetic import generate

        hf_logging.disable_progress_bar()
        self.config = load_config(adapter / "run-config.toml")
        self.facts = catalogue_facts(generate(self.config))
        self.index = self.facts.index()
        self.tokenizer = PreTrainedTokenizerFast.from_pretrained(adapter)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated",
                                    category=FutureWarning)
            self.model = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(adapter / "base"),
                                                   str(adapter))
        self.model.eval()
        self.history_length = history_length or self.config.history_length
        self.batch_size = batch_size or self.config.eval_batch_size
        self.items = torch.tensor(self.tokenizer.convert_tokens_to_ids(list(self.facts.item_ids)))

    # --- entry points ---------------------------------------------------------------------------------------
    def predict(self, history: list[str], task: str, top_k: int, candidates: list[str], explain: bool) -> dict:
        """One history (schema fedshop-predict/1)."""
        (result,) = self.predict_many(task, [Request(history, candidates)], top_k, explain)
        return {"schema": SCHEMA, "task": task, **result}

    def predict_file(self, path: str | Path, task: str, top_k: int, explain: bool) -> dict:
        """Every shopper of a CSV file (schema fedshop-predict-batch/1)."""
        check_top_k(top_k)
        method = self._task(task)  # an unknown task is refused before the file is read
        requests = read_requests(path, needs_candidates=task == "intent")
        self.check(requests)
        results = method(requests, top_k, explain)
        return {"schema": BATCH_SCHEMA, "task": task, "input": str(path), "top-k": top_k,
                "predictions": [{"shopper_id": r.shopper_id, "line": r.line, **result}
                                for r, result in zip(requests, results, strict=True)]}

    def predict_many(self, task: str, requests: list[Request], top_k: int, explain: bool) -> list[dict]:
        """One result per request (`history`, `predictions`, with --explain `explanations`), batched."""
        check_top_k(top_k)
        method = self._task(task)
        self.check(requests)
        return method(requests, top_k, explain)

    def _task(self, task: str):
        if task not in TASKS:
            raise UserError(f"--task {task!r}: expected one of {', '.join(TASKS)}")
        return getattr(self, TASKS[task])

    # --- input checks -------------------------------------------------------------------------------------------
    def check(self, requests: list[Request]) -> None:
        for request in requests:
            if not request.history:
                raise UserError(f"{request.history_label} is empty: give the shopper's viewed items, oldest first")
            self.check_items(request.history, request.history_label)
            self.check_items(request.candidates, request.candidates_label)

    def check_items(self, items: list[str], what: str) -> None:
        unknown = [i for i in items if i not in self.index]
        if unknown:
            raise UserError(f"{what}: unknown item(s) {', '.join(unknown)}; the catalogue has "
                            f"{len(self.index)} items ({self.facts.item_ids[0]} ... {self.facts.item_ids[-1]})")

    # --- tasks: one method each, over a list of checked requests --------------------------------------------------
    def predict_next_item(self, requests: list[Request], top_k: int, explain: bool) -> list[dict]:
        """Top-K next items by probability among the items not in the history."""
        import torch

        groups = [_variants(r.history, explain) for r in requests]
        scores = self.next_item_scores([h for group in groups for h in group])
        results, row = [], 0
        for request, group in zip(requests, groups, strict=True):
            block, row = scores[row:row + len(group)], row + len(group)
            top = torch.topk(block[0], k=min(top_k, len(self.facts.item_ids) - len(set(request.history))))
            chosen = [(self.facts.item_ids[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
            results.append(_result(request, chosen, {item: block[:, self.index[item]] for item, _ in chosen},
                                   explain))
        return results

    def predict_intent(self, requests: list[Request], top_k: int, explain: bool) -> list[dict]:
        """P(buy) of every candidate, in the order given."""
        for request in requests:
            if not request.candidates:
                raise UserError(f"--task intent needs candidate items: {request.candidates_label} is empty")
        groups = [_variants(r.history, explain) for r in requests]
        pairs = [(h, c) for r, group in zip(requests, groups, strict=True) for c in r.candidates for h in group]
        scores = self.intent_pair_scores(pairs)
        results, row = [], 0
        for request, group in zip(requests, groups, strict=True):
            columns = {}
            for candidate in request.candidates:
                columns[candidate], row = scores[row:row + len(group)], row + len(group)
            chosen = [(c, float(columns[c][0])) for c in request.candidates]
            results.append(_result(request, chosen, columns, explain))
        return results

    # --- the model ----------------------------------------------------------------------------------------------
    def _history_text(self, history: list[str]) -> str:
        return " ".join(f"{h} {self.facts.category[self.index[h]]}" for h in history[-self.history_length:])

    def _logits(self, sources: list[str]) -> torch.Tensor:
        """First-decoder-step logits of every source, `batch_size` sources a forward pass."""
        import torch

        from shared.modeling import first_step_logits

        out = []
        with torch.no_grad():
            for start in range(0, len(sources), self.batch_size):
                batch = self.tokenizer(sources[start:start + self.batch_size], padding=True, return_tensors="pt")
                out.append(first_step_logits(self.model, batch["input_ids"], batch["attention_mask"]))
        return torch.cat(out) if out else torch.zeros((0, len(self.tokenizer)))

    def next_item_scores(self, histories: list[list[str]]) -> torch.Tensor:
        """(H, items) probabilities over the catalogue, items already in the history set to 0."""
        import torch

        logits = self._logits([f"next: {self._history_text(h)}" for h in histories])[:, self.items]
        for row, history in enumerate(histories):
            logits[row, [self.index[i] for i in history]] = -math.inf
        return torch.softmax(logits, dim=1)

    def intent_scores(self, histories: list[list[str]], candidate: str) -> torch.Tensor:
        return self.intent_pair_scores([(h, candidate) for h in histories])

    def intent_pair_scores(self, pairs: list[tuple[list[str], str]]) -> torch.Tensor:
        """P(buy) = p(yes) / (p(yes) + p(no)) of each (history, candidate)."""
        import torch

        sources = []
        for history, candidate in pairs:
            i = self.index[candidate]
            facts = f"{candidate} {self.facts.category[i]} {self.facts.price_band[i]} {self.facts.rating_band[i]}"
            sources.append(f"intent: {self._history_text(history)} cand {facts}")
        logits = self._logits(sources)
        yes, no = self.tokenizer.convert_tokens_to_ids(["yes", "no"])
        return torch.sigmoid(logits[:, yes] - logits[:, no])


def check_top_k(top_k: int) -> None:
    if top_k <= 0:
        raise UserError(f"--top-k {top_k}: expected a positive number of items")


def _variants(history: list[str], explain: bool) -> list[list[str]]:
    """The history, then (with --explain) the history without each one event in turn."""
    return [history, *([history[:j] + history[j + 1:] for j in range(len(history))] if explain else [])]


def _result(request: Request, chosen: list[tuple[str, float]], columns: dict, explain: bool) -> dict:
    """`columns[item]` holds the item's score for each of `_variants` (row 0 the full history)."""
    history = request.history
    out: dict = {"history": history, "predictions": [{"item": item, "score": score} for item, score in chosen]}
    if explain:
        out["explanations"] = [{"item": item, "score": score, "attributions": [
            {"event": j, "item": history[j], "delta": score - float(columns[item][j + 1])}
            for j in range(len(history))]} for item, score in chosen]
    return out


def read_requests(path: str | Path, needs_candidates: bool) -> list[Request]:
    """The shoppers of a batch CSV (header shopper_id,history[,candidates]); a bad line is refused naming
    file:line and column."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    requests = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise UserError(f"{path}: empty; expected a header {CSV_HEADER}")
        missing = [c for c in CSV_COLUMNS[:2] if c not in header]
        unexpected = [c for c in header if c not in CSV_COLUMNS]
        if missing or unexpected:
            raise UserError(f"{path}:1: " + "; ".join(
                ([f"missing column(s) {', '.join(missing)}"] if missing else [])
                + ([f"unexpected column(s) {', '.join(unexpected)}"] if unexpected else []))
                + f"; expected a header {CSV_HEADER}")
        if needs_candidates and "candidates" not in header:
            raise UserError(f"{path}:1: --task intent needs a candidates column (header {CSV_HEADER})")
        for row in reader:
            line = reader.line_num
            if None in row:
                raise UserError(f"{path}:{line}: {len(header) + len(row[None])} fields, the header has "
                                f"{len(header)}")
            shopper = (row["shopper_id"] or "").strip()
            if not shopper:
                raise UserError(f"{path}:{line}: column shopper_id is empty")
            requests.append(Request(
                history=(row["history"] or "").split(), candidates=(row.get("candidates") or "").split(),
                shopper_id=shopper, line=line, history_label=f"{path}:{line}: column history",
                candidates_label=f"{path}:{line}: column candidates"))
    if not requests:
        raise UserError(f"{path}: no shoppers after the header")
    return requests


def render(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=2)
    label = "P(next)" if result["task"] == "next-item" else "P(buy)"
    if result["schema"] == BATCH_SCHEMA:
        lines = [f"{result['task']} for {len(result['predictions'])} shopper(s) of {result['input']}", "",
                 f"| shopper | item | {label} |", "|---|---|---|"]
        lines += [f"| {s['shopper_id']} | {p['item']} | {p['score']:.4f} |" for s in result["predictions"]
                  for p in s["predictions"]]
        for shopper in result["predictions"]:
            lines += _explanation_lines(shopper, f"{shopper['shopper_id']}: ")
        return "\n".join(lines)
    lines = [f"{result['task']} for history {' '.join(result['history'])}", "", f"| item | {label} |", "|---|---|"]
    lines += [f"| {p['item']} | {p['score']:.4f} |" for p in result["predictions"]]
    return "\n".join(lines + _explanation_lines(result, ""))


def _explanation_lines(result: dict, prefix: str) -> list[str]:
    lines = []
    for e in result.get("explanations", []):
        lines += ["", f"{prefix}why {e['item']} ({e['score']:.4f}): score minus the score without each event", "",
                  "| event | item | delta |", "|---|---|---|"]
        lines += [f"| {a['event']} | {a['item']} | {a['delta']:+.4f} |" for a in e["attributions"]]
    return lines
