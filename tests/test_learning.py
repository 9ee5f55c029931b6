"""Guard against "DP-LoRA trains but learns nothing": at a large epsilon, DP-SGD on the LoRA tensors must learn
nearly as well as non-private training, and both must be clearly better than chance.

The base is a randomly initialised tiny T5 (not pretrained), so every bit of AUC comes from the LoRA training.
"""

from shared.config import FedShopConfig
from shared.data import merchant_data, vocabulary
from shared.dptrain import PrivacyState, train_round
from shared.model import add_lora, build_base
from shared.modeling import encode, evaluate
from shared.synthetic import generate
from shared.tokenizer import build_tokenizer

CONFIG = FedShopConfig(model_size="tiny", num_merchants=1, shoppers_per_merchant=200, public_shoppers=10,
                       num_items=60, num_categories=6, history_length=6, tasks="intent", batch_size=32,
                       num_rounds=1, local_epochs=4, lora_targets="q,k,v,o,wi,wo", learning_rate=3e-3,
                       target_epsilon=50.0, target_delta=1e-5)


def test_dp_lora_at_large_epsilon_learns_nearly_as_well_as_non_private():
    merchant = merchant_data(CONFIG, "m0", generate(CONFIG))
    tokenizer = build_tokenizer(*vocabulary(merchant.facts))
    train = encode(merchant.train, tokenizer)
    held_out = merchant.valid + merchant.test
    auc = {}
    for dp in (False, True):
        model = add_lora(build_base("tiny", tokenizer, seed=0), CONFIG, seed=0)
        untrained = evaluate(model, tokenizer, held_out, merchant.facts)["intent-auc"]
        result = train_round(model, train, CONFIG.replace(dp=dp), PrivacyState(), seed=1)
        auc[dp] = evaluate(model, tokenizer, held_out, merchant.facts)["intent-auc"]
        if dp:
            assert result.epsilon <= CONFIG.target_epsilon and result.noise_multiplier > 0
    assert abs(untrained - 0.5) < 0.1  # the starting point knows nothing
    assert auc[False] > 0.6 and auc[True] > 0.6  # both clearly above chance
    # DP at a large epsilon is nearly as good. The gap moves with the random base: over seeds 0-2 it was 0.034,
    # 0.080, 0.034 with the vocabulary before churn's number tokens and 0.058, 0.054 (seeds 0, 1) with them; a DP
    # step that learnt nothing would leave it near 0.25
    assert auc[True] >= auc[False] - 0.09
