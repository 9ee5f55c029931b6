"""`fedshop predict --adapter DIR (--history "i3 i17 ..." | --input FILE.csv) [--task ...] [--top-k K]
[--format json|table] [--explain]`.

Reads an export folder (`fedshop export`): the base under `base/`, the adapter, the tokenizer and the run's config
(for the catalogue facts the inputs are written with). Output schema `fedshop-predict/1` (JSON, one history):

    {"schema": "fedshop-predict/1", "task": "next-item" | "intent" | "price" | "churn", "history": [item, ...],
     "predictions": [{"item": str, "score": float}, ...],            # next-item: top-K by probability among
                                                                     # unseen items; intent: P(buy) per candidate
                                                                     # at --price-level
     "explanations": [{"item": str, "score": float,                  # only with --explain
                       "attributions": [{"event": int, "item": str, "delta": float}, ...]}]}

    price: "predictions": [{"item": str, "curve": [{"price_level": float, "score": float}, ...],
                            "elasticity": float}]   # P(buy) at every trained price level; explanations of the
                                                    # P(buy) at the list price (level 1)
    churn: "predictions": [{"item": "returns-within-<H>-days", "score": P(return), "churn_risk": 1 - P}]
           (H is the run's churn-horizon-days; the input adds --sessions, --days-since-last, --mean-gap-days,
           --bought-last-session)

An attribution is occlusion: delta = score with the full history - score with that one history event removed.

Batch (`--input FILE.csv`, header `shopper_id,history[,candidates][,price_level][,sessions,days_since_last,
mean_gap_days,bought_last_session]`, history and candidates space-separated item ids, history oldest first;
candidates needed for intent and price, the activity columns for churn) — schema `fedshop-predict-batch/1`, one entry
per CSV row in file order, each the one-history object above less `schema` and `task`, plus the shopper and its CSV
line:

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shared.errors import UserError

if TYPE_CHECKING:
    import torch

SCHEMA = "fedshop-predict/1"
BATCH_SCHEMA = "fedshop-predict-batch/1"
TASKS = {"next-item": "predict_next_item", "intent": "predict_intent", "price": "predict_price",
         "churn": "predict_churn"}  # task name -> Predictor method
CHURN_COLUMNS = ("sessions", "days_since_last", "mean_gap_days", "bought_last_session")
CSV_COLUMNS = ("shopper_id", "history", "candidates", "price_level", *CHURN_COLUMNS)
CSV_HEADER = ("shopper_id,history[,candidates][,price_level][,sessions,days_since_last,mean_gap_days,"
              "bought_last_session]")


@dataclass
class Activity:
    """What churn needs beside the viewed items: the shopper's sessions up to now (see shared/tasks.py)."""

    sessions: int = 1
    days_since_last: float = 0.0
    mean_gap_days: float | None = None  # None: one session so far
    bought_last_session: bool = False


@dataclass
class Request:
    """One shopper to predict for; `history_label` / `candidates_label` name where the items came from in errors."""

    history: list[str]
    candidates: list[str] = field(default_factory=list)
    shopper_id: str | None = None
    line: int | None = None
    history_label: str = "--history"
    candidates_label: str = "--candidates"
    price_level: float = 1.0  # intent: the offered price / the list price
    activity: Activity | None = None  # churn


