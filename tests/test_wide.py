"""The wide part (shared/wide.py): which tokens it reads, that it starts as the base (pretrained with the T5, or zero),
that DP-SGD's per-sample gradients of its weights are exact, that it trains, and that it travels and is saved with
the adapter."""

import math

import pytest
import torch

from shared.config import FedShopConfig
from shared.dptrain import PrivacyState, train_round
from shared.model import adapter_state, item_rows, load_adapter_state, load_saved_adapter, read_adapter, save_adapter
from shared.modeling import binary_probability, encode, first_step_logits
from shared.wide import NEXT_SCALE, WIDE_FILE, WIDE_KEY, at_base, count_links, leaving_out, set_wide_weights, wide_of
from tests.helpers import assert_opacus_per_sample_gradients_exact, first, nonzero_lora, tiny_lora_model

CONFIG = FedShopConfig(model_size="tiny", num_merchants=1, shoppers_per_merchant=30, public_shoppers=10,
                       num_items=40, num_categories=4, history_length=6, batch_size=16, num_rounds=2,
                       lora_targets="lm_head", lora_r=4, wide=True, target_epsilon=8.0)


@pytest.fixture(scope="module")
def setup():
    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=1)
    return model, tokenizer, merchant


def _tokens(tokenizer, head, source: str) -> list[str]:
    ids = tokenizer([source], return_tensors="pt")["input_ids"]
    rows, mask = head.features(ids)
    return tokenizer.convert_ids_to_tokens(ids[0][mask[0]].tolist())


def test_it_reads_the_candidate_for_intent_the_bands_for_churn_and_nothing_for_next_item(setup):
    model, tokenizer, merchant = setup
    head = wide_of(model)
    by_task = {}
    for example in merchant.train:
        by_task.setdefault(example.task, example.source)
    intent = by_task["intent"].split()
    assert _tokens(tokenizer, head, by_task["intent"]) == intent[intent.index("cand") + 1:]
    churn = _tokens(tokenizer, head, by_task["churn"])
    assert churn == by_task["churn"].split()[-9:]  # sessions, views, gap, days, bought; the first four as numbers
    assert [t[:2] for t in churn[5:]] == ["ls", "ln", "lg", "ld"]
    assert _tokens(tokenizer, head, by_task["next-item"]) == []


def test_a_churn_number_reads_its_feature_s_one_weight_times_its_value(setup):
    """ls<k> .. ld<k> (log2(1 + x) = k / 4) add DENSE_SCALE * w[feature] * k / 4 / NUMBER_UNIT to the yes logit,
    w the row of the feature's level-0 token; the band tokens keep their own rows."""
    from shared.tasks import number_token
    from shared.wide import DENSE_SCALE, NUMBER_UNIT

    model, tokenizer, _ = setup
    head = model.wide
    sources = ["churn: s2 n3 g1 d2 b0 " + " ".join(number_token(p, x) for p, x in zip(("ls", "ln", "lg", "ld"), xs))
               for xs in ((1, 2, 0.0, 0.4), (7, 40, 3.0, 200.0))]
    ids = tokenizer(sources, return_tensors="pt", padding=True)["input_ids"]
    weights = {"ls": 0.3, "ln": -0.2, "lg": 0.5, "ld": -1.1}
    with torch.no_grad():
        head.table.weight.zero_()
        for prefix, w in weights.items():
            head.table.weight[head.vocab_size + tokenizer.convert_tokens_to_ids(f"{prefix}0")] = w
        yes_term, _ = head(ids)
        head.table.weight.zero_()
    for row, source in enumerate(sources):
        numbers = source.split()[-4:]
        expected = sum(DENSE_SCALE * weights[t[:2]] * int(t[2:]) / 4 / NUMBER_UNIT for t in numbers)
        assert float(yes_term[row]) == pytest.approx(expected, abs=1e-5)
    assert sources[1].split()[-4:] == ["ls12", "ln21", "lg8", "ld31"]  # round(4 log2(1 + x))
    # an export pretrained before the number tokens is asked with the bands alone (server/predict.py)
    from shared.tasks import churn_source
    assert churn_source("h", 7, 40, 3.0, 200.0, False, numbers=False) == "churn: h s7 n20 g3 d6 b0"
    assert churn_source("h", 7, 40, 3.0, 200.0, False).split()[-4:] == sources[1].split()[-4:]


