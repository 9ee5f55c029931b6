"""`fedshop export`: a folder plain PEFT loads in a fresh interpreter, a card whose numbers are the ledger's, a
manifest that detects a changed byte."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import run_logits

from server.export import export_run
from server.manifest import verify
from shared.errors import UserError

pytestmark = pytest.mark.slow  # every test here reads the session's simulated run (conftest.tiny_run)

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "next: i1 c1 i2 c2 i3 c0"


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run.path  # read only: exports are written beside it, never into it


FRESH = f"""
import sys, torch
from peft import AutoPeftModelForSeq2SeqLM, PeftModel
from transformers import PreTrainedTokenizerFast, T5ForConditionalGeneration
out = sys.argv[1]
tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
batch = tokenizer([{SOURCE!r}], return_tensors="pt")
models = [PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(out + "/base"), out),
          AutoPeftModelForSeq2SeqLM.from_pretrained(out), T5ForConditionalGeneration.from_pretrained(out + "/merged")]
rows = []
for model in models:
    model.eval()
    start = torch.tensor([[model.config.decoder_start_token_id]])
    with torch.no_grad():
        rows.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          decoder_input_ids=start).logits[0, 0])
torch.save(torch.stack(rows), out + "/../logits.pt")
"""


def test_export_loads_with_plain_peft_and_gives_the_runs_logits(run_dir, tmp_path):
    out = export_run(run_dir, tmp_path / "export", merge=True)
    done = subprocess.run([sys.executable, "-c", FRESH, str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)  # a fresh interpreter, no fedshop import
    assert done.returncode == 0, done.stderr[-3000:]
    expected = run_logits(run_dir, SOURCE)
    for got in torch.load(tmp_path / "logits.pt"):
        assert torch.allclose(got, expected, atol=1e-5)


def test_card_numbers_are_the_ledgers_and_the_manifest_detects_a_changed_byte(run_dir, tmp_path):
    out = export_run(run_dir, tmp_path / "export")
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["library_name"] == "peft" and Path(front["base_model"]) == (out / "base").resolve()
    assert {"lora", "t5", "federated-learning", "differential-privacy", "dp-sgd"} <= set(front["tags"])
    rows = list(csv.DictReader(open(run_dir / "privacy.csv")))
    final = {}
    for row in rows:
        final[row["merchant"]] = float(row["epsilon"])
    spent = list(final.values())
    assert f"| epsilon per merchant, max / mean | {max(spent):.3f} / {sum(spent) / len(spent):.3f} |" in text
    assert "| unit | event |" in text and "| delta | 1e-05 |" in text and "| accountant | rdp |" in text
    noise = ", ".join(f"{n:.4g}" for n in sorted({float(r["noise_multiplier"]) for r in rows}))
    assert f"| noise multiplier (the merchants' values) | {noise} |" in text

    assert verify(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"adapter_config.json", "adapter_model.safetensors", "README.md",
                                      "tokenizer.json", "base/model.safetensors"}
    weights = bytearray((out / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 0x01
    (out / "adapter_model.safetensors").write_bytes(bytes(weights))
    assert verify(out) == ["adapter_model.safetensors: sha256 differs from the manifest"]


def test_export_refuses_what_it_cannot_do(run_dir, tmp_path):
    with pytest.raises(UserError, match="not a fedshop run directory"):
        export_run(tmp_path, tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "f").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_run(run_dir, tmp_path / "busy")
    with pytest.raises(UserError, match="not a fedshop export"):
        verify(tmp_path)


def test_predict_schema_and_occlusion_attributions_reproduce_the_scores(run_dir, tmp_path):
    from server.predict import SCHEMA, Predictor

    out = export_run(run_dir, tmp_path / "export")
    predictor = Predictor(out)
    history = list(predictor.facts.item_ids[:4])
    result = predictor.predict(history, "next-item", 5, [], explain=True)
    assert result["schema"] == SCHEMA and result["task"] == "next-item" and result["history"] == history
    items = [p["item"] for p in result["predictions"]]
    scores = [p["score"] for p in result["predictions"]]
    assert len(items) == 5 and not set(items) & set(history) and scores == sorted(scores, reverse=True)
    assert all(0 < s < 1 for s in scores)
    json.dumps(result)  # serialisable as documented
    for explanation in result["explanations"]:
        index = predictor.index[explanation["item"]]
        for a in explanation["attributions"]:
            without = history[:a["event"]] + history[a["event"] + 1:]
            direct = float(predictor.next_item_scores([without])[0, index])
            assert abs(explanation["score"] - a["delta"] - direct) < 1e-6
    intent = predictor.predict(history, "intent", 1, [predictor.facts.item_ids[9]], explain=True)
    (only,) = intent["explanations"]
    for a in only["attributions"]:
        without = history[:a["event"]] + history[a["event"] + 1:]
        direct = float(predictor.intent_scores([without], only["item"])[0])
        assert abs(only["score"] - a["delta"] - direct) < 1e-6
    with pytest.raises(UserError, match="unknown item"):
        predictor.predict([*history, "i99999"], "next-item", 5, [], explain=False)
    with pytest.raises(UserError, match="top-k 0"):
        predictor.predict(history, "next-item", 0, [], explain=False)
    with pytest.raises(UserError, match="not a fedshop export"):
        Predictor(tmp_path)
    weights = bytearray((out / "base" / "model.safetensors").read_bytes())
    weights[-1] ^= 0x01  # another base than the one the adapter was trained on
    (out / "base" / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(UserError, match="not the base this adapter was trained on"):
        Predictor(out)


def test_batch_predict_gives_every_shopper_the_single_history_result_and_names_bad_lines(run_dir, tmp_path):
    from server.predict import BATCH_SCHEMA, Predictor, read_requests

    # Prepare
    out = export_run(run_dir, tmp_path / "export")
    predictor = Predictor(out, batch_size=3)  # several forward batches for five shoppers
    items = predictor.facts.item_ids
    histories = [items[:4], items[10:11], items[20:26], items[5:8], items[30:33]]
    candidates = [items[40:42], items[43:44], items[44:47], items[50:51], items[52:54]]
    good = tmp_path / "shoppers.csv"
    good.write_text("shopper_id,history,candidates\n" + "".join(
        f"s{i},{' '.join(h)},{' '.join(c)}\n" for i, (h, c) in enumerate(zip(histories, candidates))))
    # Execute
    nexts = predictor.predict_file(good, "next-item", 5, explain=True)
    intents = predictor.predict_file(good, "intent", 1, explain=False)
    # Assert
    for batch, task in ((nexts, "next-item"), (intents, "intent")):
        assert batch["schema"] == BATCH_SCHEMA and batch["task"] == task and batch["input"] == str(good)
        assert [s["shopper_id"] for s in batch["predictions"]] == [f"s{i}" for i in range(5)]
        assert [s["line"] for s in batch["predictions"]] == [2, 3, 4, 5, 6]
        json.dumps(batch)
        for shopper, history, cands in zip(batch["predictions"], histories, candidates):
            single = predictor.predict(list(history), task, 5, list(cands), explain=task == "next-item")
            assert shopper["history"] == single["history"]
            assert [p["item"] for p in shopper["predictions"]] == [p["item"] for p in single["predictions"]]
            assert torch.allclose(torch.tensor([p["score"] for p in shopper["predictions"]]),
                                  torch.tensor([p["score"] for p in single["predictions"]]), atol=1e-5)
            for mine, theirs in zip(shopper.get("explanations", []), single.get("explanations", [])):
                assert torch.allclose(torch.tensor([a["delta"] for a in mine["attributions"]]),
                                      torch.tensor([a["delta"] for a in theirs["attributions"]]), atol=1e-5)
    assert all(len(s["predictions"]) == 5 for s in nexts["predictions"])
    assert [len(s["predictions"]) for s in intents["predictions"]] == [len(c) for c in candidates]

    def refused(text: str, task: str = "next-item") -> str:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UserError) as error:
            predictor.predict_file(bad, task, 5, explain=False)
        return str(error.value)

    assert f"{tmp_path / 'bad.csv'}:3: column history: unknown item(s) i99999" in refused(
        f"shopper_id,history\na,{items[0]}\nb,{items[1]} i99999\n")
    assert f"{tmp_path / 'bad.csv'}:2: column history is empty" in refused("shopper_id,history\na,\n")
    assert f"{tmp_path / 'bad.csv'}:1: missing column(s) history" in refused("shopper_id,items\na,i1\n")
    assert f"{tmp_path / 'bad.csv'}:2: column candidates: unknown item(s) nope" in refused(
        f"shopper_id,history,candidates\na,{items[0]},nope\n", "intent")
    assert f"{tmp_path / 'bad.csv'}:2: column candidates is empty" in refused(
        f"shopper_id,history,candidates\na,{items[0]},\n", "intent")
    assert "needs a candidates column" in refused(f"shopper_id,history\na,{items[0]}\n", "intent")
    with pytest.raises(UserError, match="no such file"):
        read_requests(tmp_path / "missing.csv", needs_candidates=False)
    with pytest.raises(UserError, match="top-k 0"):
        predictor.predict_file(good, "next-item", 0, explain=False)
    done = subprocess.run([sys.executable, "-m", "server.cli", "predict", "--adapter", str(out), "--input", str(good),
                           "--format", "json", "--top-k", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["predictions"][4]["shopper_id"] == "s4"


def test_predict_price_curve_and_churn_risk_agree_with_the_intent_and_churn_heads(run_dir, tmp_path):
    import math

    from server.predict import Activity, Predictor
    from shared.tasks import PRICE_LEVELS, churn_source

    out = export_run(run_dir, tmp_path / "export")
    predictor = Predictor(out)
    history, candidate = list(predictor.facts.item_ids[:4]), predictor.facts.item_ids[9]
    price = predictor.predict(history, "price", 1, [candidate], explain=True)
    (curve,) = price["predictions"]
    assert [c["price_level"] for c in curve["curve"]] == list(PRICE_LEVELS)
    for point in curve["curve"]:  # each point is the intent head at that price level
        direct = float(predictor.intent_scores([history], candidate, point["price_level"])[0])
        assert abs(point["score"] - direct) < 1e-6
        at_level = predictor.predict(history, "intent", 1, [candidate], False, price_level=point["price_level"])
        assert abs(at_level["predictions"][0]["score"] - point["score"]) < 1e-6
    assert math.isfinite(curve["elasticity"]) and price["explanations"][0]["item"] == candidate
    activity = Activity(sessions=3, days_since_last=2.5, mean_gap_days=4.0, bought_last_session=True)
    churn = predictor.predict(history, "churn", 1, [], explain=True, activity=activity)
    (only,) = churn["predictions"]
    direct = float(predictor._yes_probability([churn_source(predictor._history_text(history), 3, 4, 4.0, 2.5,
                                                            True)])[0])
    # the model's probabilities are float32 (eps 1.2e-7) and `direct` is a separate forward pass (another batch):
    # they agree to a few float32 ulps; the risk itself is 1 - score in float64, so that identity is exact
    assert abs(only["score"] - direct) < 1e-6 and abs(only["churn_risk"] - (1 - direct)) < 1e-6
    assert only["churn_risk"] == 1.0 - only["score"]
    for a in churn["explanations"][0]["attributions"]:  # occlusion deltas reproduce the scores they explain
        without = history[:a["event"]] + history[a["event"] + 1:]  # the item left out; the activity counts stay
        again = float(predictor._yes_probability([churn_source(predictor._history_text(without), 3, 4, 4.0, 2.5,
                                                               True)])[0])
        assert abs(only["score"] - a["delta"] - again) < 1e-6
    json.dumps(churn)
    json.dumps(price)
    with pytest.raises(UserError, match="price-level 3"):
        predictor.predict(history, "intent", 1, [candidate], False, price_level=3.0)
    with pytest.raises(UserError, match="needs the shopper's activity"):
        predictor.predict(history, "churn", 1, [], False)
    bad = tmp_path / "churn.csv"
    bad.write_text("shopper_id,history,sessions,days_since_last\ns1,i1 i2,two,1\n")
    with pytest.raises(UserError, match=r"churn.csv:2: column sessions: 'two' is not an integer"):
        predictor.predict_file(bad, "churn", 1, False)


@pytest.mark.parametrize("targets", ["lm_head", "q,v,embed"])
def test_merging_an_adapter_of_a_tied_embedding_into_the_base_is_refused(tmp_path, targets):
    # Prepare: a run directory whose config adapts lm_head or the encoder's embedding (one tied weight in T5)
    from server.export import export_run
    from shared.config import FedShopConfig, to_toml
    from shared.errors import UserError

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(to_toml(FedShopConfig(lora_targets=targets)), encoding="utf-8")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")  # never read: the refusal comes first
    # Execute / Assert: refused with the reason, before anything is written
    with pytest.raises(UserError, match=f"adapts {targets.split(',')[-1]}, which T5 ties to its other embeddings"):
        export_run(run, tmp_path / "out", merge=True)
    assert not (tmp_path / "out").exists()


def test_the_export_carries_the_wide_part_and_predict_answers_with_it(run_dir, tmp_path):
    # configs/tiny.toml has wide = true: the run trained the wide part, the export carries it, the card says how to
    # load it, and predict's intent and churn answers are the fedshop model's (wide part included), not plain PEFT's
    from server.predict import Predictor
    from shared.config import load_config
    from shared.model import add_lora, load_adapter_state, load_base, read_adapter
    from shared.modeling import binary_probability
    from shared.tasks import intent_source
    from shared.wide import LINKS_FILE, WIDE_FILE, save_links, wide_of

    out = export_run(run_dir, tmp_path / "export")
    assert (out / WIDE_FILE).is_file() and "load_saved_wide" in (out / "README.md").read_text()
    predictor = Predictor(out)
    config = load_config(run_dir / "config.toml")
    # a base with the public item-to-item counts (the session's has none): they travel in the export's base, and
    # predict's model reads them
    linked_base = Path(shutil.copytree(config.base_dir, tmp_path / "linked-base"))
    save_links({"from": torch.tensor([3]), "to": torch.tensor([4]), "count": torch.tensor([2])}, linked_base)
    linked_run = Path(shutil.copytree(run_dir, tmp_path / "linked-run"))
    (linked_run / "config.toml").write_text((run_dir / "config.toml").read_text().replace(
        config.base_dir, str(linked_base)), encoding="utf-8")
    linked = export_run(linked_run, tmp_path / "linked-export")
    assert (linked / "base" / LINKS_FILE).is_file() and not (out / "base" / LINKS_FILE).is_file()
    assert wide_of(Predictor(linked).model).successors is not None and wide_of(predictor.model).successors is None
    base, tokenizer, _ = load_base(config.base_dir)
    model = add_lora(base, config, tokenizer=tokenizer)
    load_adapter_state(model, read_adapter(run_dir))
    model.eval()
    assert model.wide.table.weight.abs().max() > 0  # trained
    history, candidates = list(predictor.facts.item_ids[:4]), list(predictor.facts.item_ids[4:24])
    answer = predictor.predict(history, "intent", len(candidates), candidates, False)["predictions"]
    scores = np.array([{p["item"]: p["score"] for p in answer}[c] for c in candidates])
    sources = [intent_source(predictor._history_text(history), predictor.index[c], predictor.facts, 1.0)
               for c in candidates]
    fedshop = binary_probability(model, tokenizer, sources, batch_size=8)
    assert np.abs(scores - fedshop).max() < 1e-5
    del model.wide  # plain PEFT's answers differ: the wide part moved them (how far differs from item to item)
    assert np.abs(binary_probability(model, tokenizer, sources, batch_size=8) - scores).max() > 1e-4
