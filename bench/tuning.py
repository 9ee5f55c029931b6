"""Tuning benchmark of the learning recipe: in-process federations on a config, scored on the valid split.

Each trial is one config (overrides of a base config). It trains, with the merchants' own `train_round` and the
server's FFA merge (the mean of the merchants' B tensors, weighted by examples):
- the federation, evaluated after every round (round 0 = the pretrained base alone);
- local-only (each merchant alone, same recipe and budget) and centralised (pooled, no DP), with `--references`.
Scores are on the VALID split (the test split is kept for the reported runs), with their standard errors
(binomial for HR@10, Hanley-McNeil for AUC). No Flower: the same ML a simulation runs, without its process cost.

    python bench/tuning.py --config configs/default.toml --trial "lr=learning-rate=0.01" --trial "..." \
        [--references] [--split valid|test] [--write]
A trial is `name=key=value;key=value`. The table goes to stdout and, with --write, to BENCHMARKS.md (Tuning).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.baselines import fit_baselines  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.data import merchant_data  # noqa: E402
from shared.dptrain import PrivacyState, train_round  # noqa: E402
from shared.model import adapter_state, add_lora, item_rows, load_adapter_state, load_base, uplink_state  # noqa: E402
from shared.modeling import encode, evaluate  # noqa: E402
from shared.sources import load_world  # noqa: E402

KEYS = ("intent-auc", "next-hr@10", "churn-auc")


def _seed(config, server_round: int, index: int) -> int:
    return config.seed * 1_000_003 + server_round * 1_009 + index


def _weighted(per: list[tuple[dict, float]]) -> dict[str, float]:
    keys = set().union(*(m.keys() for m, _ in per))
    out = {}
    for key in keys:
        pairs = [(m[key], w) for m, w in per if key in m and not math.isnan(m[key])]
        if pairs:
            out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
    for count in ("intent-examples", "next-examples", "churn-examples"):
        out[count] = sum(m.get(count, 0.0) for m, _ in per)
    out["intent-pos"] = sum(m.get("intent-positive-rate", 0) * m.get("intent-examples", 0) for m, _ in per)
    out["churn-pos"] = sum(m.get("churn-positive-rate", 0) * m.get("churn-examples", 0) for m, _ in per)
    return out


def auc_se(auc: float, positives: float, negatives: float) -> float:
    """Hanley-McNeil standard error of an AUC."""
    if not (positives > 0 and negatives > 0) or math.isnan(auc):
        return math.nan
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return math.sqrt(max(var, 0.0) / (positives * negatives))


def with_se(m: dict[str, float]) -> dict[str, float]:
    out = dict(m)
    n = m.get("next-examples", 0)
    if "next-hr@10" in m and n:
        out["next-hr@10-se"] = math.sqrt(m["next-hr@10"] * (1 - m["next-hr@10"]) / n)
    for task in ("intent", "churn"):
        if f"{task}-auc" in m:
            pos = m[f"{task}-pos"]
            out[f"{task}-auc-se"] = auc_se(m[f"{task}-auc"], pos, m[f"{task}-examples"] - pos)
    return out


def run_trial(config, split: str, references: bool) -> dict:
    world = load_world(config)
    data = [merchant_data(config, m, world) for m in world.merchant_ids]
    base, tokenizer, _ = load_base(config.base_dir)
    model = add_lora(base, config, seed=config.seed, tokenizer=tokenizer, facts=data[0].facts)
    teaching = [d.teaching(config) for d in data]  # the examples each merchant trains on, and their shoppers
    owners = [[e.user_id for e in t] for t in teaching]
    encoded = [encode(t, tokenizer) for t in teaching]
    baselines = [fit_baselines(d.train, d.facts, d.popularity) for d in data]
    rows = item_rows(tokenizer, data[0].facts)

    def score(model) -> dict:
        per = []
        for d, b in zip(data, baselines, strict=True):
            examples = d.valid if split == "valid" else d.test
            metrics = evaluate(model, tokenizer, examples, d.facts, batch_size=config.eval_batch_size,
                               precision=config.eval_precision,
                               tasks=config.task_list, baselines=b)
            per.append((metrics, len({e.user_id for e in examples})))
        return with_se(_weighted(per))

    out: dict = {"rounds": [score(model)]}
    initial = adapter_state(model)
    global_state = dict(initial)
    states = [PrivacyState() for _ in data]
    started = time.perf_counter()
    eps = []
    losses = []
    for server_round in range(1, config.num_rounds + 1):
        updates, weights = [], []
        for index, enc in enumerate(encoded):
            load_adapter_state(model, global_state)
            result = train_round(model, enc, config, states[index], seed=_seed(config, server_round, index),
                                 owners=owners[index], output_rows=rows)
            eps.append(result.epsilon)
            losses.append(result.train_loss)
            if result.status == "trained":
                updates.append(uplink_state(model, config.aggregation))
                weights.append(result.num_examples)
        if updates:
            total = sum(weights)
            merged = {k: sum(u[k] * (w / total) for u, w in zip(updates, weights, strict=True)) for k in updates[0]}
            step = getattr(config, "server_learning_rate", 1.0)
            global_state = {**global_state, **{k: global_state[k] + step * (v - global_state[k])
                                               for k, v in merged.items()}}
        load_adapter_state(model, global_state)
        out["rounds"].append(score(model))
    out["seconds"] = time.perf_counter() - started
    out["epsilon"] = max(eps) if eps else math.nan
    out["train-loss"] = losses[-len(data):]
    if references:
        local = []
        for index, (d, enc) in enumerate(zip(data, encoded, strict=True)):
            load_adapter_state(model, initial)
            state = PrivacyState()
            for server_round in range(1, config.num_rounds + 1):
                train_round(model, enc, config, state, seed=_seed(config, server_round, index),
                            owners=owners[index], output_rows=rows)
            examples = d.valid if split == "valid" else d.test
            local.append((evaluate(model, tokenizer, examples, d.facts, batch_size=config.eval_batch_size,
                                   precision=config.eval_precision,
                                   tasks=config.task_list), len({e.user_id for e in examples})))
        out["local-only"] = with_se(_weighted(local))
        plain = config.replace(dp=False)
        load_adapter_state(model, initial)
        pooled = encode([e for t in teaching for e in t], tokenizer)
        state = PrivacyState()
        for server_round in range(1, config.num_rounds + 1):
            train_round(model, pooled, plain, state, seed=_seed(config, server_round, 10_000),
                        owners=[u for o in owners for u in o], output_rows=rows)
        out["centralised"] = score(model)
    return out


def _cell(m: dict, key: str) -> str:
    if key not in m:
        return "—"
    se = m.get(f"{key}-se")
    return f"{m[key]:.3f}" + (f" ± {se:.3f}" if se is not None and not math.isnan(se) else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--set", action="append", default=[], help="override for every trial")
    parser.add_argument("--trial", action="append", default=[], help="name=key=value;key=value")
    parser.add_argument("--split", default="valid", choices=("valid", "test"))
    parser.add_argument("--references", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    trials = args.trial or ["default="]
    for trial in trials:
        name, _, spec = trial.partition("=")
        overrides = [*args.set, *[s for s in spec.split(";") if s]]
        config = load_config(args.config, overrides)
        out = run_trial(config, args.split, args.references)
        rows = [(f"r{k}", m) for k, m in enumerate(out["rounds"])]
        rows += [(k, out[k]) for k in ("local-only", "centralised") if k in out]
        print(f"## {name}: {'; '.join(overrides) or 'config as is'} ({out['seconds']:.0f} s federation, "
              f"eps {out['epsilon']:.2f}, last train loss {', '.join(f'{x:.3f}' for x in out['train-loss'])})",
              flush=True)
        print("| scorer | " + " | ".join(KEYS) + " |", flush=True)
        for label, m in rows:
            print(f"| {label} | " + " | ".join(_cell(m, k) for k in KEYS) + " |", flush=True)
        last = out["rounds"][-1]
        base_row = {"popularity": "next-popularity-hr@10", "markov": "next-markov-hr@10",
                    "intent-logistic": "intent-baseline-auc", "churn-logistic": "churn-baseline-auc",
                    "next-oracle": "next-oracle-hr@10", "intent-oracle": "intent-oracle-auc",
                    "churn-oracle": "churn-oracle-auc"}
        print("baselines (merchant valid): " + ", ".join(f"{k} {last.get(v, math.nan):.3f}"
                                                          for k, v in base_row.items()), flush=True)


if __name__ == "__main__":
    main()