def test_intent_and_churn_read_separate_weights(setup):
    model, tokenizer, _ = setup
    head = wide_of(model)
    ids = tokenizer(["intent: cand b0", "churn: b0"], return_tensors="pt", padding=True)["input_ids"]
    rows, mask = head.features(ids)
    intent_row, churn_row = rows[0][mask[0]].tolist(), rows[1][mask[1]].tolist()
    assert len(intent_row) == len(churn_row) == 1 and intent_row[0] != churn_row[0]


def test_a_new_wide_part_leaves_the_base_s_answers_unchanged(setup):
    model, tokenizer, merchant = setup
    data = first(encode(merchant.train[:12], tokenizer), 12)
    with torch.no_grad():
        with_wide = first_step_logits(model, data.input_ids, data.attention_mask)
        head = model.wide
        del model.wide
        try:
            without = first_step_logits(model, data.input_ids, data.attention_mask)
        finally:
            model.wide = head
    assert torch.equal(with_wide, without)


def test_at_base_puts_the_base_s_wide_weights_back_inside_the_block_and_restores_the_trained_ones(setup):
    # the audit's "base alone" (PEFT's disable_adapter) must hold the wide part at the base's weights too: its canaries
    # are next-item examples, which the wide part scores
    model, tokenizer, merchant = setup
    data = first(encode(merchant.train[:12], tokenizer), 12)
    head = model.wide
    with torch.no_grad():
        head.start.normal_(0.0, 0.3)
        head.table.weight.copy_(head.start)
        base = first_step_logits(model, data.input_ids, data.attention_mask)
        head.table.weight.normal_(0.0, 0.3)
        trained = first_step_logits(model, data.input_ids, data.attention_mask)
        assert not torch.equal(base, trained)
        with at_base(model):
            assert torch.equal(first_step_logits(model, data.input_ids, data.attention_mask), base)
        assert torch.equal(first_step_logits(model, data.input_ids, data.attention_mask), trained)
        head.start.zero_()
        head.table.weight.zero_()


def test_per_sample_gradients_of_the_wide_weights_are_exact(setup):
    model, tokenizer, merchant = setup
    nonzero_lora(model)
    with torch.no_grad():
        model.wide.table.weight.normal_(0.0, 0.3)
    examples = [e for e in merchant.train if e.task != "next-item"][:3] + merchant.train[:3]
    assert_opacus_per_sample_gradients_exact(model, encode(examples, tokenizer))
    with torch.no_grad():
        model.wide.table.weight.zero_()


def test_dp_sgd_trains_the_wide_weights_and_they_never_reach_a_next_item_input():
    """Intent and churn trained: their rows move; the next-item biases (not trained) stay exactly zero."""
    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=2)
    intent = [e.source for e in merchant.valid if e.task == "intent"][:20]
    before = binary_probability(model, tokenizer, intent, batch_size=32)
    result = train_round(model, encode(merchant.train, tokenizer), CONFIG.replace(train_tasks="intent,churn"),
                         PrivacyState(), seed=0, owners=[e.user_id for e in merchant.train])
    assert result.status == "trained" and math.isfinite(result.epsilon)
    assert model.wide.table.weight.abs().sum() > 0
    assert not torch.allclose(torch.as_tensor(before), torch.as_tensor(binary_probability(model, tokenizer, intent,
                                                                                          batch_size=32)))
    next_ids = encode([e for e in merchant.valid if e.task == "next-item"][:8], tokenizer).input_ids
    yes_term, bias = model.wide(next_ids)
    assert torch.equal(yes_term, torch.zeros(len(next_ids))) and not bias.any()
    assert not model.wide.table.weight[2 * model.wide.vocab_size:].any()


