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
