"""Paired comparisons from per-example outputs: bootstrap over test shoppers, the outputs `evaluate` keeps, and a
tiny simulation whose references carry them into `references.json` and the report."""

import json
import math

import numpy as np
import pytest

from shared.metrics import (
    binary_metrics,
    binomial_se,
    compare,
    decide,
    paired_auc,
    paired_mean,
    ranking_metrics,
    roc_auc,
    target_rank,
    weighted_auc,
)
from shared.outputs import Outputs, paired_comparison, paired_results, pool
from shared.rundir import RunDirectory


def test_weighted_auc_equals_the_auc_of_the_examples_repeated_by_their_weights():
    # Prepare: scores with ties, integer weights
    rng = np.random.default_rng(1)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.3 * labels, 1)
    weights = rng.integers(0, 4, size=200)
    # Execute
    weighted = weighted_auc(labels, scores, np.vstack([np.ones(200), weights]))
    # Assert
    assert weighted[0] == pytest.approx(roc_auc(labels, scores), abs=1e-12)
    assert weighted[1] == pytest.approx(roc_auc(np.repeat(labels, weights), np.repeat(scores, weights)), abs=1e-12)


def test_identical_scorers_differ_by_zero_with_zero_standard_error():
    rng = np.random.default_rng(2)
    labels, scores, hits = rng.random(300) < 0.4, rng.random(300), (rng.random(300) < 0.2).astype(float)
    shoppers = np.arange(300)
    for result in (paired_auc(labels, scores, scores, shoppers), paired_mean(hits, hits, shoppers)):
        assert result.difference == 0.0 and result.standard_error == 0.0
    assert paired_mean(hits, hits, shoppers).analytic_se == 0.0


def test_paired_se_of_hr_is_far_below_the_unpaired_se_when_scorers_mostly_agree():
    # Prepare: 800 shoppers; B misses 30 of the targets A hits, and they agree on every other example
    rng = np.random.default_rng(3)
    hits_a = (rng.random(800) < 0.4).astype(float)
    hits_b = hits_a.copy()
    hits_b[rng.choice(np.flatnonzero(hits_a), 30, replace=False)] = 0.0
    # Execute
    pair = paired_mean(hits_a, hits_b, np.arange(800))
    unpaired = compare(hits_a.mean(), binomial_se(hits_a.mean(), 800), hits_b.mean(), binomial_se(hits_b.mean(), 800))
    # Assert: a 0.0375 gain is level under the unpaired SE, a clear win under the paired one
    assert pair.difference == pytest.approx(30 / 800)
    assert pair.standard_error < unpaired.standard_error / 3
    assert pair.standard_error == pytest.approx(pair.analytic_se, rel=0.1)  # bootstrap agrees with sd(d) / sqrt(n)
    assert unpaired.verdict == "level with" and decide(pair.difference, pair.standard_error).verdict == "beats"