def test_next_item_training_moves_only_the_items_and_categories_rows_and_they_reach_only_next_item_answers():
    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=3)
    rows = item_rows(tokenizer, merchant.facts)
    data = encode(merchant.train, tokenizer)
    result = train_round(model, data, CONFIG.replace(train_tasks="next-item"), PrivacyState(), seed=0,
                         owners=[e.user_id for e in merchant.train], output_rows=rows)
    assert result.status == "trained"
    head = model.wide
    vocab, table = head.vocab_size, head.table.weight.detach()[:, 0]
    assert not table[:2 * vocab].any()  # intent and churn not trained: their rows held at zero despite the noise
    biases, stay = table[2 * vocab:3 * vocab], table[3 * vocab:4 * vocab]
    assert not table[4 * vocab:].any()  # a base without public links: its link weights are held at zero
    categories = tokenizer.convert_tokens_to_ids(sorted(set(merchant.facts.category)))
    for moved, live in ((biases, rows), (stay, categories)):
        others = torch.ones(vocab, dtype=torch.bool)
        others[live] = False
        assert moved[live].abs().min() > 0 and not moved[others].any()
    examples = merchant.valid[:24]
    valid = encode(examples, tokenizer)
    yes_term, terms = head(valid.input_ids)
    is_next = torch.tensor([e.task == "next-item" for e in examples])
    assert 0 < is_next.sum() < len(is_next) and not terms[~is_next].any() and not yes_term.any()
    for example, row in zip(examples, terms, strict=True):
        if example.task != "next-item":
            continue
        # the category written after "last" is the most recent item's: items of that category get its stay weight
        words = example.source.split()
        last = tokenizer.convert_tokens_to_ids(words[words.index("last") + 2])
        same = torch.tensor([c == words[words.index("last") + 2] for c in merchant.facts.category])
        items = torch.tensor(tokenizer.convert_tokens_to_ids(list(merchant.facts.item_ids)))
        expected = NEXT_SCALE * (biases[items] + same * stay[last])
        assert torch.allclose(row[items], expected)


def test_a_wide_part_saved_without_next_item_biases_loads_with_them_zero(setup):
    model, _, _ = setup
    head = model.wide
    old = torch.randn(2 * head.vocab_size, 1)  # intent and churn rows only
    set_wide_weights(head, old)
    vocab = head.vocab_size
    assert torch.equal(head.table.weight[:2 * vocab], old) and not head.table.weight[2 * vocab:].any()
    with pytest.raises(ValueError, match="shape"):
        set_wide_weights(head, torch.zeros(head.vocab_size, 1))
    with torch.no_grad():
        head.table.weight.zero_()


def test_the_wide_weights_travel_in_the_adapter_state_and_are_saved_beside_it(setup, tmp_path):
    model, tokenizer, merchant = setup
    with torch.no_grad():
        model.wide.table.weight.normal_(0.0, 0.3)
    state = adapter_state(model)
    assert WIDE_KEY in state and torch.equal(state[WIDE_KEY], model.wide.table.weight)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / WIDE_FILE).is_file()
    read = read_adapter(tmp_path)
    assert set(read) == set(state) and torch.equal(read[WIDE_KEY], state[WIDE_KEY])
    # a model built the same way loads it back exactly
    other, _, _ = tiny_lora_model(CONFIG, seed=1)
    load_adapter_state(other, read)
    assert torch.equal(other.wide.table.weight, model.wide.table.weight)
    # a model without a wide part refuses the state, with the key named
    plain, _, _ = tiny_lora_model(CONFIG.replace(wide=False), seed=1)
    with pytest.raises(ValueError, match=WIDE_KEY):
        load_adapter_state(plain, read)
    # plain PEFT's load of the same base plus the saved wide part (load_saved_adapter) answers as fedshop's model
    from shared.model import build_base

    loaded = load_saved_adapter(build_base(CONFIG.model_size, tokenizer, seed=1), tokenizer, tmp_path / "adapter")
    sources = [e.source for e in merchant.valid if e.task in ("intent", "churn")][:10]
    assert torch.allclose(torch.as_tensor(binary_probability(loaded.eval(), tokenizer, sources, batch_size=16)),
                          torch.as_tensor(binary_probability(model.eval(), tokenizer, sources, batch_size=16)))
    with torch.no_grad():
        model.wide.table.weight.zero_()


