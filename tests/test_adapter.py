"""The adapter a run writes is plain PEFT: it loads on the base with `PeftModel.from_pretrained`, same logits."""

import pytest
import torch
from peft import PeftModel
from transformers import T5ForConditionalGeneration

from shared.data import check_base_matches, merchant_data
from shared.errors import UserError
from shared.model import adapter_state, add_lora, load_adapter_state, load_base, read_base_meta
from shared.modeling import encode, first_step_logits


def test_saved_adapter_reloads_with_plain_peft_and_gives_the_same_logits(tiny_base, tmp_path):
    config = tiny_base
    base, tokenizer, _ = load_base(config.base_dir)
    model = add_lora(base, config, seed=3)
    # a non-trivial adapter: B is zero at init, so give every LoRA tensor random values
    state = {k: torch.randn_like(v) * 0.1 for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    model.save_pretrained(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json", "adapter_model.safetensors"]

    reloaded = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(config.base_dir),
                                         tmp_path / "adapter")
    batch = encode(merchant_data(config, "m0").test[:16], tokenizer)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        expected = first_step_logits(model, batch.input_ids, batch.attention_mask)
        actual = first_step_logits(reloaded, batch.input_ids, batch.attention_mask)
        plain = first_step_logits(T5ForConditionalGeneration.from_pretrained(config.base_dir), batch.input_ids,
                                  batch.attention_mask)
    assert torch.allclose(expected, actual, atol=1e-5)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the adapter really changes the model


def test_a_base_pretrained_for_another_catalogue_is_refused(tiny_base):
    meta = read_base_meta(tiny_base.base_dir)
    check_base_matches(meta, tiny_base)  # its own config passes
    with pytest.raises(UserError, match=r"num-items = 60 in the base, 61 in the config"):
        check_base_matches(meta, tiny_base.replace(num_items=61))
    meta["catalogue-sha256"] = "0" * 64  # a base from an older generator with the same sizes and seed
    with pytest.raises(UserError, match="predates this version of the data generator"):
        check_base_matches(meta, tiny_base)


def test_an_lm_head_adapter_carries_only_lora_tensors_and_reloads_with_plain_peft(tiny_base, tmp_path):
    # Prepare: LoRA on the output layer too (lm_head is tied to the input embedding)
    from safetensors.torch import load_file

    from shared.files import save_pretrained_atomic

    config = tiny_base.replace(lora_targets="q,v,lm_head")
    base, tokenizer, _ = load_base(config.base_dir)
    model = add_lora(base, config, seed=3)
    state = {k: torch.randn_like(v) * 0.1 for k, v in adapter_state(model).items()}
    load_adapter_state(model, state)
    # Execute
    save_pretrained_atomic(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    reloaded = PeftModel.from_pretrained(T5ForConditionalGeneration.from_pretrained(config.base_dir),
                                         tmp_path / "adapter")
    # Assert: only LoRA tensors travel and are saved (no copy of the frozen base embedding), the lm_head's B has one
    # row per vocabulary token, and plain PEFT reproduces the logits
    assert all("lora_" in key for key in state) and all("lora_" in key for key in saved)
    assert any("lm_head.lora_B" in key and value.shape == (len(tokenizer), config.lora_r)
               for key, value in state.items())
    batch = encode(merchant_data(config, "m0").test[:8], tokenizer)
    model.eval(), reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(first_step_logits(model, batch.input_ids, batch.attention_mask),
                              first_step_logits(reloaded, batch.input_ids, batch.attention_mask), atol=1e-5)
