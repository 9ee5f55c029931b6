"""`report.md` from a run directory written by hand: standard errors in the task tables and SE-decided verdicts."""

import json

from server.report import REFERENCES_FILE, read_references, timing_lines, write_report
from shared.config import FedShopConfig
from shared.metrics import binomial_se, compare, hanley_mcneil_se
from shared.rundir import RunDirectory

COUNTS = {"m0": {"num-examples": 100.0, "intent-examples": 200.0, "intent-positive-rate": 0.25,
                 "next-examples": 100.0},
          "m1": {"num-examples": 150.0, "intent-examples": 300.0, "intent-positive-rate": 0.2,
                 "next-examples": 150.0}}  # pooled: 500 intent examples, 50 + 60 = 110 positives; 250 next


def _record(scope_round: int, **metrics: float) -> dict:
    # the summary's counts are Flower's shopper-weighted means of the merchants' counts, not their sums
    summary = {**metrics, "intent-examples": 260.0, "intent-positive-rate": 0.22, "next-examples": 130.0}
    return {"round": scope_round, "scope": "evaluate", "metrics": summary,
            "merchants": {m: {**c, **metrics} for m, c in COUNTS.items()}}


def test_report_shows_standard_errors_and_decides_verdicts_by_them(tmp_path):
    # Prepare
    run_dir = RunDirectory(tmp_path)
    run_dir.start(FedShopConfig())
    run_dir.append_metrics(_record(0, **{"intent-auc": 0.6, "next-hr@10": 0.1}))
    run_dir.append_metrics(_record(2, **{"intent-auc": 0.8, "intent-baseline-auc": 0.78, "next-hr@10": 0.4,
                                         "next-hr@5": 0.3, "next-mrr": 0.2, "next-popularity-hr@10": 0.2,
                                         "next-markov-hr@10": 0.7}))
    local = {"metrics": {"intent-auc": 0.79, "next-hr@10": 0.38}, "merchants": {m: {**c} for m, c in COUNTS.items()}}
    (tmp_path / REFERENCES_FILE).write_text(json.dumps({"local-only": local}))
    # Execute
    write_report(run_dir, FedShopConfig(), {})
    report = (tmp_path / "report.md").read_text()
    # Assert: the table cells carry one SE from the pooled counts (110 positives, 390 negatives; 250 next examples)
    auc_se, start_se = hanley_mcneil_se(0.8, 110, 390), hanley_mcneil_se(0.6, 110, 390)
    assert f"| **federated model** | 0.800 ± {auc_se:.3f} |" in report
    assert f"| base alone (round 0) | 0.600 ± {start_se:.3f} |" in report
    assert (f"| **federated model** | 0.300 ± {binomial_se(0.3, 250):.3f} | 0.400 ± {binomial_se(0.4, 250):.3f} | "
            f"n/a | n/a | 0.200 ± {binomial_se(0.2, 250):.3f} |") in report
    assert "one standard error" in report
    # Assert: verdicts against round 0, the reference run and the baselines, each with its difference and SE
    assert "- federated purchase intent AUC 0.800 ± " in report
    assert (f"  - beats the base alone (round 0) 0.600 ± {start_se:.3f} (difference +0.200 ± "
            f"{compare(0.8, auc_se, 0.6, start_se).standard_error:.3f})") in report
    assert "  - level with local-only (each merchant alone, same DP budget) 0.790 ± " in report
    assert "  - level with logistic baseline (item rate, category affinity, price) 0.780 ± " in report
    assert "  - beats popularity 0.200 ± " in report and "  - is beaten by first-order Markov chain 0.700 ± " in report


