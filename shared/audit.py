"""Empirical privacy audit of a trained global adapter: what an attacker holding the model can tell.

Two attacks, both black-box on per-example losses:

1. **Loss-threshold membership inference.** Members are shoppers whose events trained the model; non-members are
   the shoppers each merchant held out of training (`audit-holdout`). A shopper's score is minus their mean loss
   over their training-split examples; the report gives the attack's ROC AUC and its TPR at 1 % FPR.
2. **One-run canary audit** (Steinke, Nasr and Jagielski, "Privacy auditing with one (1) training run", 2023).
   `audit-canaries` canaries were each inserted with probability 1/2 (see `shared.canaries`). The attacker scores
   each canary by how much the trained adapter lowered its loss relative to the public base, guesses "in" for the k
   highest and "out" for the k lowest scores, and the number of right guesses turns into a lower bound eps_emp:
   the largest epsilon at which (epsilon, delta)-DP would make that many right guesses less likely than
   `confidence`. Several k are tried with a Bonferroni-corrected confidence, so the bound holds at the stated
   level. A DP-trained model must give eps_emp <= its theoretical epsilon (with probability >= 1 - confidence).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import nn
from transformers import PreTrainedTokenizerFast

from shared.metrics import roc_auc
from shared.modeling import encode, per_sample_loss
from shared.tasks import Example

GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)  # k as a fraction of the canaries, per side


@torch.no_grad()
def example_losses(model: nn.Module, tokenizer: PreTrainedTokenizerFast, examples: list[Example],
                   batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = encode(examples[start:start + batch_size], tokenizer)
        out.append(per_sample_loss(model, chunk.input_ids, chunk.attention_mask, chunk.target_ids).float().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """Largest true-positive rate of a threshold `score > t` whose false-positive rate is at most `fpr`."""
    negatives = np.sort(scores[labels == 0])[::-1]
    positives = scores[labels == 1]
    allowed = int(math.floor(fpr * len(negatives)))  # negatives that may lie above the threshold
    threshold = negatives[allowed] if allowed < len(negatives) else -np.inf
    return float(np.mean(positives > threshold)) if len(positives) else math.nan


def membership_inference(member_losses: dict[str, float], nonmember_losses: dict[str, float]) -> dict[str, float]:
    scores = -np.array([*member_losses.values(), *nonmember_losses.values()])
    labels = np.array([1] * len(member_losses) + [0] * len(nonmember_losses))
    if not member_losses or not nonmember_losses:
        return {"mia-auc": math.nan, "mia-tpr@1%fpr": math.nan, "mia-members": len(member_losses),
                "mia-nonmembers": len(nonmember_losses)}
    return {"mia-auc": roc_auc(labels, scores), "mia-tpr@1%fpr": tpr_at_fpr(labels, scores, 0.01),
            "mia-members": len(member_losses), "mia-nonmembers": len(nonmember_losses)}


def mean_loss_by_shopper(examples: list[Example], losses: np.ndarray) -> dict[str, float]:
    totals: dict[str, list[float]] = {}
    for example, loss in zip(examples, losses, strict=True):
        totals.setdefault(example.user_id, []).append(float(loss))
    return {user: float(np.mean(values)) for user, values in totals.items()}


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses right] under (epsilon, delta)-DP, m canaries each in with probability 1/2.

    Steinke et al. (2023), Theorem 3.1 / their appendix's procedure: a Binomial(r, e^eps / (1 + e^eps)) tail plus
    the delta term 2 m delta max_i P[v - i <= Binomial < v] / i.
    """
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0:
        return min(tail, 1.0)
    below, worst = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(stats.binom.pmf(v - i, r, q))
        worst = max(worst, below / i)
    return min(tail + 2 * m * delta * worst, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float) -> float:
    """Largest epsilon whose p-value for (r guesses, v right) is below `confidence` (0 if none)."""
    if r == 0 or p_value(m, r, v, 0.0, delta) >= confidence:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < confidence and high < 1e3:
        low, high = high, high * 2
    for _ in range(50):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < confidence:
            low = mid
        else:
            high = mid
    return low


def canary_audit(scores: np.ndarray, included: np.ndarray, delta: float, confidence: float = 0.05
                 ) -> dict[str, float]:
    """eps_emp from canary scores (higher = more likely inserted) and the true coin flips."""
    m = len(scores)
    order = np.argsort(-scores, kind="stable")
    ks = sorted({max(1, int(round(f * m))) for f in GUESS_FRACTIONS if 2 * max(1, int(round(f * m))) <= m})
    best = {"eps-emp": 0.0, "canary-guesses": 0, "canary-correct": 0}
    level = confidence / max(1, len(ks))  # Bonferroni over the k tried
    for k in ks:
        correct = int(included[order[:k]].sum() + (~included[order[m - k:]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, delta, level)
        if bound > best["eps-emp"] or not best["canary-guesses"]:
            best = {"eps-emp": bound, "canary-guesses": 2 * k, "canary-correct": correct}
    auc = roc_auc(included.astype(int), scores) if 0 < included.sum() < m else math.nan
    return {**best, "canary-auc": auc, "canaries": m, "canaries-in": int(included.sum()),
            "audit-confidence": confidence}
