"""Small builders for tests: tiny T5 models with LoRA, built in-process from a local tokenizer."""

from __future__ import annotations

import torch

from shared.config import FedShopConfig
from shared.data import merchant_data, vocabulary
from shared.model import add_lora, build_base
from shared.modeling import Encoded
from shared.synthetic import generate
from shared.tokenizer import build_tokenizer


def tiny_lora_model(config: FedShopConfig, seed: int = 0):
    data = generate(config)
    merchant = merchant_data(config, "m0", data)
    tokenizer = build_tokenizer(*vocabulary(merchant.facts))
    model = add_lora(build_base("tiny", tokenizer, seed=seed), config, seed=seed)
    return model, tokenizer, merchant


def first(encoded: Encoded, n: int) -> Encoded:
    return Encoded(encoded.input_ids[:n], encoded.attention_mask[:n], encoded.target_ids[:n])


def lora_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
