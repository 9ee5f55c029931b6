"""Properties DP-SGD must have, checked on a tiny T5 + LoRA with the real Opacus engine and accountants."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from shared.config import FedShopConfig
from shared.dptrain import STATUS_DECLINED, STATUS_TRAINED, PrivacyState, schedule, train_round
from shared.modeling import WIDTH_GROUPS, encode, per_sample_loss, width_groups
from shared.privacy import epsilon_of
from tests.helpers import (
    assert_opacus_per_sample_gradients_exact,
    first,
    lora_parameters,
    nonzero_lora,
    tiny_lora_model,
)

CONFIG = FedShopConfig(model_size="tiny", num_merchants=1, shoppers_per_merchant=30, public_shoppers=10,
                       num_items=40, num_categories=4, history_length=6, batch_size=16, num_rounds=2,
                       lora_targets="q,v,o,wi", target_epsilon=4.0)
# 7 training rows (idx) of 3 sampled shoppers (owner: 2, 4 and 1 rows), as a grouped DP step sees them
SHOPPER_ROWS = (torch.tensor([0, 5, 1, 2, 9, 7, 3]), torch.tensor([0, 1, 0, 1, 2, 1, 1]))


@pytest.fixture(scope="module")
def setup():
    model, tokenizer, merchant = tiny_lora_model(CONFIG)
    return model, tokenizer, merchant, encode(merchant.train, tokenizer)


def test_hooks_per_sample_gradients_equal_single_example_gradients(setup):
    model, _, _, data = setup
    assert_opacus_per_sample_gradients_exact(model, first(data, 4))


def test_every_per_sample_gradient_is_clipped_to_the_norm():
    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=1)
    tokenizer_batch = encode(merchant.train[:8], tokenizer)
    clip = 1e-3  # far below the raw per-sample norms, so every sample is clipped
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = DPOptimizer(torch.optim.SGD(trainable, lr=0.0), noise_multiplier=0.0, max_grad_norm=clip,
                            expected_batch_size=8)
    per_sample_loss(wrapped, tokenizer_batch.input_ids, tokenizer_batch.attention_mask,
                    tokenizer_batch.target_ids).mean().backward()
    raw = [p.grad_sample.clone() for p in trainable]
    raw_norms = torch.stack([g.reshape(8, -1).norm(dim=1) for g in raw], dim=1).norm(dim=1)
    optimizer.clip_and_accumulate()
    factors = (clip / (raw_norms + 1e-6)).clamp(max=1.0)
    clipped_norms = raw_norms * factors
    assert (raw_norms > clip).all()
    assert (clipped_norms <= clip * (1 + 1e-5)).all()
    for p, g in zip(trainable, raw):
        assert torch.allclose(p.summed_grad, torch.einsum("i,i...", factors, g), atol=1e-9)
    total = torch.cat([p.summed_grad.reshape(-1) for p in trainable]).norm()
    assert total <= 8 * clip * (1 + 1e-5)  # the sum of 8 clipped gradients


def test_epsilon_composed_over_rounds_equals_one_accountant_over_all_steps(setup):
    model, _, _, data = setup
    data = first(data, 160)
    state = PrivacyState()
    first_round = train_round(model, data, CONFIG, state, seed=1)
    second_round = train_round(model, data, CONFIG, state, seed=2)
    sample_rate, steps = schedule(len(data), CONFIG)
    reference = RDPAccountant()
    for _ in range(2 * steps):
        reference.step(noise_multiplier=state.noise_multiplier, sample_rate=sample_rate)
    assert first_round.status == second_round.status == STATUS_TRAINED
    assert sum(s for _, _, s in state.history) == 2 * steps
    assert math.isclose(second_round.epsilon, reference.get_epsilon(CONFIG.target_delta), rel_tol=1e-9)
    assert first_round.epsilon < second_round.epsilon <= CONFIG.target_epsilon


def test_a_round_past_the_budget_is_declined_and_nothing_trains(setup):
    model, _, _, data = setup
    config = CONFIG.replace(num_rounds=1)
    state = PrivacyState()
    trained = train_round(model, data, config, state, seed=3)
    before = lora_parameters(model)
    history = list(state.history)
    declined = train_round(model, data, config, state, seed=4)
    assert trained.status == STATUS_TRAINED and declined.status == STATUS_DECLINED
    assert state.history == history and declined.epsilon == trained.epsilon <= config.target_epsilon
    assert all(torch.equal(before[n], p) for n, p in lora_parameters(model).items())
    # the step loop is timed when it runs (DP-SGD here, plain training below) and never for a declined round
    plain = train_round(model, first(data, 16), config.replace(dp=False), PrivacyState(), seed=5)
    assert trained.train_seconds > 0 and plain.train_seconds > 0 and declined.train_seconds == 0.0


def test_empty_poisson_batches_still_take_a_noised_counted_step(setup):
    model, _, _, data = setup
    tiny = first(data, 3)
    config = CONFIG.replace(batch_size=1, local_epochs=20, num_rounds=1, target_epsilon=50.0)
    state = PrivacyState()
    before = lora_parameters(model)
    result = train_round(model, tiny, config, state, seed=5)
    # q = 1/3, 60 steps: P(no empty batch) = (1 - (2/3)^3)^60 < 1e-9, so empty batches did occur
    assert result.status == STATUS_TRAINED and result.steps == 60
    assert sum(s for _, _, s in state.history) == 60
    assert math.isclose(result.epsilon, epsilon_of(state.history, config.target_delta, "rdp"))
    assert any(not torch.equal(before[n], p) for n, p in lora_parameters(model).items())


def test_a_shoppers_examples_give_one_row_their_mean_gradient(setup):
    # Prepare: 7 rows from 3 shoppers (2, 4 and 1 examples), LoRA B non-zero so every tensor has a gradient
    from shared.dptrain import shopper_backward

    model, _, _, data = setup
    nonzero_lora(model)
    idx, owner = SHOPPER_ROWS
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    assert len(width_groups(data.attention_mask[idx])) >= 2  # the step runs in several passes, each trimmed
    # Execute
    shopper_backward(wrapped, trainable, data, idx, owner)
    grouped = {id(p): p.grad_sample.clone() for p in trainable}
    for p in trainable:
        p.grad_sample, p.grad = None, None
    wrapped.disable_hooks()
    # Assert: row g equals the mean of single-example gradients of shopper g's rows
    for g in range(3):
        rows = idx[owner == g]
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, data.input_ids[rows], data.attention_mask[rows], data.target_ids[rows]).mean().backward()
        for p in trainable:
            assert grouped[id(p)].shape[0] == 3
            assert torch.allclose(grouped[id(p)][g], p.grad, atol=1e-6, rtol=1e-4)
    wrapped.enable_hooks()
    wrapped._close()
    model.zero_grad(set_to_none=True)


def test_width_groups_hold_every_row_once_and_cut_only_padding():
    # Prepare: 12 right-padded rows of three lengths (as three tasks' questions), then the same rows left-padded
    lengths = [10] * 5 + [16] * 4 + [20] * 3
    right = torch.zeros((12, 24), dtype=torch.long)
    for row, length in enumerate(lengths):
        right[row, :length] = 1
    # Execute
    groups = width_groups(right)
    # Assert: a partition of the rows, no attended position cut, fewer padded tokens than one pass, at most
    # WIDTH_GROUPS passes
    assert sorted(torch.cat([rows for rows, _ in groups]).tolist()) == list(range(12))
    assert all(int(right[rows, width:].sum()) == 0 for rows, width in groups)
    assert 1 < len(groups) <= WIDTH_GROUPS
    assert sum(len(rows) * width for rows, width in groups) < 12 * 20
    assert [(rows.tolist(), width) for rows, width in width_groups(right[:5])] == [(list(range(5)), 10)]  # one pass
    left = right.flip(1)
    assert [width for _, width in width_groups(left)] == [24]  # a left-padded batch is never cut short
    assert width_groups(right[:0]) == []


def test_several_examples_per_shopper_keep_the_shopper_epsilon(setup):
    # Prepare: the shopper unit, one example a step against four; same records, rate and steps
    model, _, merchant, data = setup
    owners = [e.user_id for e in merchant.train]
    one = CONFIG.replace(privacy_unit="shopper", num_rounds=1)
    four = one.replace(examples_per_shopper=4)
    before = lora_parameters(model)
    # Execute
    single = train_round(model, data, one, PrivacyState(), seed=6, owners=owners)
    several = train_round(model, data, four, PrivacyState(), seed=6, owners=owners)
    # Assert: identical accounting (the same noise multiplier, rate, steps and epsilon), and the model trained
    assert (single.noise_multiplier, single.sample_rate, single.steps) == (
        several.noise_multiplier, several.sample_rate, several.steps)
    assert math.isclose(single.epsilon, several.epsilon) and several.epsilon <= one.target_epsilon
    assert any(not torch.equal(before[n], p) for n, p in lora_parameters(model).items())


def test_hooks_per_sample_gradients_are_exact_with_lora_on_the_output_layer():
    # lm_head (tied to the input embedding) as a LoRA target, B non-zero: Opacus hooks must still be exact
    model, tokenizer, merchant = tiny_lora_model(CONFIG.replace(lora_targets="q,v,lm_head"), seed=2)
    nonzero_lora(model)
    assert any("lm_head.lora_B" in n for n, p in model.named_parameters() if p.requires_grad)
    assert_opacus_per_sample_gradients_exact(model, first(encode(merchant.train[:8], tokenizer), 4))


def test_only_the_items_output_rows_move_under_dp():
    # Prepare: LoRA on the output layer, the shopper unit, the items' vocabulary rows
    from shared.model import item_rows

    config = CONFIG.replace(lora_targets="q,v,lm_head", privacy_unit="shopper", examples_per_shopper=4,
                            num_rounds=1, learning_rate=0.05)
    model, tokenizer, merchant = tiny_lora_model(config, seed=4)
    rows = item_rows(tokenizer, merchant.facts)
    # Execute
    result = train_round(model, encode(merchant.train, tokenizer), config, PrivacyState(), seed=7,
                         owners=[e.user_id for e in merchant.train], output_rows=rows)
    # Assert: every non-item row (yes/no, categories, bands...) is still exactly zero; the item rows moved
    b = next(p for n, p in model.named_parameters() if "lm_head.lora_B" in n).detach()
    others = torch.ones(b.shape[0], dtype=torch.bool)
    others[rows] = False
    assert result.status == STATUS_TRAINED and others.any() and len(rows) == len(merchant.facts.item_ids)
    assert torch.count_nonzero(b[others]) == 0
    assert torch.count_nonzero(b[rows]) > 0


def test_clipping_sees_only_the_rows_that_can_move():
    # Prepare: per-sample gradients of an lm_head + embed LoRA, every row non-zero before the mask
    from shared.lora_grad import LoraGradSampleModule
    from shared.model import item_rows, mask_grad_samples

    model, tokenizer, merchant = tiny_lora_model(CONFIG.replace(lora_targets="lm_head,embed"), seed=6)
    nonzero_lora(model, "lora_B", "lora_embedding_A")
    rows = item_rows(tokenizer, merchant.facts)
    batch = first(encode(merchant.train[:8], tokenizer), 4)
    private = LoraGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    per_sample_loss(private, batch.input_ids, batch.attention_mask, batch.target_ids).sum().backward()
    samples = {n: p.grad_sample.clone() for n, p in model.named_parameters()
               if getattr(p, "grad_sample", None) is not None}
    # Execute
    mask_grad_samples(model, rows)
    # Assert: the output rows and input columns of every non-item token are zero in every sample; items' untouched
    checked = 0
    for name, parameter in model.named_parameters():
        dim = 1 if ("lm_head" in name and "lora_B" in name) else 2 if "lora_embedding_A" in name else None
        if dim is None or name not in samples:
            continue
        others = torch.ones(parameter.grad_sample.shape[dim], dtype=torch.bool)
        others[rows] = False
        before, after = samples[name], parameter.grad_sample
        assert torch.count_nonzero(before.index_select(dim, torch.nonzero(others).flatten())) > 0
        assert torch.count_nonzero(after.index_select(dim, torch.nonzero(others).flatten())) == 0
        assert torch.equal(after.index_select(dim, torch.tensor(rows)), before.index_select(dim, torch.tensor(rows)))
        checked += 1
    private._close()
    assert checked == 2


def test_merchants_train_on_the_train_tasks_only():
    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=1)
    everything = merchant.teaching(CONFIG)
    next_only = merchant.teaching(CONFIG.replace(train_tasks="next-item"))
    assert {e.task for e in everything} == set(CONFIG.train_task_list) == {"intent", "next-item", "churn"}
    assert next_only == [e for e in merchant.train if e.task == "next-item"] and next_only


def test_per_sample_gradients_are_exact_with_lora_on_the_input_embedding():
    # PEFT keeps a LoRA embedding's tensors in ParameterDicts, which Opacus alone never hooks: shared.lora_grad does.
    # A and B both non-zero and both trainable (fedavg), beside the linear layers' LoRA
    model, tokenizer, merchant = tiny_lora_model(CONFIG.replace(lora_targets="q,v,lm_head,embed"), seed=3)
    nonzero_lora(model, "lora_B", "lora_embedding_A")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"lora_embedding_A", "lora_embedding_B"} <= {n.split(".")[-2] for n in trainable}
    assert_opacus_per_sample_gradients_exact(model, first(encode(merchant.train[:8], tokenizer), 4))


def test_ffa_trains_only_the_items_input_coordinates_of_an_embedding_lora():
    # Prepare: ffa freezes the embedding's random factor (lora_embedding_B) and trains its per-token one (A)
    from shared.model import item_rows

    config = CONFIG.replace(lora_targets="embed", aggregation="ffa", privacy_unit="shopper", examples_per_shopper=4,
                            num_rounds=1, learning_rate=0.05)
    model, tokenizer, merchant = tiny_lora_model(config, seed=5)
    b_before = next(p for n, p in model.named_parameters() if "lora_embedding_B" in n).detach().clone()
    rows = item_rows(tokenizer, merchant.facts)
    # Execute
    result = train_round(model, encode(merchant.train, tokenizer), config, PrivacyState(), seed=8,
                         owners=[e.user_id for e in merchant.train], output_rows=rows)
    # Assert: B is bit-identical, A's non-item columns are exactly zero and its item columns moved
    named = dict(model.named_parameters())
    a = next(p for n, p in named.items() if "lora_embedding_A" in n).detach()
    b = next(p for n, p in named.items() if "lora_embedding_B" in n).detach()
    others = torch.ones(a.shape[1], dtype=torch.bool)
    others[rows] = False
    assert result.status == STATUS_TRAINED and result.epsilon <= config.target_epsilon
    assert torch.equal(b, b_before)
    assert torch.count_nonzero(a[:, others]) == 0 and torch.count_nonzero(a[:, rows]) > 0


def test_a_bf16_forward_gives_float32_shopper_gradients_close_to_the_fp32_ones(setup):
    # Prepare: the same 7 rows of 3 shoppers, LoRA B non-zero, once at fp32 and once with the bf16 forward
    from shared.dptrain import shopper_backward
    from shared.lora_grad import LoraGradSampleModule

    model, _, _, data = setup
    nonzero_lora(model)
    idx, owner = SHOPPER_ROWS
    trainable = [p for p in model.parameters() if p.requires_grad]
    rows = {}
    for precision in ("fp32", "bf16"):
        wrapped = LoraGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
        # Execute
        shopper_backward(wrapped, trainable, data, idx, owner, precision)
        rows[precision] = [p.grad_sample.clone() for p in trainable]
        for p in trainable:
            p.grad_sample, p.grad = None, None
        wrapped._close()
    # Assert: Opacus clips and noises float32 rows (bf16 norms would let a clipped row exceed C by ~0.4 %), and
    # each shopper's whole gradient (what clipping sees) points where the fp32 one does: bfloat16's 8-bit mantissa
    # through the layers gave 3-7 % relative error per tensor, cosine >= 0.997 (a tensor whose exact gradient is 0,
    # the decoder's one-position self-attention q, gets bf16 rounding noise of norm 1e-6)
    assert all(b.dtype == torch.float32 and b.shape == a.shape for a, b in zip(rows["fp32"], rows["bf16"]))
    fp32, bf16 = (torch.cat([g.reshape(3, -1) for g in rows[p]], dim=1) for p in ("fp32", "bf16"))
    assert ((bf16 - fp32).norm(dim=1) <= 0.1 * fp32.norm(dim=1)).all()
    assert (torch.nn.functional.cosine_similarity(bf16, fp32, dim=1) >= 0.99).all()
    assert not all(torch.equal(a, b) for a, b in zip(rows["fp32"], rows["bf16"], strict=True))  # bf16 really ran
    model.zero_grad(set_to_none=True)


def test_evaluation_in_bf16_keeps_the_fp32_metrics():
    from shared.modeling import evaluate

    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=2)
    kept = {}
    for precision in ("fp32", "bf16"):
        kept[precision] = evaluate(model, tokenizer, merchant.test, merchant.facts, precision=precision,
                                   tasks=("intent", "next-item"))
    assert abs(kept["bf16"]["intent-auc"] - kept["fp32"]["intent-auc"]) <= 0.03
    assert abs(kept["bf16"]["next-mrr"] - kept["fp32"]["next-mrr"]) <= 0.03
    assert kept["bf16"]["intent-logloss"] != kept["fp32"]["intent-logloss"]  # the bf16 forward really ran


def test_intent_read_from_the_price_curve_equals_intent_s_own_pass():
    # Prepare: a tiny model whose LoRA moves the answers
    from shared.modeling import binary_probability, evaluate_with_outputs, own_level, price_curves

    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=3)
    nonzero_lora(model)
    intent = [e for e in merchant.test if e.task == "intent"]
    # Execute: intent alone (its own pass) and intent with the price curve (read from the curve's rows)
    _, alone = evaluate_with_outputs(model, tokenizer, merchant.test, merchant.facts, tasks=("intent",))
    _, both = evaluate_with_outputs(model, tokenizer, merchant.test, merchant.facts, tasks=("intent", "price"))
    # Assert: the same probabilities to the bit, read at each question's own level; a source without a level token
    # is scored by its own pass
    assert len(intent) > 10 and np.array_equal(alone.probabilities["intent"], both.probabilities["intent"])
    assert np.array_equal(both.probabilities["intent"],
                          binary_probability(model, tokenizer, [e.source for e in intent], 256))
    curve = price_curves(model, tokenizer, intent, 256)
    assert own_level(curve[:1], [dataclasses.replace(intent[0], source=intent[0].source + " x")]) is None


def test_bf16_train_runs_the_training_steps_in_bf16_and_every_evaluation_in_fp32():
    # Prepare: one DP round from the same start and seed at each precision, then the reference runs' evaluation
    from server.references import _evaluate
    from shared.model import adapter_state, load_adapter_state

    config = CONFIG.replace(privacy_unit="shopper", examples_per_shopper=4, num_rounds=1, learning_rate=0.05)
    assert [(config.replace(precision=p).train_precision, config.replace(precision=p).eval_precision)
            for p in ("fp32", "bf16", "bf16-train")] == [("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")]
    model, tokenizer, merchant = tiny_lora_model(config, seed=5)
    start, data, owners = adapter_state(model), encode(merchant.train, tokenizer), [e.user_id for e in merchant.train]
    trained, metrics = {}, {}
    for precision in ("fp32", "bf16-train", "bf16"):
        run = config.replace(precision=precision)
        load_adapter_state(model, start)
        # Execute
        train_round(model, data, run, PrivacyState(), seed=8, owners=owners)
        trained[precision] = torch.cat([t.flatten() for t in adapter_state(model).values()])
        load_adapter_state(model, start)
        metrics[precision] = _evaluate(model, tokenizer, merchant, run, tasks=["intent", "next-item"])[0]
    # Assert: bf16-train trains exactly as bf16 does (same forward, same noise) and not as fp32; it evaluates exactly
    # as fp32 does, and bf16 does not
    assert torch.equal(trained["bf16-train"], trained["bf16"])
    assert not torch.equal(trained["bf16-train"], trained["fp32"])
    assert (trained["bf16-train"] - trained["fp32"]).norm() <= 0.1 * (trained["fp32"] - torch.cat(
        [t.flatten() for t in start.values()])).norm()
    assert metrics["bf16-train"] == metrics["fp32"]
    assert metrics["bf16"]["intent-logloss"] != metrics["fp32"]["intent-logloss"]


def test_per_sample_gradients_are_exact_on_the_t5_small_shape_with_every_lora_target():
    # Google's t5-small shape (d_model 512, 6 + 6 layers): every target fedshop offers, A and B non-zero. In float64:
    # through 12 layers float32 rounding alone (which differs with the thread count) moves some entries by more than
    # the 1e-4 relative tolerance, while a wrong per-sample formula moves them by percents
    config = CONFIG.replace(model_size="t5-small", lora_targets="q,k,v,o,wi,wo,lm_head,embed")
    model, tokenizer, merchant = tiny_lora_model(config, seed=4)
    model.double()
    nonzero_lora(model, "lora_B", "lora_embedding_A")
    assert len(model.base_model.model.encoder.block) == 6 and model.base_model.model.config.d_model == 512
    assert_opacus_per_sample_gradients_exact(model, first(encode(merchant.train[:8], tokenizer), 3))


def test_the_write_ahead_state_charges_exactly_the_round_train_round_then_takes(setup):
    from shared.dptrain import charged_ahead
    from shared.privacy import PrivacyBudget

    model, _, _, data = setup
    data = first(data, 160)
    config = CONFIG.replace(num_rounds=1)
    state = PrivacyState()
    # Execute: the state a merchant saves before training, then the round itself, then one round too many
    ahead = charged_ahead(state, len(data), None, config)
    trained = train_round(model, data, config, state, seed=7)
    beyond = charged_ahead(state, len(data), None, config)
    # Assert: the write-ahead state spends what the finished round reports; a round to be declined charges nothing,
    # and so does a round without DP-SGD
    assert ahead is not None and ahead.noise_multiplier == state.noise_multiplier
    assert sum(s for _, _, s in ahead.history) == sum(s for _, _, s in state.history) == trained.steps
    assert math.isclose(PrivacyBudget.for_merchants(config).spent(ahead.history), trained.epsilon, rel_tol=1e-12)
    assert beyond is None and charged_ahead(PrivacyState(), len(data), None, config.replace(dp=False)) is None


def test_train_task_weights_set_each_task_s_share_of_a_shopper_s_gradient():
    """A shopper's rows weigh task weight / the sum over its rows (summing to 1 per shopper); equal weights give the
    plain mean; a malformed entry is refused naming the key."""
    from shared.config import ConfigError
    from shared.dptrain import per_shopper_weight, row_task_weights
    from shared.modeling import Encoded

    owner = torch.tensor([0, 0, 0, 1, 1])
    tasks = ("intent", "churn", "next-item", "churn", "churn")
    data = Encoded(torch.zeros((5, 2), dtype=torch.long), torch.ones((5, 2), dtype=torch.long),
                   torch.zeros((5, 1), dtype=torch.long), tasks)
    weights = row_task_weights(data, FedShopConfig(train_task_weights="churn:3").train_weights)
    got = per_shopper_weight(owner, weights)
    assert torch.allclose(got, torch.tensor([0.2, 0.6, 0.2, 0.5, 0.5]))
    assert row_task_weights(data, FedShopConfig().train_weights) is None
    assert torch.allclose(per_shopper_weight(owner), torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.5, 0.5]))
    with pytest.raises(ConfigError, match="train-task-weights.*'churn:0'"):
        FedShopConfig(train_task_weights="churn:0")