def test_pretraining_with_the_wide_part_saves_it_beside_the_t5_and_round_0_starts_from_it(tmp_path):
    from shared.data import check_base_matches, merchant_data
    from shared.errors import UserError
    from shared.model import add_lora, load_base
    from shared.modeling import evaluate
    from shared.pretrain import pretrain
    from shared.synthetic import PUBLIC_MERCHANT

    config = CONFIG.replace(base_dir=str(tmp_path / "base"), public_shoppers=60, pretrain_epochs=2)
    pretrain(config)
    base, tokenizer, meta = load_base(config.base_dir)
    assert meta["wide"] is True and (tmp_path / "base" / WIDE_FILE).is_file()
    assert not any("wide" in name for name, _ in base.named_parameters())  # the T5's files hold only the T5
    public = merchant_data(config, PUBLIC_MERCHANT)
    model = add_lora(base, config, seed=config.seed, tokenizer=tokenizer, facts=public.facts)
    table, vocab = model.wide.table.weight.detach()[:, 0], model.wide.vocab_size
    assert torch.equal(model.wide.start, model.wide.table.weight)
    for block in range(4):  # intent, churn, next-item biases, stay weights: each learnt something
        assert table[block * vocab:(block + 1) * vocab].abs().max() > 0.01
    # round 0 is the model pretraining evaluated: the same public valid figures
    again = evaluate(model.eval(), tokenizer, public.valid, public.facts, tasks=config.task_list)
    for key in ("intent-auc", "churn-auc", "next-hr@10"):
        assert again[key] == pytest.approx(meta["public-valid-metrics"][key], abs=1e-6)
    # its T5 alone is not the model: a config without the wide part is refused, naming the key
    with pytest.raises(UserError, match="wide = true"):
        check_base_matches(meta, config.replace(wide=False))
    with pytest.raises(ValueError, match="wide = true"):
        add_lora(load_base(config.base_dir)[0], config.replace(wide=False))
    # pretrained again without it, the base loses the file
    pretrain(config.replace(wide=False, pretrain_epochs=1))
    assert not (tmp_path / "base" / WIDE_FILE).exists() and load_base(config.base_dir)[2]["wide"] is False


def _one_step_by_hand(dense_step: float, item_step: float):
    """(moved, rows, vocab, tokenizer, merchant): each row's move when every row steps by 1 between `snapshot` and
    `hold`, all three tasks live."""
    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=4)
    head, rows = model.wide, item_rows(tokenizer, merchant.facts)
    head.train_only(("intent", "next-item", "churn"), rows, dense_step=dense_step, item_step=item_step)
    start = head.table.weight.detach().clone()
    head.snapshot()
    with torch.no_grad():
        head.table.weight += 1.0
    head.hold()
    return (head.table.weight.detach() - start)[:, 0], rows, head.vocab_size, tokenizer, merchant


def _one_dp_round(**changes):
    """(start, after): the wide table's weights before and after one DP-SGD round with `changes` to the config."""
    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=5)
    start = model.wide.table.weight.detach().clone()[:, 0]
    result = train_round(model, encode(merchant.train, tokenizer), CONFIG.replace(**changes), PrivacyState(),
                         seed=0, owners=[e.user_id for e in merchant.train],
                         output_rows=item_rows(tokenizer, merchant.facts))
    assert result.status == "trained"
    return start, model.wide.table.weight.detach()[:, 0]


def test_wide_dense_step_damps_only_the_dense_rows_and_zero_holds_them_under_dp_sgd():
    """wide-dense-step = k: after each optimizer step the live dense rows (intent's non-item features, the churn
    bands, the stay weights) keep k of their step; the candidate items' rows keep all of it. At k = 0 a DP-SGD round
    moves the items' intent rows and the next-item biases while every dense row stays at its start."""
    moved, rows, vocab, tokenizer, merchant = _one_step_by_hand(dense_step=0.25, item_step=1.0)
    items = torch.zeros(vocab, dtype=torch.bool)
    items[rows] = True
    categories = tokenizer.convert_tokens_to_ids(sorted(set(merchant.facts.category)))
    dense_intent = (~items).nonzero().flatten()
    assert torch.allclose(moved[items.nonzero().flatten()], torch.ones(len(rows)))  # the candidate items' rows
    assert torch.allclose(moved[2 * vocab + torch.tensor(rows)], torch.ones(len(rows)))  # next item's biases
    for dense in (dense_intent, vocab + torch.arange(vocab), 3 * vocab + torch.tensor(categories)):
        assert torch.allclose(moved[dense], torch.full((len(dense),), 0.25))
    # through the config key under DP-SGD: k = 0 holds every dense row at its start
    start, after = _one_dp_round(wide_dense_step=0.0)
    assert torch.equal(after[dense_intent], start[dense_intent])
    assert torch.equal(after[vocab:2 * vocab], start[vocab:2 * vocab])
    assert torch.equal(after[3 * vocab:], start[3 * vocab:])
    biases = 2 * vocab + torch.tensor(rows)
    assert (after[rows] != start[rows]).all() and (after[biases] != start[biases]).all()


