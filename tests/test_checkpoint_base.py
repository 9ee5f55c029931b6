"""config key `base-model`: pretraining from a user's local Hugging Face T5 checkpoint (here a small random one with a
real trained tokenizer, built in the test), and everything downstream of the base directory it writes."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_logits
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from shared.config import FedShopConfig
from shared.data import check_base_matches, merchant_data, vocabulary
from shared.errors import UserError
from shared.model import from_checkpoint, load_base, load_tokenizer, read_base_meta
from shared.pretrain import pretrain
from shared.synthetic import PUBLIC_MERCHANT
from shared.tokenizer import domain_tokens
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
ROWS = 128  # the checkpoint's embedding rows: more than its tokenizer's vocabulary, as in Google's T5 checkpoints
TEXT = """the shopper viewed a red jacket and then bought it two days later
shoppers who buy shoes often come back for socks within a week
next to the candle shop there is a small bakery that sells bread
yes or no questions are easy to answer when the intent is clear
categories group the items of a catalogue by what they are for
a quick brown fox jumps over the lazy dog near the river bank
prices went up in the spring and many customers waited for a sale""".splitlines()


def make_checkpoint(directory: Path) -> Path:
    """A T5 checkpoint as Hugging Face writes one: config.json, model.safetensors, and a Unigram tokenizer with
    Metaspace pre-tokenization (like T5's SentencePiece) trained here on a few sentences."""
    core = Tokenizer(models.Unigram())
    core.normalizer = normalizers.NFKC()
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=250, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    core.train_from_iterator(TEXT * 5, trainer)
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1) and len(tokenizer) < ROWS
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = T5Config(vocab_size=ROWS, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("checkpoint") / "t5-user")


@pytest.fixture(scope="module")
def base(checkpoint, tmp_path_factory) -> FedShopConfig:
    """TINY pretrained from the checkpoint."""
    tmp = tmp_path_factory.mktemp("ckpt-base")
    config = FedShopConfig(**TINY, base_model=str(checkpoint), base_dir=str(tmp / "base"), run_dir=str(tmp / "run"))
    pretrain(config)
    return config


@pytest.fixture(scope="module")
def sources(base) -> list[str]:
    """Real inputs of every task, from the public split and a merchant."""
    examples = merchant_data(base, PUBLIC_MERCHANT).valid + merchant_data(base, "m0").test
    by_task = {}
    for e in examples:
        by_task.setdefault(e.task, []).append(e.source)
    assert set(by_task) >= {"intent", "next-item", "churn"}
    return [s for group in by_task.values() for s in group[:20]]


def test_the_base_records_its_origin_and_keeps_the_checkpoints_shape(base, checkpoint):
    meta = read_base_meta(base.base_dir)
    assert meta["model-size"] == "checkpoint"
    assert meta["base-model"] == str(checkpoint.resolve())
    assert meta["base-model-sha256"] == hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    model, tokenizer, _ = load_base(base.base_dir)
    original = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    assert len(tokenizer) > ROWS > len(original)  # the domain tokens outgrew the checkpoint's spare rows
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 32) == model.lm_head.weight.shape
    assert model.config.vocab_size == len(tokenizer) and model.config.d_model == 32
    assert model.config.feed_forward_proj == "gated-gelu" and model.config.num_decoder_layers == 2
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    assert (pad, eos) == (0, 1) == (model.config.decoder_start_token_id, model.config.eos_token_id)
    assert model.config.pad_token_id == pad
    # the checkpoint's own words still encode as they did
    sentence = "the shopper bought a red jacket"
    assert tokenizer(sentence)["input_ids"] == original(sentence)["input_ids"]


def test_domain_sources_encode_to_one_id_per_word_and_reload_identically(base, checkpoint, sources):
    tokenizer = load_tokenizer(Path(base.base_dir))
    original = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    for source in sources:
        words = source.split()
        ids = tokenizer(source)["input_ids"]
        assert ids == tokenizer.convert_tokens_to_ids(words) + [tokenizer.eos_token_id], source
        assert tokenizer.unk_token_id not in ids
        assert len(original(source)["input_ids"]) > len(ids)  # without the added tokens it splits into pieces
    # the tokenizer in memory right after adding the tokens encodes as the one saved in the base directory
    _, fresh, _ = from_checkpoint(checkpoint, domain_tokens(*vocabulary(merchant_data(base, PUBLIC_MERCHANT).facts)),
                                  seed=0)
    assert fresh(sources, padding=True)["input_ids"] == tokenizer(sources, padding=True)["input_ids"]


def test_new_embedding_rows_are_drawn_like_the_checkpoints_rows(checkpoint, base):
    words = domain_tokens(*vocabulary(merchant_data(base, PUBLIC_MERCHANT).facts))
    model, tokenizer, origin = from_checkpoint(checkpoint, words, seed=3)
    known = len(PreTrainedTokenizerFast.from_pretrained(checkpoint))
    weight = model.get_input_embeddings().weight.detach()
    old = T5ForConditionalGeneration.from_pretrained(checkpoint).get_input_embeddings().weight.detach()
    assert torch.equal(weight[:known], old[:known])  # the checkpoint's tokens keep their rows
    new = weight[tokenizer.convert_tokens_to_ids(words)]
    assert torch.allclose(new.mean(0), old[:known].mean(0), atol=4 * float(old[:known].std()) / len(words) ** 0.5)
    assert torch.allclose(new.std(0).mean(), old[:known].std(0).mean(), rtol=0.2)
    assert torch.cdist(new, new).add(torch.eye(len(new)) * 1e9).min() > 0.1  # every new token starts distinct
    assert origin["base-model"] == str(checkpoint.resolve())


