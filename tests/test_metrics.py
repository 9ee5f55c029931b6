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
