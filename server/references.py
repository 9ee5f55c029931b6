"""Reference runs a report sets beside the federated model, on exactly the same splits (simulation only).

- `local-only`: every merchant trains the same LoRA adapter from the same base alone, with the same recipe and the
  same DP budget (its own accountant, the same rounds x local epochs), and is evaluated on its own test shoppers.
  What a merchant gets without joining the federation.
- `centralised`: every merchant's training examples pooled in one place and trained without DP for the same
  number of epochs. The upper reference that a federation with privacy gives up.

Both read every merchant's data, which only a simulation can: they are research references, not something a
deployment runs. No Flower here: the same `shared.dptrain.train_round` and `shared.modeling.evaluate` the merchants
use, called directly.

Paired comparisons: the base alone (round 0) and the run's final federated adapter are also scored here on every
merchant's test examples, keeping per-example outputs; the federated model is then compared example by example with
round 0, each reference run and each baseline, pooled over all merchants' test examples, with a bootstrap over test
shoppers for the standard error of each difference (`references.json` under "paired").
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from server.report import REFERENCES_FILE
from shared.baselines import fit_baselines
from shared.config import REFERENCE_CHOICES, FedShopConfig
from shared.data import MerchantData, merchant_data
from shared.dptrain import PrivacyState, train_round
from shared.files import write_text_atomic
from shared.metrics import pool_metrics
from shared.model import add_lora, item_rows, load_adapter_state, load_base, read_adapter
from shared.modeling import encode, evaluate_with_outputs, resolve_device
from shared.outputs import Outputs, paired_results, pool
from shared.sources import load_world
from shared.tasks import CatalogueFacts

log = logging.getLogger("fedshop")
REFERENCES = tuple(kind for kind in REFERENCE_CHOICES if kind != "none")


def _seed(config: FedShopConfig, server_round: int, partition_id: int) -> int:
    return config.seed * 1_000_003 + server_round * 1_009 + partition_id  # the merchants' own seeding


def weighted(merchants: dict[str, dict[str, float]]) -> dict[str, float]:
    """Metrics pooled over merchants weighted by their test shoppers, as the federated evaluation pools them
    (`pool_metrics`), with the total number of test shoppers."""
    out = pool_metrics(list(merchants.values()))
    out["num-examples"] = float(sum(m["num-examples"] for m in merchants.values()))
    return out


def run_references(config: FedShopConfig, kinds: list[str]) -> dict:
    """Train and evaluate each reference; returns {kind: {"metrics": ..., "merchants": ..., ...}, "paired": ...}
    (the federated model of `config.run_dir` against round 0, each reference and each baseline).

    The work is split into jobs (`_jobs`): centralised whole, local-only one merchant each. On the CPU with several
    jobs and cores, the jobs run in worker processes of one torch thread each, taken longest first as workers free
    up (`_job_in_process`): the small model's ops gain about 1.4x from a second thread, two jobs side by side more.
    Each job's result does not depend on where or in which order it ran."""
    for kind in kinds:
        if kind not in REFERENCES:
            raise ValueError(f"unknown reference {kind!r}")
    device = resolve_device(config.device)
    world = load_world(config)
    data = {m: merchant_data(config, m, world) for m in world.merchant_ids}
    jobs = _jobs(kinds, list(data))
    workers = min(len(jobs), os.cpu_count() or 1) if device.type == "cpu" else 1
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(_job_in_process, [config] * len(jobs), *zip(*jobs, strict=True)))
    else:
        done = [_job(config, *job, data) for job in jobs]
    out: dict[str, dict] = {}
    outputs: dict[str, dict[str, Outputs]] = {}  # scorer -> merchant -> per-example outputs on its test examples
    for kind in kinds:
        parts = [part for job, part in zip(jobs, done, strict=True) if job[0] == kind]
        merchants = {m: part["merchants"][m] for m in data for part in parts if m in part["merchants"]}
        outputs[kind] = {m: part["outputs"][m] for m in data for part in parts if m in part["outputs"]}
        epsilons = {m: e for part in parts for m, e in part["epsilons"].items()}
        out[kind] = {"metrics": weighted(merchants), "merchants": merchants,
                     "epsilon": {m: (e if math.isfinite(e) else "inf") for m, e in epsilons.items()},
                     "seconds": round(sum(part["seconds"] for part in parts), 1)}
        log.info("reference %s done in %.0f s (its jobs' time added up)", kind, out[kind]["seconds"])
    started = time.perf_counter()
    out["paired"] = paired(config, data, outputs)
    log.info("paired comparisons done in %.0f s", time.perf_counter() - started)
    return out


def _jobs(kinds: list[str], merchants: list[str]) -> list[tuple[str, str, int]]:
    """The reference runs as (kind, merchant, its index) jobs, the longest first: centralised trains on every
    merchant's data at once (merchant ''), local-only is one job per merchant."""
    return ([(kind, "", -1) for kind in kinds if kind != "local-only"]
            + [("local-only", m, i) for i, m in enumerate(merchants) if "local-only" in kinds])


