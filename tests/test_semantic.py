"""Semantic item ids (item-ids = semantic): ids from public facts, new items, exact constrained scoring, DP-SGD on
multi-token targets, and a whole run through Flower, export and predict with items the base never saw."""

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from shared.config import FedShopConfig
from shared.data import check_base_matches, merchant_data, vocabulary
from shared.errors import UserError
from shared.model import add_lora, build_base
from shared.modeling import ItemScorer, encode, model_start_token, per_sample_loss
from shared.pretrain import public_semantic_ids
from shared.semantic import SemanticIds
from shared.synthetic import generate
from shared.tokenizer import build_tokenizer
from tests.helpers import assert_opacus_per_sample_gradients_exact, first

ROOT = Path(__file__).resolve().parents[1]
CONFIG = FedShopConfig(model_size="tiny", num_merchants=2, shoppers_per_merchant=30, public_shoppers=80,
                       num_items=48, num_categories=4, history_length=4, batch_size=16, item_ids="semantic",
                       semantic_clusters=3, new_items=5)


@pytest.fixture(scope="module")
def world():
    data = generate(CONFIG)
    semantic = public_semantic_ids(CONFIG, data)
    merchant = merchant_data(CONFIG, "m0", data, semantic=semantic)
    tokenizer = build_tokenizer(*vocabulary(merchant.facts))
    return data, semantic, merchant, tokenizer


def test_ids_are_unique_start_with_the_public_facts_and_do_not_depend_on_the_run(world):
    data, semantic, merchant, _ = world
    facts = merchant.facts
    assert len(set(facts.codes)) == len(facts.item_ids) == CONFIG.num_items
    for i, code in enumerate(facts.codes):
        c, k, p, u = code.split()
        assert c == facts.category[i] and p == facts.price_band[i]
        assert 0 <= int(k[1:]) < CONFIG.semantic_clusters and 0 <= int(u[1:]) < semantic.slots
    largest = max(Counter(code.rsplit(" ", 1)[0] for code in facts.codes).values())
    assert semantic.slots == largest + 4  # room for items added after pretraining
    assert public_semantic_ids(CONFIG, generate(CONFIG)) == semantic  # deterministic: every process agrees
    # the generator kept the new items out of the public split, and nothing else
    assert [i for i, v in enumerate(facts.public_views) if v == 0] == list(range(43, 48))
    # no item token in the vocabulary: the model only ever sees the ids' codes
    items, _, attributes = vocabulary(facts)
    assert items == [] and {"k0", "k2", "u0"} <= set(attributes)


def test_an_item_the_base_never_saw_gets_its_id_from_its_facts(world):
    _, semantic, merchant, _ = world
    facts = merchant.facts
    known = dict(list(semantic.codes.items())[:-1])
    gone = facts.item_ids[-1]
    smaller = SemanticIds(semantic.clusters, semantic.slots, semantic.categories, semantic.price_bands, known)
    grown = smaller.extend(facts.item_ids, facts.category, facts.price_band)
    c, k, p, u = grown.codes[gone]
    assert (c, p) == (facts.category[-1], facts.price_band[-1])
    votes = Counter(code[1] for code in known.values() if (code[0], code[2]) == (c, p)) or \
        Counter(code[1] for code in known.values() if code[0] == c)
    assert votes[k] == max(votes.values())  # the cluster most common among its category and price band
    taken = {code[3] for code in known.values() if code[:3] == (c, k, p)}
    assert u == min({f"u{s}" for s in range(semantic.slots)} - taken, key=lambda t: int(t[1:]))  # first free slot
    assert len(set(grown.codes.values())) == len(grown.codes)
    assert {i: grown.codes[i] for i in known} == known  # ids already given never change
    with pytest.raises(UserError, match="item 'i-new' has 'c99'"):
        grown.extend((*facts.item_ids, "i-new"), (*facts.category, "c99"), (*facts.price_band, "p0"))
    full = SemanticIds(semantic.clusters, 1, semantic.categories, semantic.price_bands, known)
    group = [item for item, code in known.items() if code[:3] == (c, k, p)]
    if group:  # a group with every slot taken refuses the newcomer, naming it
        with pytest.raises(UserError, match=f"item {gone!r}: the group"):
            full.extend(facts.item_ids, facts.category, facts.price_band)


