"""A merchant's local round: DP-SGD on the LoRA tensors with Opacus, accountant history carried across rounds.

Plain PyTorch + Opacus, no Flower: the ClientApp translates messages into a call of `train_round`.

Privacy bookkeeping, in order:
1. the noise multiplier is calibrated once, from (target-epsilon, target-delta) over the whole planned schedule
   (num-rounds x local steps per round), and kept in the merchant's state;
2. before training, the accountant's history plus this round's steps is checked against the budget; a round that
   would exceed it is declined, nothing is trained;
3. Opacus's accountant starts from the stored history, so the epsilon reported after the round is the composition
   over every round this merchant took part in.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from torch.utils.data import DataLoader, TensorDataset

from shared.config import FedShopConfig
from shared.modeling import Encoded, per_sample_loss

STATUS_TRAINED, STATUS_DECLINED = "trained", "declined"


@dataclass
class PrivacyState:
    """What a merchant must remember between rounds (kept in Flower's `context.state`)."""

    noise_multiplier: float | None = None
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (noise_multiplier, sample_rate, steps)


@dataclass
class RoundResult:
    status: str
    num_examples: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon: float  # composed over all rounds so far (inf without DP)
    delta: float
    train_loss: float


def schedule(num_examples: int, config: FedShopConfig) -> tuple[float, int]:
    """(Poisson sample rate, DP-SGD steps per round), as Opacus's DPDataLoader derives them from a batch size."""
    batches = max(1, math.ceil(num_examples / config.batch_size))
    return 1.0 / batches, config.local_epochs * batches


def epsilon_of(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    engine = create_accountant(accountant)
    engine.history = list(history)
    return float(engine.get_epsilon(delta=delta))


def calibrate(num_examples: int, config: FedShopConfig) -> float:
    """Noise multiplier meeting the budget after all planned rounds (every round this merchant could take part in)."""
    sample_rate, steps = schedule(num_examples, config)
    return float(get_noise_multiplier(target_epsilon=config.target_epsilon, target_delta=config.target_delta,
                                      sample_rate=sample_rate, steps=steps * config.num_rounds,
                                      accountant=config.accountant))


def train_round(model: torch.nn.Module, data: Encoded, config: FedShopConfig, state: PrivacyState,
                *, seed: int) -> RoundResult:
    """Train the LoRA tensors of `model` in place for one round; updates `state` with this round's steps."""
    torch.manual_seed(seed)
    sample_rate, steps = schedule(len(data), config)
    if not config.dp:
        loss = _train_plain(model, data, config, steps, seed)
        return RoundResult(STATUS_TRAINED, len(data), steps, sample_rate, 0.0, math.inf, config.target_delta, loss)
    if state.noise_multiplier is None:
        state.noise_multiplier = calibrate(len(data), config)
    noise = state.noise_multiplier
    planned = [*state.history, (noise, sample_rate, steps)]
    spent_before = epsilon_of(state.history, config.target_delta, config.accountant)
    if epsilon_of(planned, config.target_delta, config.accountant) > config.target_epsilon:
        return RoundResult(STATUS_DECLINED, 0, 0, sample_rate, noise, spent_before, config.target_delta, math.nan)

    model.train()  # Opacus refuses a module in eval mode
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    with warnings.catch_warnings():
        # Expected with a frozen base under Opacus hooks, and not actionable by a user: the hooks fire on module
        # outputs because the base's inputs need no gradient. Opacus's own secure-RNG advice is left visible.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        losses = _private_loop(model, trainable, optimizer, data, config, state, noise, seed)
    epsilon = epsilon_of(state.history, config.target_delta, config.accountant)
    return RoundResult(STATUS_TRAINED, len(data), steps, sample_rate, noise, epsilon, config.target_delta,
                       float(sum(losses) / max(1, len(losses))))


def _train_plain(model: torch.nn.Module, data: Encoded, config: FedShopConfig, steps: int, seed: int) -> float:
    """The non-private comparison: same optimiser and number of steps, shuffled batches, no clipping or noise."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    order = torch.randperm(len(data), generator=generator)
    batches = max(1, math.ceil(len(data) / config.batch_size))
    for step in range(steps):
        if step % batches == 0 and step:
            order = torch.randperm(len(data), generator=generator)
        idx = order[(step % batches) * config.batch_size:((step % batches) + 1) * config.batch_size]
        loss = per_sample_loss(model, data.input_ids[idx], data.attention_mask[idx], data.target_ids[idx]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return float(sum(losses) / max(1, len(losses)))


def _private_loop(model: torch.nn.Module, trainable: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                  data: Encoded, config: FedShopConfig, state: PrivacyState, noise: float, seed: int) -> list[float]:
    """Opacus DP-SGD over Poisson batches; leaves the composed accountant history in `state`."""
    loader = DataLoader(TensorDataset(data.input_ids, data.attention_mask, data.target_ids),
                        batch_size=config.batch_size, generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant=config.accountant, secure_mode=False)
    engine.accountant.history = list(state.history)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise,
        max_grad_norm=config.max_grad_norm, poisson_sampling=True, grad_sample_mode="hooks",
    )
    private_model.train()
    losses: list[float] = []
    for _ in range(config.local_epochs):
        for input_ids, attention_mask, target_ids in private_loader:
            private_optimizer.zero_grad(set_to_none=True)
            if len(target_ids) == 0:
                # Poisson sampling drew nobody. T5 cannot run on an empty batch, but the step must still happen:
                # zero per-sample gradients, then Opacus adds the noise and the accountant counts the step.
                for p in trainable:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            else:
                loss = per_sample_loss(private_model, input_ids, attention_mask, target_ids).mean()
                loss.backward()
                losses.append(float(loss.detach()))
            private_optimizer.step()
    private_model.remove_hooks()
    state.history = [tuple(entry) for entry in engine.accountant.history]  # type: ignore[misc]
    return losses