class Predictor:
    def __init__(self, adapter: str | Path, history_length: int | None = None, batch_size: int | None = None,
                 device: str | None = None):
        """`device`: auto, cpu or cuda (default: the run's config key `device`)."""
        adapter = Path(adapter)
        if not (adapter / "manifest.json").is_file() or not (adapter / "run-config.toml").is_file():
            raise UserError(f"{adapter} is not a fedshop export (run `fedshop export RUN_DIR --out DIR` first)")
        from server.manifest import check_base
        from shared.model import (
            attach_wide_parts,
            check_adapter_dir,
            check_base_files,
            load_saved_adapter,
            load_tokenizer,
        )

        check_base(adapter, adapter / "base" / "model.safetensors", "predict")
        check_base_files(adapter / "base")
        check_adapter_dir(adapter)
        from transformers import T5ForConditionalGeneration
        from transformers.utils import logging as hf_logging

        from shared.config import load_config
        from shared.data import catalogue_facts, semantic_ids_for
        from shared.modeling import ItemScorer, resolve_device
        from shared.sources import load_world

        hf_logging.disable_progress_bar()
        self.config = load_config(adapter / "run-config.toml")
        self.facts = catalogue_facts(load_world(self.config), semantic_ids_for(self.config, adapter / "base"))
        self.index = self.facts.index()
        self.tokenizer = load_tokenizer(adapter)
        base = T5ForConditionalGeneration.from_pretrained(adapter / "base")
        attach_wide_parts(base, adapter / "base")  # the link term's public counts, when the base has them
        self.model = load_saved_adapter(base, self.tokenizer, adapter, self.facts)
        self.model.to(resolve_device(device or self.config.device)).eval()
        self.history_length = history_length or self.config.history_length
        self.batch_size = batch_size or self.config.eval_batch_size
        self.scorer = ItemScorer(self.tokenizer, self.facts)

    # --- entry points ---------------------------------------------------------------------------------------
    def predict(self, history: list[str], task: str, top_k: int, candidates: list[str], explain: bool,
                price_level: float = 1.0, activity: Activity | None = None) -> dict:
        """One history (schema fedshop-predict/1)."""
        (result,) = self.predict_many(task, [Request(history, candidates, price_level=price_level,
                                                     activity=activity)], top_k, explain)
        return {"schema": SCHEMA, "task": task, **result}

    def predict_file(self, path: str | Path, task: str, top_k: int, explain: bool) -> dict:
        """Every shopper of a CSV file (schema fedshop-predict-batch/1)."""
        check_top_k(top_k)
        method = self._task(task)  # an unknown task is refused before the file is read
        requests = read_requests(path, needs_candidates=task in ("intent", "price"), needs_activity=task == "churn")
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
            check_price_level(request.price_level, request.history_label.replace("column history", "column price_level")
                              if request.line else "--price-level")

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
        """P(buy) of every candidate at the request's price level, in the order given."""
        self._need_candidates(requests, "intent")
        groups = [_variants(r.history, explain) for r in requests]
        pairs = [(h, c, r.price_level) for r, group in zip(requests, groups, strict=True) for c in r.candidates
                 for h in group]
        scores = self.intent_pair_scores(pairs)
        results, row = [], 0
        for request, group in zip(requests, groups, strict=True):
            columns = {}
            for candidate in request.candidates:
                columns[candidate], row = scores[row:row + len(group)], row + len(group)
            chosen = [(c, float(columns[c][0])) for c in request.candidates]
            results.append(_result(request, chosen, columns, explain))
        return results

    def predict_price(self, requests: list[Request], top_k: int, explain: bool) -> list[dict]:
        """The price response of every candidate: P(buy) at each price level, and the curve's elasticity."""
        from shared.metrics import elasticity
        from shared.tasks import PRICE_LEVELS

        self._need_candidates(requests, "price")
        pairs = [(r.history, c, level) for r in requests for c in r.candidates for level in PRICE_LEVELS]
        scores = self.intent_pair_scores(pairs).double().numpy().reshape(-1, len(PRICE_LEVELS))
        results, row = [], 0
        for request in requests:
            predictions = []
            for candidate in request.candidates:
                curve = scores[row]
                row += 1
                predictions.append({"item": candidate, "curve": [{"price_level": lv, "score": float(p)}
                                                                 for lv, p in zip(PRICE_LEVELS, curve, strict=True)],
                                    "elasticity": elasticity(PRICE_LEVELS, curve)})
            results.append({"history": request.history, "predictions": predictions})
        if explain:
            for result, explained in zip(results, self.predict_intent(
                    [Request(r.history, r.candidates, price_level=1.0) for r in requests], top_k, True), strict=True):
                result["explanations"] = explained["explanations"]  # of P(buy) at the list price
        return results

    def predict_churn(self, requests: list[Request], top_k: int, explain: bool) -> list[dict]:
        """P(the shopper comes back within the run's churn horizon) and the churn risk 1 - P."""
        from shared.tasks import churn_source, number_tokens

        for request in requests:
            if request.activity is None:
                raise UserError(f"--task churn needs the shopper's activity ({', '.join(CHURN_COLUMNS)}): "
                                f"missing for {request.history_label}")
        groups = [_variants(r.history, explain) for r in requests]
        # an export from before churn's number tokens: its model reads the bands alone
        numbers = number_tokens()[0] in self.tokenizer.get_vocab()
        sources = [churn_source(self._history_text(h), r.activity.sessions, len(r.history), r.activity.mean_gap_days,
                                r.activity.days_since_last, r.activity.bought_last_session, numbers)
                   for r, group in zip(requests, groups, strict=True) for h in group]
        scores = self._yes_probability(sources)
        horizon = self.config.churn_horizon_days
        results, row = [], 0
        for request, group in zip(requests, groups, strict=True):
            block, row = scores[row:row + len(group)], row + len(group)
            label = f"returns-within-{horizon:g}-days"
            result = _result(request, [(label, float(block[0]))], {label: block}, explain)
            result["predictions"][0]["churn_risk"] = 1.0 - float(block[0])
            results.append(result)
        return results

    def _need_candidates(self, requests: list[Request], task: str) -> None:
        for request in requests:
            if not request.candidates:
                raise UserError(f"--task {task} needs candidate items: {request.candidates_label} is empty")

    # --- the model ----------------------------------------------------------------------------------------------
    def _history_text(self, history: list[str]) -> str:
        from shared.tasks import history_text

        return history_text(history[-self.history_length:], self.facts, self.index)

    def next_item_scores(self, histories: list[list[str]]) -> torch.Tensor:
        """(H, items) probabilities over the catalogue, items already in the history set to 0."""
        import torch

        from shared.modeling import autocast, model_device

        with autocast(self.config.eval_precision, model_device(self.model)):
            logits = self.scorer.score_sources(self.model, self.tokenizer,
                                               [f"next: {self._history_text(h)}" for h in histories], self.batch_size)
        for row, history in enumerate(histories):
            logits[row, [self.index[i] for i in history]] = -math.inf
        return torch.softmax(logits, dim=1)

    def intent_scores(self, histories: list[list[str]], candidate: str, level: float = 1.0) -> torch.Tensor:
        return self.intent_pair_scores([(h, candidate, level) for h in histories])

    def intent_pair_scores(self, pairs: list[tuple[list[str], str, float]]) -> torch.Tensor:
        """P(buy) = p(yes) / (p(yes) + p(no)) of each (history, candidate, price level)."""
        from shared.tasks import intent_source

        return self._yes_probability([intent_source(self._history_text(history), self.index[candidate], self.facts,
                                                    level) for history, candidate, level in pairs])

    def _yes_probability(self, sources: list[str]) -> torch.Tensor:
        """p("yes") / (p("yes") + p("no")) of each source (the evaluation's own scoring, batched)."""
        import torch

        from shared.modeling import autocast, binary_probability, model_device

        with autocast(self.config.eval_precision, model_device(self.model)):
            return torch.from_numpy(binary_probability(self.model, self.tokenizer, sources, self.batch_size)).float()


