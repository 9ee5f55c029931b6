import math

import numpy as np

from shared.metrics import ranking_metrics, roc_auc, target_rank


def test_auc_matches_hand_count_with_ties():
    # positives 0.9, 0.5; negatives 0.5, 0.1 -> pairs: (0.9>0.5) 1, (0.9>0.1) 1, (0.5=0.5) 0.5, (0.5>0.1) 1 = 3.5/4
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == 0.875
    assert math.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_rank_counts_ties_against_the_model_and_excludes_seen_items():
    scores = np.array([0.5, 0.9, 0.5, 0.1, 0.5])
    assert target_rank(scores, 0) == 4  # item 1 is higher, items 2 and 4 tie: all three rank ahead
    assert target_rank(scores, 0, exclude=(1, 2)) == 2  # only item 4 (tie) remains ahead
    assert target_rank(np.zeros(100), 7) == 100  # a constant model ranks every target last


def test_ranking_metrics_hand_values():
    out = ranking_metrics(np.array([1, 3, 11]), ks=(10,))
    assert out["hr@10"] == 2 / 3
    assert math.isclose(out["ndcg@10"], (1.0 + 1.0 / math.log2(4)) / 3)
    assert math.isclose(out["mrr"], (1 + 1 / 3 + 1 / 11) / 3)


def test_log_loss_and_calibration_hand_values():
    from shared.metrics import expected_calibration_error, log_loss

    labels, p = np.array([1, 0, 1, 0]), np.array([0.8, 0.2, 0.6, 0.6])
    assert math.isclose(log_loss(labels, p), -(2 * math.log(0.8) + math.log(0.6) + math.log(0.4)) / 4)
    # bins: 0.2 -> bin 2 (rate 0, conf 0.2); 0.6, 0.6 -> bin 6 (rate 1/2, conf 0.6); 0.8 -> bin 8 (rate 1, conf 0.8)
    expected = 0.25 * 0.2 + 0.5 * 0.1 + 0.25 * 0.2
    assert math.isclose(expected_calibration_error(labels, p), expected)
    assert expected_calibration_error(np.array([1, 0]), np.array([1.0, 0.0])) == 0.0  # p = 1 falls in the last bin


def test_elasticity_recovers_a_constant_elasticity_curve():
    from shared.metrics import elasticity

    levels = np.array([0.8, 0.9, 1.0, 1.1, 1.25])
    assert math.isclose(elasticity(levels, 0.3 * levels ** -2.5), -2.5)
    assert math.isclose(elasticity(levels, np.full(5, 0.2)), 0.0, abs_tol=1e-12)


def test_a_family_only_some_merchants_have_is_pooled_by_its_own_counts():
    from shared.metrics import pool_by_count

    merchants = [{"next-new-hr@10": 0.5, "next-new-examples": 2.0, "num-examples": 100.0},
                 {"next-new-hr@10": 0.2, "next-new-examples": 8.0, "num-examples": 10.0},
                 {"num-examples": 50.0}]  # no new target at this merchant
    pooled = pool_by_count(merchants, "next-new")
    assert pooled == {"next-new-hr@10": (0.5 * 2 + 0.2 * 8) / 10, "next-new-examples": 10.0}
    assert pool_by_count([{"num-examples": 5.0}], "next-new") == {}


def test_binomial_se_hand_value_and_one_over_sqrt_n():
    from shared.metrics import binomial_se

    assert math.isclose(binomial_se(0.2, 100), 0.04)  # sqrt(0.2 * 0.8 / 100)
    assert math.isclose(binomial_se(0.3, 400), binomial_se(0.3, 100) / 2)  # 4x the examples halves it
    assert math.isnan(binomial_se(0.3, 0))