def test_wide_item_step_damps_the_per_item_rows_beside_the_dense_ones():
    """wide-item-step = k: the candidate items' intent rows and the next-item biases keep k of each step, the dense
    rows their own share. At k = 0 a DP-SGD round holds every per-item row and still moves the dense ones."""
    moved, rows, vocab, _, _ = _one_step_by_hand(dense_step=0.25, item_step=0.5)
    biases = 2 * vocab + torch.tensor(rows)
    assert torch.allclose(moved[torch.tensor(rows)], torch.full((len(rows),), 0.5))
    assert torch.allclose(moved[biases], torch.full((len(rows),), 0.5))
    assert torch.allclose(moved[vocab:2 * vocab], torch.full((vocab,), 0.25))  # the churn bands
    start, after = _one_dp_round(wide_item_step=0.0)
    assert torch.equal(after[rows], start[rows]) and torch.equal(after[biases], start[biases])
    assert (after[vocab:2 * vocab] != start[vocab:2 * vocab]).any()


def _linked_model(seed: int):
    """The tiny model with its link term on: the public split's counts (here the merchant's own train examples)."""
    model, tokenizer, merchant = tiny_lora_model(CONFIG, seed=seed)
    links = count_links(merchant.train, tokenizer, merchant.facts)
    model.wide.set_links(links)
    return model, tokenizer, merchant, links


def test_the_link_term_adds_the_weighted_log_counts_of_the_last_item_s_public_successors():
    model, tokenizer, merchant, links = _linked_model(seed=4)
    head = model.wide
    pairs = {}
    for e in merchant.train:
        if e.task == "next-item" and e.seen:
            pairs[(e.seen[-1], e.label)] = pairs.get((e.seen[-1], e.label), 0) + 1
    assert int(links["count"].sum()) == sum(pairs.values()) and len(links["count"]) == len(pairs)
    examples = [e for e in merchant.valid if e.task == "next-item"][:6] + [e for e in merchant.valid
                                                                           if e.task == "intent"][:2]
    ids = encode(examples, tokenizer).input_ids
    token = tokenizer.convert_tokens_to_ids
    with torch.no_grad():
        head.table.weight.zero_()
        _, without = head(ids)
        head.table.weight[head.link_rows()] = 0.7
        _, terms = head(ids)
    for example, row, plain in zip(examples, terms - without, without, strict=True):
        if example.task != "next-item":
            assert not row.any() and not plain.any()
            continue
        last = int(example.seen[-1])
        expected = torch.zeros(head.vocab_size)
        for (a, b), n in pairs.items():
            if a == last:
                expected[token(merchant.facts.item_ids[b])] = NEXT_SCALE * 0.7 * math.log1p(n)
        assert torch.allclose(row, expected, atol=1e-6), example.source
    assert (terms - without).abs().sum() > 0  # some last item had public successors


def test_per_sample_gradients_with_the_link_term_are_exact():
    model, tokenizer, merchant, _ = _linked_model(seed=5)
    nonzero_lora(model)
    with torch.no_grad():
        model.wide.table.weight.normal_(0.0, 0.3)
    examples = [e for e in merchant.train if e.task == "next-item"][:6]
    assert_opacus_per_sample_gradients_exact(model, encode(examples, tokenizer))


def test_dp_sgd_trains_the_link_weights_of_the_categories_only():
    model, tokenizer, merchant, _ = _linked_model(seed=6)
    head = model.wide
    rows = head.link_rows()
    result = train_round(model, encode(merchant.train, tokenizer), CONFIG.replace(train_tasks="next-item"),
                         PrivacyState(), seed=0, owners=[e.user_id for e in merchant.train],
                         output_rows=item_rows(tokenizer, merchant.facts))
    assert result.status == "trained" and head.table.weight[rows].abs().min() > 0
    others = torch.ones(head.vocab_size, dtype=torch.bool)
    others[rows - 4 * head.vocab_size] = False
    assert not head.table.weight[4 * head.vocab_size:][others].any()


def test_pretraining_leaves_each_example_s_own_pair_out_of_its_link_counts():
    model, tokenizer, merchant, links = _linked_model(seed=7)
    head = model.wide
    examples = [e for e in merchant.train if e.task == "next-item" and e.seen][:8]
    data = encode(examples, tokenizer)
    counts = head.link_counts(data.input_ids)
    answers = data.target_ids[:, 0]
    with leaving_out(model, answers):
        left = head.link_counts(data.input_ids)
    assert head.left_out is None  # only inside the block
    rows = torch.arange(len(examples))
    n = torch.expm1(counts[rows, answers]).round()
    assert (n >= 1).all()  # every train example's own pair was counted
    assert torch.allclose(left[rows, answers], torch.log1p(n - 1), atol=1e-5)
    changed = torch.zeros_like(counts, dtype=torch.bool)
    changed[rows, answers] = True
    assert torch.equal(left[~changed], counts[~changed])  # every other count as it was