def check_price_level(level: float, where: str) -> None:
    from shared.tasks import PRICE_LEVELS

    if not (min(PRICE_LEVELS) - 1e-9 <= level <= max(PRICE_LEVELS) + 1e-9):
        raise UserError(f"{where} {level:g}: expected an offered price / list price between {min(PRICE_LEVELS):g} "
                        f"and {max(PRICE_LEVELS):g} (the levels the model was trained on: "
                        f"{', '.join(f'{lv:g}' for lv in PRICE_LEVELS)}; others use the nearest)")


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


def _number(path: Path, line: int, row: dict, column: str, kind, default, low: float = 0.0):
    raw = (row.get(column) or "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise UserError(f"{path}:{line}: column {column}: {raw!r} is not a{'n integer' if kind is int else ' number'}"
                        ) from None
    if not (value >= low) or (isinstance(value, float) and not math.isfinite(value)):
        raise UserError(f"{path}:{line}: column {column}: {raw!r} is below {low:g}")
    return value


def _activity(path: Path, line: int, row: dict) -> Activity:
    bought = (row.get("bought_last_session") or "").strip().lower()
    if bought not in ("", "0", "1", "true", "false", "yes", "no"):
        raise UserError(f"{path}:{line}: column bought_last_session: {bought!r} is not one of 0, 1, true, false, "
                        "yes, no")
    return Activity(sessions=_number(path, line, row, "sessions", int, 1, 1),
                    days_since_last=_number(path, line, row, "days_since_last", float, 0.0),
                    mean_gap_days=_number(path, line, row, "mean_gap_days", float, None),
                    bought_last_session=bought in ("1", "true", "yes"))