def test_hanley_mcneil_hand_value_and_one_over_sqrt_n():
    from shared.metrics import hanley_mcneil_se

    # AUC 0.8, 50 positives, 50 negatives: Q1 = 0.8 / 1.2, Q2 = 2 * 0.64 / 1.8
    q1, q2 = 0.8 / 1.2, 1.28 / 1.8
    hand = math.sqrt((0.8 * 0.2 + 49 * (q1 - 0.64) + 49 * (q2 - 0.64)) / 2500)
    assert math.isclose(hanley_mcneil_se(0.8, 50, 50), hand) and math.isclose(hand, 0.04450, abs_tol=1e-5)
    # 20 positives (Q1 pairs two positives), 80 negatives (Q2 pairs two negatives): not symmetric in the counts
    assert math.isclose(hanley_mcneil_se(0.8, 20, 80), math.sqrt((0.16 + 19 * (q1 - 0.64) + 79 * (q2 - 0.64)) / 1600))
    assert math.isclose(hanley_mcneil_se(0.8, 20, 80), 0.06267, abs_tol=1e-5)
    ratio = hanley_mcneil_se(0.8, 4000, 4000) / hanley_mcneil_se(0.8, 1000, 1000)
    assert math.isclose(ratio, 0.5, rel_tol=0.01)
    assert math.isnan(hanley_mcneil_se(0.8, 0, 50))


def test_hanley_mcneil_matches_the_spread_of_aucs_over_random_test_sets():
    # Prepare: binormal scores with AUC Phi(1.19 / sqrt 2) ~ 0.8, 60 positives and 140 negatives per test set
    from shared.metrics import hanley_mcneil_se

    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(60), np.zeros(140)]
    # Execute
    aucs = np.array([roc_auc(labels, np.r_[rng.normal(1.19, 1, 60), rng.normal(0, 1, 140)]) for _ in range(1500)])
    # Assert
    assert math.isclose(hanley_mcneil_se(float(aucs.mean()), 60, 140), aucs.std(ddof=1), rel_tol=0.2)


def test_standard_errors_use_the_counts_pooled_over_merchants():
    from shared.metrics import binomial_se, hanley_mcneil_se, standard_errors

    merchants = [{"intent-examples": 30.0, "intent-positive-rate": 0.2, "next-examples": 40.0},
                 {"intent-examples": 70.0, "intent-positive-rate": 0.4, "next-examples": 60.0,
                  "next-new-examples": 5.0, "intent-auc": None}]  # a NaN AUC is stored as null
    metrics = {"intent-auc": 0.7, "intent-baseline-auc": 0.6, "intent-logloss": 0.5, "next-hr@10": 0.3,
               "next-markov-mrr": 0.1, "next-new-hr@10": 0.2, "price-curve-mae": 0.05, "num-examples": 20.0}
    se = standard_errors(metrics, merchants)
    assert se["intent-auc-se"] == hanley_mcneil_se(0.7, 34, 66)  # 6 + 28 positives of 100
    assert se["intent-baseline-auc-se"] == hanley_mcneil_se(0.6, 34, 66)
    assert se["next-hr@10-se"] == binomial_se(0.3, 100) and se["next-markov-mrr-se"] == binomial_se(0.1, 100)
    assert se["next-new-hr@10-se"] == binomial_se(0.2, 5)
    assert se["price-curve-mae-se"] == binomial_se(0.05, 100)  # price curves are over the intent examples
    assert set(se) == {f"{k}-se" for k in metrics} - {"intent-logloss-se", "num-examples-se"}


def test_a_verdict_needs_two_standard_errors_of_the_difference():
    from shared.metrics import compare

    se = 0.01  # each side; the difference's SE is sqrt(2) x 0.01
    diff_se = math.sqrt(2) * se
    assert compare(0.5 + 3 * diff_se, se, 0.5, se).verdict == "beats"
    assert compare(0.5 + 1 * diff_se, se, 0.5, se).verdict == "level with"
    assert compare(0.5 - 1 * diff_se, se, 0.5, se).verdict == "level with"
    assert compare(0.5 - 3 * diff_se, se, 0.5, se).verdict == "is beaten by"
    lower = compare(0.5 - 3 * diff_se, se, 0.5, se, higher_is_better=False)  # an error: lower is better
    assert lower.verdict == "beats" and math.isclose(lower.difference, -3 * diff_se)
    assert math.isclose(lower.standard_error, diff_se)
    assert compare(0.9, math.nan, 0.5, se).verdict == "vs"  # no standard error, no claim
