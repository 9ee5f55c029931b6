"""The empirical audit: the bound's arithmetic, the attacks' metrics, and real training that leaks or does not."""

import math

import numpy as np
import pytest
import torch

from shared.audit import canary_audit, epsilon_lower_bound, example_losses, membership_inference, p_value, tpr_at_fpr
from shared.canaries import make_canaries
from shared.config import FedShopConfig
from shared.dptrain import PrivacyState, train_round
from shared.modeling import encode
from tests.helpers import lora_parameters, tiny_lora_model


def test_p_value_without_delta_is_the_binomial_tail():
    # all 10 guesses right under eps-DP: P = (e^eps / (1 + e^eps))^10
    for eps in (0.0, 0.5, 2.0):
        assert math.isclose(p_value(100, 10, 10, eps, 0.0), (1 / (1 + math.exp(-eps))) ** 10, rel_tol=1e-12)
    # and the bound inverts it: the largest eps with that tail below 0.05
    bound = epsilon_lower_bound(100, 10, 10, 0.0, 0.05)
    assert math.isclose((1 / (1 + math.exp(-bound))) ** 10, 0.05, rel_tol=1e-6)
    assert p_value(100, 10, 10, 0.5, 1e-3) > p_value(100, 10, 10, 0.5, 0.0)  # delta only loosens the test


def test_chance_level_guessing_gives_no_lower_bound():
    assert epsilon_lower_bound(1000, 200, 100, 1e-5, 0.05) == 0.0
    rng = np.random.default_rng(0)
    included = rng.random(1000) < 0.5
    assert canary_audit(rng.normal(size=1000), included, 1e-5)["eps-emp"] == 0.0


def test_perfect_canary_scores_give_a_clearly_positive_bound():
    rng = np.random.default_rng(1)
    included = rng.random(400) < 0.5
    result = canary_audit(included + 0.01 * rng.normal(size=400), included, 1e-5)
    assert result["canary-auc"] == 1.0 and result["canary-correct"] == result["canary-guesses"]
    assert result["eps-emp"] > 2.0


def test_membership_metrics_on_a_hand_made_case():
    labels = np.array([1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.1, 0.7, 0.2, 0.1, 0.0])
    assert tpr_at_fpr(labels, scores, 0.0) == pytest.approx(2 / 3)  # above the best non-member (0.7)
    assert tpr_at_fpr(labels, scores, 0.25) == pytest.approx(2 / 3)  # one of four non-members may pass: t = 0.2
    result = membership_inference({"a": 0.1, "b": 0.2}, {"c": 0.3, "d": 0.05})
    assert result["mia-auc"] == pytest.approx(0.5) and result["mia-members"] == 2


AUDIT = FedShopConfig(model_size="tiny", num_merchants=1, shoppers_per_merchant=20, public_shoppers=10,
                      num_items=200, num_categories=4, history_length=6, batch_size=16, num_rounds=1,
                      lora_targets="q,v,o,wi", learning_rate=1e-2, local_epochs=12, audit_holdout=0.0)


def _canary_run(config: FedShopConfig) -> tuple[dict, float]:
    """Train on the included canaries only; audit the result against the untouched model."""
    model, tokenizer, merchant = tiny_lora_model(config, seed=3)
    canaries = make_canaries(200, merchant.facts, ["m0"], seed=5, history_length=config.history_length)
    examples = [c.example for c in canaries]
    inserted = [c.example for c in canaries if c.included]
    start = lora_parameters(model)
    before = example_losses(model, tokenizer, examples)
    result = train_round(model, encode(inserted, tokenizer), config, PrivacyState(), seed=9,
                         owners=[e.user_id for e in inserted])
    assert any(not torch.equal(start[k], v) for k, v in lora_parameters(model).items())
    after = example_losses(model, tokenizer, examples)
    included = np.array([c.included for c in canaries])
    return canary_audit(before - after, included, config.target_delta), result.epsilon


def test_without_dp_the_canary_attack_clearly_succeeds():
    audit, epsilon = _canary_run(AUDIT.replace(dp=False))
    assert math.isinf(epsilon)
    assert audit["canary-auc"] > 0.75 and audit["eps-emp"] > 0.5  # measured: AUC 0.82, eps_emp 1.29


def test_with_dp_the_lower_bound_stays_below_epsilon():
    audit, epsilon = _canary_run(AUDIT.replace(target_epsilon=1.0, privacy_unit="shopper"))
    assert epsilon <= 1.0
    assert audit["eps-emp"] <= epsilon