def _job_in_process(config: FedShopConfig, kind: str, merchant: str, merchant_index: int) -> dict:
    """`_job` in a worker process: one torch thread, the world loaded there (cached for the worker's next job)."""
    torch.set_num_threads(1)
    world = load_world(config)
    names = [merchant] if merchant else world.merchant_ids
    return _job(config, kind, merchant, merchant_index, {m: merchant_data(config, m, world) for m in names})


def _job(config: FedShopConfig, kind: str, merchant: str, merchant_index: int, data: dict[str, MerchantData]) -> dict:
    """One job of a reference run: {"merchants": {merchant: test metrics}, "outputs": {merchant: test outputs},
    "epsilons": {merchant: ε}, "seconds"}. local-only trains `merchant` alone, seeded as the federation seeds the
    merchant at `merchant_index`; centralised pools all of `data`."""
    device = resolve_device(config.device)
    started = time.perf_counter()
    merchants: dict[str, dict[str, float]] = {}
    outputs: dict[str, Outputs] = {}
    epsilons: dict[str, float] = {}
    if kind == "local-only":
        d = data[merchant]
        base, tokenizer, _ = load_base(config.base_dir)
        model = add_lora(base, config, seed=config.seed, tokenizer=tokenizer, facts=d.facts).to(device)
        teaching = d.teaching(config)
        state, encoded = PrivacyState(), encode(teaching, tokenizer)
        for server_round in range(1, config.num_rounds + 1):
            result = train_round(model, encoded, config, state, seed=_seed(config, server_round, merchant_index),
                                 owners=[e.user_id for e in teaching], output_rows=item_rows(tokenizer, d.facts))
            epsilons[merchant] = result.epsilon
        merchants[merchant], outputs[merchant] = _evaluate(model, tokenizer, d, config)
    else:  # centralised
        plain, facts = config.replace(dp=False), catalogue(data)
        base, tokenizer, _ = load_base(config.base_dir)
        model = add_lora(base, plain, seed=config.seed, tokenizer=tokenizer, facts=facts).to(device)
        pooled = [e for d in data.values() for e in d.teaching(config)]
        encoded, state = encode(pooled, tokenizer), PrivacyState()
        for server_round in range(1, config.num_rounds + 1):
            train_round(model, encoded, plain, state, seed=_seed(config, server_round, 10_000),
                        owners=[e.user_id for e in pooled], output_rows=item_rows(tokenizer, facts))
        for name, d in data.items():
            merchants[name], outputs[name] = _evaluate(model, tokenizer, d, config)
    return {"merchants": merchants, "outputs": outputs, "epsilons": epsilons,
            "seconds": time.perf_counter() - started}


def catalogue(data: dict[str, MerchantData]) -> CatalogueFacts:
    """The catalogue facts (public, the same at every merchant)."""
    return next(iter(data.values())).facts


def paired(config: FedShopConfig, data: dict[str, MerchantData], references: dict[str, dict[str, Outputs]]) -> dict:
    """The federated final adapter of `config.run_dir` against round 0, the `references`' outputs and the baselines,
    on every merchant's test examples pooled (see `shared.outputs.paired_results`)."""
    base, tokenizer, _ = load_base(config.base_dir)
    # B = 0: the base alone, as the federation's round 0
    model = add_lora(base, config, seed=config.seed, tokenizer=tokenizer,
                     facts=catalogue(data)).to(resolve_device(config.device))
    if config.continued_from:  # a continued run's round 0 is the adapter it started from
        from server.continuation import starting_adapter

        load_adapter_state(model, starting_adapter(config))
    tasks = [t for t in config.task_list if t != "price"]  # the price curve has no paired comparison yet
    start = {m: _evaluate(model, tokenizer, d, config, tasks=tasks)[1] for m, d in data.items()}
    load_adapter_state(model, read_adapter(config.run_dir))  # ffa: the saved adapter holds the server's A and B
    federated = {m: _evaluate(model, tokenizer, d, config, tasks=tasks, baselines=True)[1] for m, d in data.items()}
    others = {"round 0": pool(start)} | {kind: pool(merchants) for kind, merchants in references.items()}
    return paired_results(pool(federated), others)


def _evaluate(model, tokenizer, d: MerchantData, config: FedShopConfig, tasks: list[str] | None = None,
              baselines: bool = False) -> tuple[dict[str, float], Outputs]:
    fitted = fit_baselines(d.train, d.facts, d.popularity) if baselines else None
    metrics, outputs = evaluate_with_outputs(model, tokenizer, d.test, d.facts, batch_size=config.eval_batch_size,
                                             tasks=tasks or config.task_list, baselines=fitted,
                                             precision=config.eval_precision)
    metrics["num-examples"] = float(len({e.user_id for e in d.test}))
    return metrics, outputs


def write_references(run_dir: str | Path, references: dict) -> Path:
    path = Path(run_dir) / REFERENCES_FILE
    write_text_atomic(path, json.dumps(references, indent=1, sort_keys=True))
    return path