def _correlated_scorers(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    labels = rng.random(n) < 0.3
    shared = rng.normal(size=n)  # what both scorers see: their AUCs move together from one test set to the next
    return (labels, 1.0 * labels + shared + 0.5 * rng.normal(size=n),
            0.8 * labels + shared + 0.5 * rng.normal(size=n))


def test_bootstrap_se_of_an_auc_difference_matches_its_spread_over_fresh_test_sets():
    # Prepare: the true sd of AUC_A - AUC_B over 400 fresh test sets of 400 shoppers
    rng = np.random.default_rng(4)
    spread = np.std([roc_auc(y, a) - roc_auc(y, b) for y, a, b in (_correlated_scorers(rng, 400)
                                                                    for _ in range(400))], ddof=1)
    # Execute: the bootstrap SE from single test sets (averaged over a few, to compare means not luck)
    estimates = [paired_auc(y, a, b, np.arange(400), seed=k).standard_error
                 for k, (y, a, b) in enumerate(_correlated_scorers(rng, 400) for _ in range(5))]
    # Assert
    assert np.mean(estimates) == pytest.approx(spread, rel=0.25)
    unpaired = np.std([roc_auc(y, a) for y, a, _ in (_correlated_scorers(rng, 400) for _ in range(200))]) * math.sqrt(2)
    assert np.mean(estimates) < unpaired / 2  # pairing removes the shared noise


def test_a_shoppers_examples_are_resampled_together():
    # Prepare: each shopper's two examples carry the same difference, so pairs vary as one, not independently
    rng = np.random.default_rng(5)
    per_shopper = (rng.random(200) < 0.5).astype(float)
    hits_a, hits_b, shoppers = np.repeat(per_shopper, 2), np.zeros(400), np.repeat(np.arange(200), 2)
    # Execute
    together, independent = paired_mean(hits_a, hits_b, shoppers), paired_mean(hits_a, hits_b, np.arange(400))
    # Assert: the cluster bootstrap sees 200 independent shoppers, sqrt(2) times the naive SE
    assert together.shoppers == 200 and independent.shoppers == 400
    assert together.standard_error / independent.standard_error == pytest.approx(math.sqrt(2), rel=0.15)


def _outputs(merchant_seed: int, n: int, shift: float) -> Outputs:
    rng = np.random.default_rng(merchant_seed)
    labels = (rng.random(n) < 0.4).astype(int)
    shoppers = np.array([f"u{i}" for i in range(n)])
    return Outputs({"intent": shoppers, "next": shoppers}, {"intent": labels, "next": rng.integers(0, 50, n)},
                   {"intent": labels * shift + rng.random(n), "intent-baseline": rng.random(n)},
                   {"next": rng.integers(1, 30, n), "next-markov": rng.integers(1, 30, n)})


def test_pooled_outputs_qualify_shoppers_by_merchant_and_compare_every_scorer():
    # Prepare: two merchants with the same shopper ids; only m0 has a Markov baseline
    m0, m1 = _outputs(0, 50, 0.5), _outputs(1, 30, 0.5)
    del m1.ranks["next-markov"]
    # Execute
    federated = pool({"m0": m0, "m1": m1})
    results = paired_results(federated, {"round 0": pool({"m0": _outputs(0, 50, 0.0), "m1": _outputs(1, 30, 0.0)})},
                             replicates=200)
    # Assert
    assert len(set(federated.shoppers["intent"])) == 80 and federated.shoppers["intent"][0] == "m0/u0"
    assert "next-markov" not in federated.scorers()  # not every merchant has it: no pooled comparison
    assert set(results) == {"federated vs round 0", "federated vs intent-baseline"}
    assert set(results["federated vs round 0"]) == {"intent-auc", "next-hr@10", "next-ndcg@10", "next-mrr"}
    row = results["federated vs round 0"]["intent-auc"]
    assert row["examples"] == row["shoppers"] == 80 and row["a"] == pytest.approx(roc_auc(federated.labels["intent"],
                                                                                         federated.probabilities["intent"]))
    with pytest.raises(ValueError, match="same examples"):
        paired_comparison(federated, pool({"m1": m1, "m0": m0}))


def test_evaluate_keeps_its_metrics_and_its_outputs_reproduce_them(tiny_config):
    from helpers import tiny_lora_model

    from shared.baselines import fit_baselines
    from shared.modeling import ItemScorer, binary_probability, evaluate, evaluate_with_outputs

    # Prepare
    model, tokenizer, merchant = tiny_lora_model(tiny_config, seed=3)
    baselines = fit_baselines(merchant.train, merchant.facts, merchant.popularity)
    test = merchant.test
    # Execute
    metrics = evaluate(model, tokenizer, test, merchant.facts, batch_size=16, baselines=baselines)
    again, outputs = evaluate_with_outputs(model, tokenizer, test, merchant.facts, batch_size=16, baselines=baselines)
    # Assert: the same numbers as the scoring primitives the evaluation was built from, computed here directly
    assert metrics == pytest.approx(again, nan_ok=True)
    intent = [e for e in test if e.task == "intent"]
    labels = np.array([e.label for e in intent])
    direct = binary_metrics("intent", labels, binary_probability(model, tokenizer, [e.source for e in intent], 16))
    direct |= binary_metrics("intent-baseline", labels, baselines.intent_probability(intent))
    following = [e for e in test if e.task == "next-item"]
    scores = ItemScorer(tokenizer, merchant.facts).score_sources(model, tokenizer, [e.source for e in following], 16)
    ranks = [target_rank(row, e.label, e.seen) for row, e in zip(scores.float().numpy(), following, strict=True)]
    direct |= {f"next-{k}": v for k, v in ranking_metrics(np.asarray(ranks), ks=(5, 10)).items()}
    assert {k: metrics[k] for k in direct} == pytest.approx(direct)
    # Assert: the per-example outputs give back the metrics, example by example in test order
    assert list(outputs.shoppers["intent"]) == [e.user_id for e in intent]
    assert roc_auc(outputs.labels["intent"], outputs.probabilities["intent"]) == pytest.approx(metrics["intent-auc"])
    assert roc_auc(outputs.labels["churn"], outputs.probabilities["churn"]) == pytest.approx(metrics["churn-auc"])
    for scorer in ("next", "next-markov", "next-popularity"):
        assert ranking_metrics(outputs.ranks[scorer])["hr@10"] == pytest.approx(metrics[f"{scorer}-hr@10"])

@pytest.mark.slow
def test_simulation_with_references_writes_paired_comparisons_and_the_report_uses_them(tiny_run):
    # Execute (the session's run): the tiny federation, then local-only and centralised with the paired comparisons
    run_dir = tiny_run.path
    # Assert: every comparison in references.json, on the pooled test shoppers of all merchants
    paired = json.loads((run_dir / "references.json").read_text())["paired"]
    assert {"federated vs round 0", "federated vs local-only", "federated vs centralised",
            "federated vs next-popularity"} <= set(paired)
    row = paired["federated vs local-only"]["next-hr@10"]
    assert row["difference"] == pytest.approx(row["a"] - row["b"]) and row["se"] >= 0 and row["shoppers"] > 40
    # Assert: the federated model scored here is the run's final model (same pooled HR@10 as its last evaluation)
    final = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    merchants = final["merchants"].values()
    hits = sum(m["next-hr@10"] * m["next-examples"] for m in merchants) / sum(m["next-examples"] for m in merchants)
    assert row["a"] == pytest.approx(hits, abs=1e-9)
    # Assert: every train record is timed, and a merchant's training steps fit in its handler, which fits in the round
    trains = [r for r in RunDirectory(run_dir).read_metrics() if r["scope"] == "train"]
    assert len(trains) == 2
    for record in trains:
        round_seconds = record["metrics"]["round-seconds"]
        assert round_seconds > 0 and set(record["merchants"]) == {"m0", "m1", "m2"}
        for merchant in record["merchants"].values():
            assert 0 < merchant["train-seconds"] <= merchant["message-seconds"] <= round_seconds
    report = (run_dir / "report.md").read_text()
    assert "- time per train round: " in report and "training share" in report
    assert "local-only (each merchant alone, same DP budget)" in report
    assert f"(paired bootstrap over {row['shoppers']} test shoppers: on all {row['examples']} test examples" in report


@pytest.mark.slow
def test_reference_jobs_in_worker_processes_give_what_they_give_one_after_the_other(tiny_run):
    # Prepare: the session's run, whose references ran as jobs in worker processes of one torch thread each on a
    # machine with 2 cores (centralised first, then local-only one merchant a job, taken as workers freed up)
    import os

    import torch

    from server.references import _job, _jobs
    from shared.config import load_config
    from shared.data import merchant_data
    from shared.sources import load_world

    assert (os.cpu_count() or 1) >= 2  # else the run took the in-process path and this compares it with itself
    config = load_config(tiny_run.path / "config.toml")
    recorded = json.loads((tiny_run.path / "references.json").read_text())
    world = load_world(config)
    data = {m: merchant_data(config, m, world) for m in world.merchant_ids}
    jobs = _jobs(["local-only", "centralised"], list(data))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # Execute: every job here, one after the other, in this process
        done = [_job(config, *job, data) for job in jobs]
    finally:
        torch.set_num_threads(threads)
    # Assert: the jobs were centralised whole first, then each merchant alone; each merchant's test metrics and
    # local-only epsilon equal the recorded ones exactly
    assert [(k, m) for k, m, _ in jobs] == [("centralised", "")] + [("local-only", m) for m in data]
    for (kind, merchant, _), part in zip(jobs, done, strict=True):
        assert set(part["merchants"]) == ({merchant} if merchant else set(data))
        for name, metrics in part["merchants"].items():
            assert metrics == recorded[kind]["merchants"][name]
        if kind == "local-only":
            assert part["epsilons"][merchant] == pytest.approx(recorded[kind]["epsilon"][merchant], rel=1e-12)