def _broken(checkpoint: Path, tmp: Path, how: str) -> Path:
    copy = tmp / "broken"
    shutil.copytree(checkpoint, copy)
    if how == "no-config":
        (copy / "config.json").unlink()
    elif how == "bad-json":
        (copy / "config.json").write_text("{not json")
    elif how == "bert":
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    elif how == "no-weights":
        (copy / "model.safetensors").unlink()
    elif how == "bad-weights":
        weights = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    elif how == "no-tokenizer":
        (copy / "tokenizer.json").unlink()
    elif how == "bad-tokenizer":
        (copy / "tokenizer.json").write_text('{"model": 3}')
    elif how == "other-pad":
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "pad_token_id": 2, "decoder_start_token_id": 2}))
    return copy


@pytest.mark.parametrize("how, words", [
    ("missing", "is not a directory; expected a local Hugging Face T5 checkpoint directory"),
    ("no-config", "config.json does not exist; expected the checkpoint's model config"),
    ("bad-json", "config.json: unreadable or corrupted"),
    ("bert", "config.json has model_type 'bert'; fedshop trains T5"),
    ("no-weights", "model.safetensors does not exist; expected the checkpoint's weights"),
    ("bad-weights", "model.safetensors: unreadable or corrupted"),
    ("no-tokenizer", "tokenizer.json does not exist; expected the checkpoint's fast tokenizer"),
    ("bad-tokenizer", "tokenizer.json: unreadable or corrupted"),
    ("other-pad", "the checkpoint's tokenizer and model disagree (pad '<pad>' is id 0 in the tokenizer, 2 in"),
])
def test_a_checkpoint_that_is_not_a_usable_t5_is_refused_naming_what_is_wrong(checkpoint, tmp_path, how, words):
    path = tmp_path / "nowhere" if how == "missing" else _broken(checkpoint, tmp_path, how)
    config = FedShopConfig(**TINY, base_model=str(path), base_dir=str(tmp_path / "base"))
    with pytest.raises(UserError, match="config key 'base-model'") as error:
        pretrain(config)
    assert words in str(error.value)
    assert not (tmp_path / "base" / "model.safetensors").exists()


def test_the_cli_names_a_missing_checkpoint_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "server.cli", "pretrain", "--config", str(ROOT / "configs/tiny.toml"),
                           "--set", f"base-model={tmp_path / 'nope'}", "--out", str(tmp_path / "base")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"config key 'base-model' = '{tmp_path / 'nope'}'" in done.stderr


def test_a_base_from_another_origin_is_refused(base, tmp_path):
    meta = read_base_meta(base.base_dir)
    check_base_matches(meta, base)  # its own config passes
    with pytest.raises(UserError, match="pretrained from the checkpoint .* the config asks for base-model"):
        check_base_matches(meta, base.replace(base_model=str(tmp_path)))
    with pytest.raises(UserError, match="pretrained as a fresh T5 `tiny`, the config asks for base-model"):
        check_base_matches({**meta, "model-size": "tiny", "base-model": None}, base)


FRESH = """
import json, sys, torch
from peft import AutoPeftModelForSeq2SeqLM
from transformers import PreTrainedTokenizerFast
out, source = sys.argv[1], sys.argv[2]
tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
batch = tokenizer([source], return_tensors="pt")
model = AutoPeftModelForSeq2SeqLM.from_pretrained(out).eval()
start = torch.tensor([[model.config.decoder_start_token_id]])
with torch.no_grad():
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=start).logits
torch.save(logits[0, 0], out + "/../logits.pt")
"""


@pytest.mark.slow
def test_a_federation_on_the_checkpoint_base_exports_an_adapter_plain_peft_loads(base, checkpoint, sources, tmp_path):
    from server.export import export_run
    from server.predict import Predictor

    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "simulate", "--config", str(ROOT / "configs/tiny.toml"), "--set",
         f"base-dir={base.base_dir}", "--set", f"base-model={checkpoint}", "--run-dir", str(run), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pretraining it" not in done.stderr  # the checkpoint base was used as it is
    assert f"T5 checkpoint `{checkpoint.resolve()}` base" in (run / "report.md").read_text()
    out = export_run(run, tmp_path / "export")
    assert f"base T5 checkpoint `{checkpoint.resolve()}`, pretrained on the public split" in (
        out / "README.md").read_text()
    source = sources[0]
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(out), source], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)  # a fresh interpreter, no fedshop import
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    expected = run_logits(run, source)
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)
    predictor = Predictor(out)
    history = list(predictor.facts.item_ids[:4])
    top = predictor.predict(history, "next-item", 5, [], explain=False)["predictions"]
    assert len(top) == 5 and not {p["item"] for p in top} & set(history)