def _brute_force_log_probs(model, tokenizer, scorer, source: str) -> torch.Tensor:
    """log P(id) of every item, one decoder pass per item, renormalising each step over the valid next codes."""
    batch = tokenizer([source], return_tensors="pt")
    codes = scorer.codes.tolist()
    out = []
    for code in codes:
        decoder = torch.tensor([[model_start_token(model), *code[:-1]]])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=decoder).logits[0]
        total = 0.0
        for j in range(len(code)):
            valid = sorted({c[j] for c in codes if c[:j] == code[:j]})
            total += float(torch.log_softmax(logits[j, valid], 0)[valid.index(code[j])])
        out.append(total)
    return torch.tensor(out)


def test_constrained_scores_are_exact_log_probabilities_of_valid_ids(world):
    _, _, merchant, tokenizer = world
    model = add_lora(build_base("tiny", tokenizer, seed=3), CONFIG, seed=3)
    for _, parameter in model.named_parameters():  # a LoRA that is not zero, so the adapter path is exercised
        if "lora_B" in _:
            torch.nn.init.normal_(parameter, std=0.2)
    model.eval()
    scorer = ItemScorer(tokenizer, merchant.facts, chunk=50, backoff=False)  # several decoder passes per source
    sources = [e.source for e in merchant.test if e.task == "next-item"][:3]
    batch = tokenizer(sources, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = scorer.scores(model, batch["input_ids"], batch["attention_mask"])
        assert torch.allclose(scores.exp().sum(1), torch.ones(len(sources)), atol=1e-5)  # a distribution over items
        for row, source in enumerate(sources):
            assert torch.allclose(scores[row], _brute_force_log_probs(model, tokenizer, scorer, source), atol=1e-4)
        # backoff: an item the base never saw gets 1/G of its group's probability, the group's known items share the
        # rest in the model's proportions, every other item keeps its exact probability
        backed = ItemScorer(tokenizer, merchant.facts, chunk=50).scores(model, batch["input_ids"],
                                                                        batch["attention_mask"]).exp()
    exact = scores.exp()
    assert torch.allclose(backed.sum(1), torch.ones(len(sources)), atol=1e-5)
    facts = merchant.facts
    group_of = [code.rsplit(" ", 1)[0] for code in facts.codes]
    new = {i for i, views in enumerate(facts.public_views) if views == 0}
    assert len(new) == 5
    for g in set(group_of):
        members = [i for i, x in enumerate(group_of) if x == g]
        fresh, known = [i for i in members if i in new], [i for i in members if i not in new]
        total = exact[:, members].sum(1)
        assert torch.allclose(backed[:, members].sum(1), total, atol=1e-6)  # the prefix keeps its probability
        for i in fresh:
            assert torch.allclose(backed[:, i], total / len(members), atol=1e-6)
        if fresh and known:
            share = exact[:, known] / exact[:, known].sum(1, keepdim=True)
            assert torch.allclose(backed[:, known], share * total[:, None] * len(known) / len(members), atol=1e-6)
        if not fresh:
            assert torch.allclose(backed[:, members], exact[:, members], atol=1e-6)


def test_the_loss_of_an_id_is_its_sequence_nll_and_dp_per_sample_gradients_stay_exact(world):
    _, _, merchant, tokenizer = world
    model = add_lora(build_base("tiny", tokenizer, seed=4), CONFIG, seed=4)
    examples = [e for e in merchant.train if e.task == "next-item"][:2] + \
        [e for e in merchant.train if e.task == "intent"][:2]
    batch = encode(examples, tokenizer)
    assert batch.target_ids.shape == (4, 4) and (batch.target_ids[2:, 1:] == -100).all()
    loss = per_sample_loss(model, batch.input_ids, batch.attention_mask, batch.target_ids)
    for i, example in enumerate(examples):
        ids = tokenizer.convert_tokens_to_ids(example.target.split())
        decoder = torch.tensor([[model_start_token(model), *ids[:-1]]])
        logits = model(input_ids=batch.input_ids[i:i + 1], attention_mask=batch.attention_mask[i:i + 1],
                       decoder_input_ids=decoder).logits[0]
        expected = -sum(torch.log_softmax(logits[j], 0)[t] for j, t in enumerate(ids))
        assert torch.allclose(loss[i], expected, atol=1e-5)
    # Opacus' per-sample gradients on a batch mixing four-token and one-token targets equal one example at a time
    assert_opacus_per_sample_gradients_exact(model, first(encode(merchant.train, tokenizer), 6))


def test_the_wide_part_answers_yes_no_examples_batched_with_semantic_targets_as_alone(world):
    # a batch whose next-item targets are four-token ids takes per_sample_loss's multi-step path: the wide term must
    # reach the yes/no examples there too, and their per-sample gradients stay exact
    _, _, merchant, tokenizer = world
    config = CONFIG.replace(wide=True, lora_targets="q,v,lm_head")
    model = add_lora(build_base("tiny", tokenizer, seed=5), config, seed=5, tokenizer=tokenizer,
                     facts=merchant.facts)
    with torch.no_grad():
        model.wide.table.weight.normal_(0.0, 0.5)
    examples = [e for e in merchant.train if e.task == "next-item"][:2] + \
        [e for e in merchant.train if e.task in ("intent", "churn")][:3]
    batch = encode(examples, tokenizer)
    assert batch.target_ids.shape[1] == 4
    mixed = per_sample_loss(model, batch.input_ids, batch.attention_mask, batch.target_ids)
    alone = encode(examples[2:], tokenizer)  # one-token targets only: the first-step path
    assert alone.target_ids.shape[1] == 1
    assert torch.allclose(mixed[2:], per_sample_loss(model, alone.input_ids, alone.attention_mask, alone.target_ids),
                          atol=1e-5)
    assert_opacus_per_sample_gradients_exact(model, batch)


def test_a_base_written_one_way_is_refused_for_the_other():
    with pytest.raises(UserError, match="writes items as item-ids = 'token', the config asks for item-ids = "
                                        "'semantic'"):
        check_base_matches({"item-ids": "token"}, CONFIG)


def test_semantic_run_export_and_predict_rank_items_the_base_never_saw(tmp_path):
    from server.export import export_run
    from server.predict import Predictor

    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "simulate", "--config", str(ROOT / "configs/tiny.toml"),
         "--set", f"base-dir={tmp_path / 'base'}", "--set", "item-ids=semantic", "--set", "new-items=6",
         "--set", "num-rounds=1", "--run-dir", str(run), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]["metrics"]
    new = [m for m in records[-1]["merchants"].values() if m.get("next-new-examples", 0) > 0]
    assert new and final["next-new-examples"] == sum(m["next-new-examples"] for m in new)  # pooled, not averaged
    # new targets pooled by their own count over the merchants that have them (not by test shoppers)
    assert math.isclose(final["next-new-hr@10"], sum(m["next-new-hr@10"] * m["next-new-examples"] for m in new)
                        / final["next-new-examples"], rel_tol=1e-12)
    assert "test targets the base never saw" in (run / "report.md").read_text()
    out = export_run(run, tmp_path / "export")
    assert (out / "base" / "semantic-ids.json").is_file()
    predictor = Predictor(out)
    new = [item for item, views in zip(predictor.facts.item_ids, predictor.facts.public_views, strict=True)
           if views == 0]
    assert len(new) == 6
    history = [i for i in predictor.facts.item_ids if i not in new][:4]
    everything = len(predictor.facts.item_ids) - len(history)
    result = predictor.predict(history, "next-item", everything, [], explain=False)
    scores = {p["item"]: p["score"] for p in result["predictions"]}
    assert set(scores) == set(predictor.facts.item_ids) - set(history)
    assert math.isclose(sum(scores.values()), 1.0, rel_tol=1e-5)  # every unseen item, new ones too, sums to one
    assert all(scores[item] > 0 for item in new)
    intent = predictor.predict(history, "intent", 1, [new[0]], explain=False)  # a new item as a candidate
    assert 0 < intent["predictions"][0]["score"] < 1