def test_paired_results_decide_the_verdicts_they_cover_and_the_rest_stay_unpaired(tmp_path):
    # Prepare: local-only trails by 0.01 in HR@10 — level under the unpaired SE, a clear loss under the paired one
    run_dir = RunDirectory(tmp_path)
    run_dir.start(FedShopConfig())
    run_dir.append_metrics(_record(0, **{"intent-auc": 0.6, "next-hr@10": 0.1}))
    run_dir.append_metrics(_record(2, **{"intent-auc": 0.8, "next-hr@10": 0.4, "next-popularity-hr@10": 0.39}))
    local = {"metrics": {"intent-auc": 0.79, "next-hr@10": 0.39}, "merchants": {m: {**c} for m, c in COUNTS.items()}}
    pair = {"a": 0.402, "b": 0.392, "difference": 0.01, "se": 0.004, "shoppers": 250, "examples": 250}
    paired = {"federated vs local-only": {"next-hr@10": pair}}
    (tmp_path / REFERENCES_FILE).write_text(json.dumps({"local-only": local, "paired": paired}))
    # Execute
    write_report(run_dir, FedShopConfig(), {})
    report = (tmp_path / "report.md").read_text()
    # Assert: the paired line names its method, its pooled figures and its SE; the others keep the unpaired form
    assert ("  - beats local-only (each merchant alone, same DP budget) 0.390 ± 0.031 (paired bootstrap over 250 test "
            "shoppers: on all 250 test examples pooled 0.402 vs 0.392, difference +0.010 ± 0.004)") in report
    assert "  - level with popularity 0.390 ± 0.031 (difference +0.010 ± 0.044)" in report
    assert "  - level with local-only (each merchant alone, same DP budget) 0.790 ± " in report  # intent: unpaired
    assert "not the shopper-weighted mean" in report
    assert "| paired |" not in report and "paired" not in read_references(tmp_path)  # not a reference run


def test_timing_line_gives_means_the_training_share_and_the_concurrency():
    # Prepare: two rounds of 10 s and 30 s; a declined merchant (no training) counts in neither mean nor share
    def train(rnd: int, seconds: float, merchants: dict) -> dict:
        return {"round": rnd, "scope": "train", "metrics": {"round-seconds": seconds}, "merchants": merchants}

    trains = [train(1, 10.0, {"m0": {"declined": 0, "train-seconds": 2.0, "message-seconds": 4.0},
                              "m1": {"declined": 0, "train-seconds": 6.0, "message-seconds": 8.0}}),
              train(2, 30.0, {"m0": {"declined": 0, "train-seconds": 4.0, "message-seconds": 6.0},
                              "m1": {"declined": 1, "train-seconds": 0.0, "message-seconds": 1.0}})]
    # Execute
    [line] = timing_lines(trains)
    # Assert: means over rounds (20 s) and over trained merchant-rounds (6 s, 4 s); share (2 + 6 + 4) / (4 + 8 + 6);
    # handlers' 18 s in 40 s of rounds
    assert line.startswith("- time per train round: 20.0 s at the server")
    assert "6.0 s in its train handler, of which 4.0 s in the training steps" in line
    assert "**training share 67%** of the handlers' time" in line and "over 2 round(s)" in line
    assert "handlers' seconds / round seconds = 0.5" in line
    assert timing_lines([{"round": 1, "scope": "train", "metrics": {}, "merchants": {}}]) == []  # an older run


def test_with_sampled_evaluation_no_verdict_compares_round_0_with_the_last_round(tmp_path):
    # Prepare: the same records as a full evaluation would give, but each round scored a sample of merchants
    run_dir = RunDirectory(tmp_path)
    config = FedShopConfig(fraction_evaluate=0.5)
    run_dir.start(config)
    run_dir.append_metrics(_record(0, **{"intent-auc": 0.6, "next-hr@10": 0.1}))
    run_dir.append_metrics(_record(2, **{"intent-auc": 0.8, "next-hr@10": 0.4, "next-popularity-hr@10": 0.2}))
    # Execute
    write_report(run_dir, config, {})
    report = (tmp_path / "report.md").read_text()
    # Assert: the round-0 row is still in the table, but says what it is and no verdict uses it
    assert "With fraction-evaluate 0.5 each round's evaluation is a fresh sample of merchants" in report
    assert "| base alone (round 0) | 0.600 ± " in report
    assert "the base alone (round 0)" not in report.split("## Test metrics")[0]
    assert "  - beats popularity 0.200 ± " in report  # the other verdicts stay
