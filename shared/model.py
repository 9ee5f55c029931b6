"""T5 size presets, a user's T5 checkpoint, the base directory, and LoRA adapters through PEFT.

A base directory holds `config.json`, `model.safetensors`, the tokenizer and `fedshop_base.json`; every merchant
and the server load the same files, so nobody relies on seeded random init to agree on the base. Pretraining starts
from a fresh preset (`build_base`) or from a local Hugging Face T5 checkpoint (`from_checkpoint`, config key
`base-model`), which is never downloaded.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

from shared.config import FedShopConfig
from shared.errors import UserError
from shared.files import reading, save_pretrained_atomic, sha256
from shared.tokenizer import add_domain_tokens, load_checkpoint_tokenizer
from shared.wide import (
    LINKS_FILE,
    WIDE_FILE,
    WIDE_KEY,
    build_wide,
    read_links,
    read_wide,
    save_links,
    save_wide,
    set_wide_weights,
    wide_of,
)

PRESETS: dict[str, dict[str, int]] = {
    # tests and CI: ~0.1 M parameters besides the embeddings
    "tiny": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=1),
    # the demo: sized so that pretraining and a DP federation fit in minutes on 2 CPU cores
    "small": dict(d_model=128, d_ff=384, d_kv=32, num_heads=4, num_layers=2, num_decoder_layers=2),
    # the shape of Google's t5-small (about 35 M weights besides the embeddings): for machines that can afford it
    "t5-small": dict(d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6, num_decoder_layers=6),
}
BASE_META = "fedshop_base.json"
CHECKPOINT_SIZE = "checkpoint"  # `model-size` in a base's metadata when it was pretrained from base-model
CHECKPOINT_FILES = 'config.json (model_type "t5"), model.safetensors and tokenizer.json'


def build_base(size: str, tokenizer: PreTrainedTokenizerFast, seed: int) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, dropout_rate=0.0, feed_forward_proj="relu",
        relative_attention_num_buckets=16, relative_attention_max_distance=64, **PRESETS[size],
    )
    return T5ForConditionalGeneration(config)


def check_checkpoint(directory: str | Path) -> Path:
    """The resolved directory of config key base-model, or a UserError naming the file that is missing or wrong."""
    path = Path(directory).expanduser().resolve()
    where = f"config key 'base-model' = {str(directory)!r}"
    if not path.is_dir():
        raise UserError(f"{where}: {path} is not a directory; expected a local Hugging Face T5 checkpoint directory "
                        f"holding {CHECKPOINT_FILES} (fedshop never downloads models)")
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{where}: {config} does not exist; expected the checkpoint's model config "
                        '(config.json with model_type "t5")')
    with naming(where):
        model_type = read_json_object(config, 'a Hugging Face model config with model_type "t5"').get("model_type")
    if model_type != "t5":
        raise UserError(f"{where}: {config} has model_type {model_type!r}; fedshop trains T5 "
                        '(T5ForConditionalGeneration, model_type "t5")')
    weights = path / "model.safetensors"
    if not weights.is_file():
        other = [p.name for p in (path / "pytorch_model.bin", path / "model.safetensors.index.json") if p.is_file()]
        hint = (f" ({other[0]} is not read: save the model once with save_pretrained(DIR, max_shard_size=\"100GB\") "
                "to get one safetensors file)") if other else ""
        raise UserError(f"{where}: {weights} does not exist; expected the checkpoint's weights as one safetensors "
                        f"file{hint}")
    with naming(where):
        check_safetensors(weights, "the checkpoint's T5 weights")
    if not (path / "tokenizer.json").is_file():
        raise UserError(f"{where}: {path / 'tokenizer.json'} does not exist; expected the checkpoint's fast "
                        "tokenizer (a checkpoint with only spiece.model: load it once with AutoTokenizer and "
                        "save_pretrained it to write tokenizer.json)")
    return path


@contextmanager
def naming(where: str) -> Iterator[None]:
    """A UserError raised inside (a file named as unreadable) says first which config key led to the file."""
    try:
        yield
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def from_checkpoint(directory: str | Path, tokens: list[str], seed: int
                    ) -> tuple[T5ForConditionalGeneration, PreTrainedTokenizerFast, dict]:
    """A local T5 checkpoint and its tokenizer, grown by fedshop's domain `tokens`, and its origin for the base's
    metadata (`base-model`, `base-model-sha256` of its weights, `model-size` "checkpoint").

    Each domain token is a whole-word added token (`add_domain_tokens`); the embeddings grow to the tokenizer (never
    shrink: T5 checkpoints carry unused rows past their vocabulary), and each new token's row is drawn like the
    checkpoint's own rows: their per-dimension mean plus Gaussian noise of their per-dimension spread, so new tokens
    start distinct, at the scale of known ones (pretraining then starts each item near its category)."""
    path = check_checkpoint(directory)
    where = f"config key 'base-model' = {str(directory)!r}"
    hf_logging.disable_progress_bar()
    with naming(where), reading(path / "model.safetensors", "T5 weights matching the checkpoint's config.json"):
        model, info = T5ForConditionalGeneration.from_pretrained(path, local_files_only=True, output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise UserError(f"{where}: {path / 'model.safetensors'} lacks {len(missing)} weight(s) of the T5 its "
                        f"config.json describes (e.g. {', '.join(missing[:3])}); expected a complete checkpoint")
    tokenizer = load_checkpoint_tokenizer(path, where)
    known = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])  # rows of the checkpoint's tokens
    new_ids = add_domain_tokens(tokenizer, tokens)
    model.resize_token_embeddings(max(len(tokenizer), model.get_input_embeddings().weight.shape[0]),
                                  mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    weights = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    with torch.no_grad():
        for weight in weights.values():  # one tensor when lm_head is tied to the input embedding
            rows = weight[:known]
            noise = torch.randn((len(new_ids), weight.shape[1]), generator=generator, dtype=weight.dtype)
            weight[new_ids] = rows.mean(0) + rows.std(0) * noise
    check_special_ids(model, tokenizer, where)
    origin = {"model-size": CHECKPOINT_SIZE, "base-model": str(path),
              "base-model-sha256": sha256(path / "model.safetensors")}
    return model, tokenizer, origin


def check_special_ids(model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, where: str) -> None:
    """The ids shared/modeling.py relies on: the tokenizer's pad and end of sequence are the model config's, and
    the decoder starts from a token of the vocabulary (T5: pad; set to pad when the config names none)."""
    config = model.config
    if getattr(config, "decoder_start_token_id", None) is None:
        config.decoder_start_token_id = config.pad_token_id
    differ = []
    for role in ("pad", "eos"):
        mine, theirs = getattr(tokenizer, f"{role}_token_id"), getattr(config, f"{role}_token_id", None)
        if mine != theirs:
            differ.append(f"{role} {getattr(tokenizer, f'{role}_token')!r} is id {mine} in the tokenizer, {theirs} in "
                          "config.json")
    start = config.decoder_start_token_id
    if start is None or not 0 <= start < model.get_input_embeddings().weight.shape[0]:
        differ.append(f"decoder_start_token_id {start} is not a token id")
    if differ:
        raise UserError(f"{where}: the checkpoint's tokenizer and model disagree ({'; '.join(differ)}); expected "
                        "the tokenizer saved with this model")


def save_base(model: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerFast, directory: str | Path,
              meta: dict, wide=None, links: dict | None = None) -> None:
    """The base's T5, tokenizer and metadata, the wide part pretrained with it (`WIDE_FILE`) and the public split's
    item-to-item counts its link term reads (`LINKS_FILE`); an earlier base's are removed when there are none."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_logging.disable_progress_bar()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if wide is not None:
        save_wide(wide, directory)
    else:
        (directory / WIDE_FILE).unlink(missing_ok=True)
    if links is not None:
        save_links(links, directory)
    else:
        (directory / LINKS_FILE).unlink(missing_ok=True)
    (directory / BASE_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def base_exists(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file() and (
        directory / BASE_META).is_file()


def read_base_meta(directory: str | Path) -> dict:
    """`fedshop_base.json` of a base directory, without loading the model."""
    directory = Path(directory)
    if not base_exists(directory):
        raise UserError(f"base directory {directory} is missing or incomplete (needs config.json, "
                        f"model.safetensors, {BASE_META}); run `fedshop pretrain` to create it")
    return read_json_object(directory / BASE_META, "the base's metadata written by `fedshop pretrain`")


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object file, or a UserError naming it."""
    with reading(path, f"{what} (a JSON object)"):
        value = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def check_safetensors(path: Path, what: str) -> None:
    """UserError naming `path` unless it is a complete safetensors file (its header parses and covers the file)."""
    from safetensors import safe_open

    with reading(path, f"{what} (a complete safetensors file)"), safe_open(str(path), framework="pt") as handle:
        list(handle.keys())


BASE_WIDE = "fedshop_wide"  # a loaded base's attribute: the wide part pretrained with it (WIDE_FILE in its directory)
BASE_LINKS = "fedshop_links"  # a loaded base's attribute: its public item-to-item counts (LINKS_FILE)


def load_base(directory: str | Path) -> tuple[T5ForConditionalGeneration, PreTrainedTokenizerFast, dict]:
    directory = Path(directory)
    meta = read_base_meta(directory)
    hf_logging.disable_progress_bar()  # a merchant loads the base every round: no progress bars in the logs
    check_base_files(directory)
    with reading(directory / "model.safetensors", "the base's T5 weights matching config.json"):
        model = T5ForConditionalGeneration.from_pretrained(directory)
    tokenizer = load_tokenizer(directory)
    model.eval()
    attach_wide_parts(model, directory)
    return model, tokenizer, meta


def attach_wide_parts(model: T5ForConditionalGeneration, directory: Path) -> None:
    """Give a base's T5 what its directory keeps for the wide part, where present: the weights pretrained with it
    (`WIDE_FILE`: where a model's wide part starts) and the public item-to-item counts (`LINKS_FILE`)."""
    if (directory / WIDE_FILE).is_file():
        with reading(directory / WIDE_FILE, "the base's wide part (a complete safetensors file)"):
            setattr(model, BASE_WIDE, read_wide(directory)[WIDE_KEY])
    if (directory / LINKS_FILE).is_file():
        with reading(directory / LINKS_FILE, "the base's item-to-item counts (a complete safetensors file)"):
            setattr(model, BASE_LINKS, read_links(directory))


def base_wide(base: torch.nn.Module) -> torch.Tensor | None:
    """The wide part's weights a base was pretrained with (`load_base`), or None."""
    return getattr(base, BASE_WIDE, None)


def check_base_files(directory: Path) -> None:
    """UserError naming the file unless a base's model config and weights are readable."""
    read_json_object(directory / "config.json", "the T5 model config")
    check_safetensors(directory / "model.safetensors", "the base's T5 weights")


def load_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """The tokenizer saved in `directory` (a base or an export), or a UserError naming its file."""
    with reading(directory / "tokenizer.json", "the tokenizer saved with the base"):
        return PreTrainedTokenizerFast.from_pretrained(directory)


def check_adapter_dir(directory: Path) -> None:
    """UserError naming the file unless `directory` holds a readable PEFT adapter (config and weights)."""
    read_json_object(directory / "adapter_config.json", "PEFT's adapter config")
    check_safetensors(directory / "adapter_model.safetensors", "the LoRA adapter's weights")


EMBED_TARGET = "encoder.embed_tokens"  # `embed`: the encoder's input embedding (the decoder only reads its start token)


def lora_config(config: FedShopConfig) -> LoraConfig:
    targets = [EMBED_TARGET if t == "embed" else t for t in config.lora_target_list]
    return LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=config.lora_r, lora_alpha=config.lora_alpha,
                      lora_dropout=config.lora_dropout, target_modules=targets, bias="none")


@contextmanager
def quiet_peft() -> Iterator[None]:
    """PEFT's two warnings on wrapping or loading a fedshop adapter, which no user can act on."""
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5.x a deprecated question while wrapping
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        # lm_head as a target: its LoRA is a separate delta, the tied base weight is never changed or saved here,
        # and `fedshop export --merge` refuses such an adapter, so PEFT's note on merging tied weights does not apply
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings=True.* and a tied layer is part of the")
        yield


def load_saved_adapter(base: T5ForConditionalGeneration, tokenizer: PreTrainedTokenizerFast,
                       directory: str | Path, facts=None) -> PeftModel:
    """A saved adapter on `base` as plain PEFT loads it, plus its wide part when one is saved beside it (which
    scores next-item questions given the catalogue's `facts`)."""
    with quiet_peft():
        model = PeftModel.from_pretrained(base, str(directory))
    load_saved_wide(model, tokenizer, directory, facts)
    return model


def add_lora(base: T5ForConditionalGeneration, config: FedShopConfig, seed: int | None = None,
             tokenizer: PreTrainedTokenizerFast | None = None, facts=None) -> PeftModel:
    """Wrap the base with LoRA; only LoRA tensors train (embeddings, lm_head, relative bias stay frozen). With
    `wide` the model also gets its wide part (`shared.wide`; at the base's pretrained weights, zero for a base
    without them), which reads the base's `tokenizer` and, for next-item questions, the catalogue's `facts` (which
    item has which category). A base pretrained with its wide part is refused without it: its T5 alone is half a
    model."""
    if seed is not None:
        torch.manual_seed(seed)
    with quiet_peft():
        model = get_peft_model(base, lora_config(config))
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and "lora_" not in name:
            raise RuntimeError(f"non-LoRA parameter {name} is trainable")
    if config.wide:
        if tokenizer is None:
            raise ValueError("wide = true: add_lora needs the base's tokenizer")
        model.wide = build_wide(tokenizer, base.get_input_embeddings().num_embeddings, facts,
                                start=base_wide(base), links=getattr(base, BASE_LINKS, None)).to(base.device)
    elif base_wide(base) is not None:
        raise ValueError("this base was pretrained with its wide part: build its model with wide = true")
    return model


def load_saved_wide(model: PeftModel, tokenizer: PreTrainedTokenizerFast, directory: str | Path, facts=None) -> None:
    """Give a model loaded with plain PEFT (`PeftModel.from_pretrained`) the wide part saved beside its adapter in
    `directory`, if there is one (with the catalogue's `facts` it scores next-item questions too)."""
    saved = read_wide(Path(directory))
    if saved:
        base = model.get_base_model()
        head = build_wide(tokenizer, model.get_input_embeddings().num_embeddings, facts,
                          start=base_wide(base), links=getattr(base, BASE_LINKS, None))
        set_wide_weights(head, saved[WIDE_KEY])
        model.wide = head.to(next(model.parameters()).device)


def save_adapter(model: PeftModel, directory: str | Path) -> Path:
    """PEFT's adapter files and, with a wide part, `WIDE_FILE` beside them, each replaced atomically."""
    head = wide_of(model)
    return save_pretrained_atomic(model, directory, also=None if head is None else lambda d: save_wide(head, d))


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The tensors that travel: exactly `get_peft_model_state_dict`, without the frozen base embedding that PEFT
    would otherwise add when `lm_head` (tied to it) is a target (`save_embedding_layers`)."""
    state = {k: v.detach().cpu().clone().contiguous()  # on the CPU, whatever the model's device: they travel
             for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    head = wide_of(model)
    if head is not None:
        state[WIDE_KEY] = head.table.weight.detach().cpu().clone().contiguous()
    return state


def is_frozen_key(key: str, aggregation: str) -> bool:
    """Whether the adapter tensor `key` stays at its shared initialisation under `aggregation`.

    FFA-LoRA freezes the factor PEFT initialises at random and trains the one it initialises at zero: a linear
    layer's lora_A (B starts at zero), and an embedding's lora_embedding_B (there A, the per-token coordinates,
    starts at zero)."""
    return aggregation == "ffa" and ("lora_A" in key or "lora_embedding_B" in key)


def freeze_for(model: PeftModel, aggregation: str) -> None:
    """Stop gradients on the tensors `aggregation` keeps frozen (`is_frozen_key`), so neither the optimizer nor
    Opacus sees them: DP-SGD then clips and noises B alone."""
    for name, parameter in model.named_parameters():
        if is_frozen_key(name, aggregation):
            parameter.requires_grad_(False)


def uplink_state(model: PeftModel, aggregation: str) -> dict[str, torch.Tensor]:
    """The adapter tensors a merchant sends back: all of `adapter_state`, except the frozen ones under ffa."""
    return {k: v for k, v in adapter_state(model).items() if not is_frozen_key(k, aggregation)}


def item_rows(tokenizer, facts) -> list[int]:
    """Vocabulary rows of the items (their tokens, or with semantic ids the ids' code tokens): the only rows of an
    `lm_head` or `embed` LoRA that train (`keep_item_rows`)."""
    tokens = list(facts.code_tokens) if facts.semantic else list(facts.item_ids)
    return sorted(set(tokenizer.convert_tokens_to_ids(tokens)))


def keep_item_rows(model: PeftModel, rows: list[int] | None) -> None:
    """Hold the LoRA weights of every vocabulary token except `rows` at zero: the rows of the output layer's
    lora_B and the columns of the input embedding's lora_embedding_A (no-op without such a LoRA, or rows None).

    These two give each vocabulary token its own weights; only the items' should move. The other tokens (yes/no,
    task words, categories, bands) are shared by every example, and under DP the noise on their weights shifts every
    task's calibration without teaching any. Applied after every optimizer step: zeroing coordinates of a released
    (noised) update is post-processing, so it costs no privacy.
    """
    if rows is None:
        return
    for name, parameter in model.named_parameters():
        token_dim = _token_dim(name)
        if token_dim is not None:
            with torch.no_grad():
                _zero_other_tokens(parameter, token_dim, rows)


def _token_dim(name: str) -> int | None:
    """The vocabulary dimension of a LoRA tensor that gives each token its own weights (None for any other)."""
    if "lm_head" in name and "lora_B" in name:
        return 0
    return 1 if "lora_embedding_A" in name else None


def _zero_other_tokens(tensor: torch.Tensor, token_dim: int, rows: list[int]) -> None:
    mask = torch.ones(tensor.shape[token_dim], dtype=torch.bool, device=tensor.device)
    mask[rows] = False
    tensor.index_fill_(token_dim, torch.nonzero(mask).flatten(), 0.0)


def mask_grad_samples(model: PeftModel, rows: list[int] | None) -> None:
    """Zero, in every per-sample gradient, the vocabulary rows that `keep_item_rows` holds at zero: DP-SGD then
    clips (and spends its clipping norm on) only the weights that can move."""
    if rows is None:
        return
    for name, parameter in model.named_parameters():
        sample, token_dim = getattr(parameter, "grad_sample", None), _token_dim(name)
        if sample is not None and token_dim is not None:
            _zero_other_tokens(sample, token_dim + 1, rows)  # a grad sample's first dimension is the sample


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    state = dict(state)
    head, wide = wide_of(model), state.pop(WIDE_KEY, None)
    if (head is None) != (wide is None):
        raise ValueError(f"adapter keys differ: the model {'has no' if head is None else 'has a'} wide part, the "
                         f"adapter {'has' if head is None else 'has no'} {WIDE_KEY}")
    if head is not None:
        set_wide_weights(head, wide)
    expected = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    if set(state) != expected:
        raise ValueError(f"adapter keys differ: missing {sorted(expected - set(state))[:3]}, "
                         f"unexpected {sorted(set(state) - expected)[:3]}")
    result = set_peft_model_state_dict(model, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter tensors not loaded: {unexpected[:3]}")


def read_adapter(run_dir: str | Path, folder: str = "adapter") -> dict[str, torch.Tensor]:
    """The final global adapter of a run directory (or the one in `folder`, e.g. a round's checkpoint), as
    `adapter_state` tensors."""
    from safetensors.torch import load_file

    path = Path(run_dir) / folder / "adapter_model.safetensors"
    if not path.is_file():
        raise UserError(f"{path} does not exist: {run_dir} is not a finished fedshop run")
    with reading(path, "the LoRA adapter's weights (a complete safetensors file)"):
        state = load_file(str(path))
    with reading(path.with_name(WIDE_FILE), "the wide part's weights (a complete safetensors file)"):
        return {**state, **read_wide(path.parent)}
