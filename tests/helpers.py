"""Small builders for tests: tiny T5 models with LoRA, built in-process from a local tokenizer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from shared.config import FedShopConfig
from shared.data import merchant_data, vocabulary
from shared.model import add_lora, build_base
from shared.modeling import Encoded
from shared.synthetic import generate
from shared.tokenizer import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def simulate_command(run_dir: Path, *sets: str, config: Path = ROOT / "configs/tiny.toml",
                     options: tuple[str, ...] = ()) -> list[str]:
    """`fedshop simulate --config CONFIG --run-dir RUN_DIR --no-progress OPTIONS --set S...`"""
    return [sys.executable, "-m", "server.cli", "simulate", "--config", str(config), "--run-dir", str(run_dir),
            "--no-progress", *options, *(a for s in sets for a in ("--set", s))]


def simulate(run_dir: Path, *sets: str, config: Path = ROOT / "configs/tiny.toml", timeout: float = 900,
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`fedshop simulate` (`simulate_command`) run as a user runs it."""
    return subprocess.run(simulate_command(run_dir, *sets, config=config, options=options), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def ray_processes_of(pid: int) -> list[str]:
    """The Ray processes (raylet, GCS server) still running of the Ray session that process `pid` started: Ray names
    a session's directory `session_<date>_<time>_<pid of its driver>`, and both name that directory in their
    arguments. Other processes' simulations (a parallel test worker's) never match."""
    session = re.compile(rf"/session_[0-9_-]+_{pid}/")
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()
            if ("raylet" in line or "gcs_server" in line) and session.search(line)]


def run_logits(run: Path, source: str) -> torch.Tensor:
    """First-step logits of `source` from a finished run's base and final adapter, loaded the fedshop way."""
    from shared.config import load_config
    from shared.model import load_adapter_state, load_base, read_adapter

    config = load_config(run / "config.toml")
    base, tokenizer, _ = load_base(config.base_dir)
    model = add_lora(base, config, tokenizer=tokenizer)
    load_adapter_state(model, read_adapter(run))
    model.eval()
    batch = tokenizer([source], return_tensors="pt")
    start = torch.tensor([[base.config.decoder_start_token_id]])
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     decoder_input_ids=start).logits[0, 0]


def tiny_lora_model(config: FedShopConfig, seed: int = 0):
    data = generate(config)
    merchant = merchant_data(config, "m0", data)
    tokenizer = build_tokenizer(*vocabulary(merchant.facts))
    model = add_lora(build_base(config.model_size, tokenizer, seed=seed), config, seed=seed, tokenizer=tokenizer,
                     facts=merchant.facts)
    return model, tokenizer, merchant


def nonzero_lora(model, *factors: str) -> None:
    """Draw the LoRA tensors whose names hold any of `factors` (default: every lora_B, zero at PEFT's init) from
    N(0, 0.05), so that every LoRA tensor has a non-zero gradient."""
    factors = factors or ("lora_B",)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f in name for f in factors):
                p.normal_(0.0, 0.05)


def first(encoded: Encoded, n: int) -> Encoded:
    return Encoded(encoded.input_ids[:n], encoded.attention_mask[:n], encoded.target_ids[:n])


def lora_parameters(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_opacus_per_sample_gradients_exact(model, batch: Encoded) -> None:
    """Opacus' hooks-mode per-sample gradients of `batch` equal the gradients of one example at a time."""
    from shared.lora_grad import LoraGradSampleModule
    from shared.modeling import per_sample_loss

    wrapped = LoraGradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    per_sample_loss(wrapped, batch.input_ids, batch.attention_mask, batch.target_ids).mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    per_sample = {n: p.grad_sample.clone() for n, p in trainable}
    for _, p in trainable:
        p.grad_sample, p.grad = None, None
    wrapped.disable_hooks()
    for i in range(len(batch)):
        model.zero_grad(set_to_none=True)
        per_sample_loss(model, batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1],
                        batch.target_ids[i:i + 1]).mean().backward()
        for n, p in trainable:
            assert torch.allclose(per_sample[n][i], p.grad, atol=1e-6, rtol=1e-4), n
    wrapped.enable_hooks()
    wrapped._close()
    model.zero_grad(set_to_none=True)