def read_requests(path: str | Path, needs_candidates: bool, needs_activity: bool = False) -> list[Request]:
    """The shoppers of a batch CSV (header shopper_id,history[,candidates][,price_level][,churn activity
    columns]); a bad line is refused naming file:line and column."""
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
            raise UserError(f"{path}:1: this task needs a candidates column (header {CSV_HEADER})")
        if needs_activity and not all(c in header for c in CHURN_COLUMNS[:2]):
            raise UserError(f"{path}:1: --task churn needs the columns {', '.join(CHURN_COLUMNS)} "
                            "(mean_gap_days and bought_last_session may be empty)")
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
                candidates_label=f"{path}:{line}: column candidates",
                price_level=_number(path, line, row, "price_level", float, 1.0),
                activity=_activity(path, line, row) if needs_activity else None))
    if not requests:
        raise UserError(f"{path}: no shoppers after the header")
    return requests


def render(result: dict, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(result, indent=2)
    label = {"next-item": "P(next)", "churn": "P(return) | churn risk"}.get(result["task"], "P(buy)")
    if result["task"] == "price":
        return _price_table(result)
    rule = "|---" * (label.count("|") + 1)

    def cells(p: dict) -> str:
        return f"{p['score']:.4f}" + (f" | {p['churn_risk']:.4f}" if "churn_risk" in p else "")

    if result["schema"] == BATCH_SCHEMA:
        lines = [f"{result['task']} for {len(result['predictions'])} shopper(s) of {result['input']}", "",
                 f"| shopper | item | {label} |", f"|---{rule}|---|"]
        lines += [f"| {s['shopper_id']} | {p['item']} | {cells(p)} |" for s in result["predictions"]
                  for p in s["predictions"]]
        for shopper in result["predictions"]:
            lines += _explanation_lines(shopper, f"{shopper['shopper_id']}: ")
        return "\n".join(lines)
    lines = [f"{result['task']} for history {' '.join(result['history'])}", "", f"| item | {label} |", f"{rule}|---|"]
    lines += [f"| {p['item']} | {cells(p)} |" for p in result["predictions"]]
    return "\n".join(lines + _explanation_lines(result, ""))


def _explanation_lines(result: dict, prefix: str) -> list[str]:
    lines = []
    for e in result.get("explanations", []):
        lines += ["", f"{prefix}why {e['item']} ({e['score']:.4f}): score minus the score without each event", "",
                  "| event | item | delta |", "|---|---|---|"]
        lines += [f"| {a['event']} | {a['item']} | {a['delta']:+.4f} |" for a in e["attributions"]]
    return lines


def _price_table(result: dict) -> str:
    shoppers = result["predictions"] if result["schema"] == BATCH_SCHEMA else [result]
    levels = [c["price_level"] for c in shoppers[0]["predictions"][0]["curve"]]
    lines = ["price response: P(buy) at each offered price / list price", "",
             "| shopper | item | " + " | ".join(f"x{lv:g}" for lv in levels) + " | elasticity |",
             "|---" * (len(levels) + 3) + "|"]
    for shopper in shoppers:
        for p in shopper["predictions"]:
            lines.append(f"| {shopper.get('shopper_id', '-')} | {p['item']} | "
                         + " | ".join(f"{c['score']:.4f}" for c in p["curve"]) + f" | {p['elasticity']:+.2f} |")
    for shopper in shoppers:
        lines += _explanation_lines(shopper, f"{shopper.get('shopper_id', '')}: " if "shopper_id" in shopper else "")
    return "\n".join(lines)
