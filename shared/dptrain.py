"""A merchant's local round: DP-SGD on the LoRA tensors with Opacus, accountant history carried across rounds.

Plain PyTorch + Opacus, no Flower: the ClientApp translates messages into a call of `train_round`, and the server's
reference runs (`server/references.py`) call it directly.

Privacy bookkeeping, in order:
1. records are examples (unit `event`) or shoppers (unit `shopper`); every step Poisson-samples records, and a
   sampled shopper contributes exactly one of their examples, so no shopper appears twice in a batch;
2. the noise multiplier is calibrated once, from (target-epsilon, target-delta) over the whole planned schedule
   (num-rounds x local steps per round), and kept in the merchant's state;
3. before training, the accountant's history plus this round's steps is checked against the budget; a round that
   would exceed it is declined, nothing is trained;
4. Opacus's accountant starts from the stored history, so the epsilon reported after the round is the composition
   over every round this merchant took part in.

The pieces are Opacus's own (`GradSampleModule` in hooks mode, extended in `shared.lora_grad` to PEFT's LoRA
embedding, `DPOptimizer`, an accountant hooked on the optimizer's step); only the batch sampler is fedshop's, because
Opacus's Poisson loader samples examples, not shoppers.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from opacus.optimizers import DPOptimizer

from shared.config import FedShopConfig
from shared.ledger import STATUS_DECLINED, STATUS_TRAINED
from shared.lora_grad import LoraGradSampleModule
from shared.model import freeze_for, keep_item_rows, mask_grad_samples
from shared.modeling import Encoded, model_device, per_sample_loss, width_groups
from shared.privacy import History, PoissonSampler, PrivacyBudget, Uniform, accountant_for, history_of, records_of
from shared.privacy import schedule as _schedule
from shared.wide import wide_of


@dataclass
class PrivacyState:
    """What a merchant must remember between rounds (kept in Flower's `context.state`)."""

    noise_multiplier: float | None = None
    history: History = field(default_factory=list)  # Opacus's (noise_multiplier, sample_rate, steps) entries


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
    # wall time of the step loop (under DP-SGD with Opacus wrapping the model for it), not of loading or encoding;
    # 0.0 for a declined round
    train_seconds: float = 0.0


def schedule(num_records: int, config: FedShopConfig) -> tuple[float, int]:
    """(Poisson sample rate, DP-SGD steps per round) for `num_records` records (examples or shoppers)."""
    return _schedule(num_records, config.batch_size, config.local_epochs)


def records_for(num_examples: int, owners: Sequence[str] | None, config: FedShopConfig) -> list[list[int]]:
    """The privacy records of a merchant's training examples (see `shared.privacy.records_of`): shoppers for the
    shopper unit, also in its non-private twin (dp = false: the same sampler and steps), else examples."""
    if by_shopper(config):
        if owners is None or len(owners) != num_examples:
            raise ValueError("the shopper unit needs the shopper of every training example")
        return records_of(owners, "shopper")
    return records_of([""] * num_examples, "event")


def by_shopper(config: FedShopConfig) -> bool:
    """Whether steps sample shoppers (the shopper unit with DP-SGD, or the same schedule without DP)."""
    return config.privacy_unit == "shopper" and (config.local_dp or not config.dp)


def calibrate(num_records: int, config: FedShopConfig) -> float:
    """Noise multiplier meeting the budget after all planned rounds (every round this merchant could take part in)."""
    sample_rate, steps = schedule(num_records, config)
    return PrivacyBudget.for_merchants(config).calibrate(sample_rate, steps * config.num_rounds)


def admit(state: PrivacyState, num_records: int, config: FedShopConfig) -> bool:
    """Whether this round's DP-SGD steps fit the budget on top of `state.history` (calibrating on first use).

    The check is the only gate, so it holds under any schedule: more rounds than planned, a merchant joining late,
    or a history carried over from an earlier run.
    """
    if state.noise_multiplier is None:
        state.noise_multiplier = calibrate(num_records, config)
    sample_rate, steps = schedule(num_records, config)
    return PrivacyBudget.for_merchants(config).admits(state.history, (state.noise_multiplier, sample_rate, steps))


def charged_ahead(state: PrivacyState, num_examples: int, owners: Sequence[str] | None, config: FedShopConfig
                  ) -> PrivacyState | None:
    """The state with this round's DP-SGD steps already charged, as `train_round` will leave it if it runs to the
    end; None when the round takes no accounted steps (no local DP, or declined). A merchant saves this before it
    trains (write-ahead), so a round that crashes after its first noised step still counts in its own history."""
    if not config.local_dp:
        return None
    records = records_for(num_examples, owners, config)
    if not admit(state, len(records), config):
        return None
    assert state.noise_multiplier is not None  # admit() calibrates it
    sample_rate, steps = schedule(len(records), config)
    return PrivacyState(state.noise_multiplier, [*state.history, (state.noise_multiplier, sample_rate, steps)])


def train_round(model: torch.nn.Module, data: Encoded, config: FedShopConfig, state: PrivacyState,
                *, seed: int, owners: Sequence[str] | None = None, output_rows: list[int] | None = None
                ) -> RoundResult:
    """Train the LoRA tensors of `model` in place for one round; updates `state` with this round's steps.

    `output_rows`: with LoRA on lm_head, the vocabulary rows (the items', `shared.model.item_rows`) whose output
    weights may move; every other row is held at zero after each step (`keep_item_rows`). None: all rows train.

    `owners[i]` is the shopper of example i (needed for the shopper unit). With aggregation = ffa the lora_A tensors
    are frozen first, so only B trains and DP-SGD clips and noises B alone (the trainable tensors are exactly those
    with `requires_grad`). Training runs on the model's device (config key `device`): `data` stays on the CPU and
    each sampled batch moves there.
    """
    freeze_for(model, config.aggregation)
    head = wide_of(model)
    if head is not None:
        head.train_only(config.train_task_list, output_rows, config.wide_dense_step, config.wide_item_step)
    torch.manual_seed(seed)
    records = records_for(len(data), owners, config)
    sample_rate, steps = schedule(len(records), config)
    uniform = Uniform(seed, secure=config.secure_mode and config.local_dp)
    sampler = PoissonSampler(records, sample_rate, uniform, config.examples_per_shopper if by_shopper(config) else 1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    if not config.local_dp:
        started = time.perf_counter()
        loss = _train_plain(model, data, optimizer, sampler, steps, output_rows, config.train_precision,
                            row_task_weights(data, config.train_weights))
        return RoundResult(STATUS_TRAINED, len(data), steps, sample_rate, 0.0, math.inf, config.target_delta, loss,
                           train_seconds=time.perf_counter() - started)
    admitted = admit(state, len(records), config)
    noise = state.noise_multiplier
    assert noise is not None  # admit() calibrates it
    if not admitted:
        spent = PrivacyBudget.for_merchants(config).spent(state.history)
        return RoundResult(STATUS_DECLINED, 0, 0, sample_rate, noise, spent, config.target_delta, math.nan)

    model.train()
    started = time.perf_counter()
    with warnings.catch_warnings():
        # Expected with a frozen base under Opacus hooks, and not actionable by a user: the hooks fire on module
        # outputs because the base's inputs need no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        losses = _private_loop(model, trainable, optimizer, data, sampler, steps, len(records), config, state,
                               noise, uniform, output_rows)
    train_seconds = time.perf_counter() - started
    epsilon = PrivacyBudget.for_merchants(config).spent(state.history)
    return RoundResult(STATUS_TRAINED, len(data), steps, sample_rate, noise, epsilon, config.target_delta,
                       float(sum(losses) / max(1, len(losses))), train_seconds=train_seconds)


def _train_plain(model: torch.nn.Module, data: Encoded, optimizer: torch.optim.Optimizer, sampler: PoissonSampler,
                 steps: int, output_rows: list[int] | None, precision: str, task_weight: torch.Tensor | None
                 ) -> float:
    """The non-private comparison: the same sampler and number of steps, no clipping, no noise."""
    model.train()
    losses = []
    for _ in range(steps):
        rows, owner = sampler.groups()
        if len(rows) == 0:
            continue
        idx, owner_t = torch.from_numpy(rows), torch.from_numpy(owner).to(model_device(model))
        weight = per_shopper_weight(owner_t, None if task_weight is None else task_weight[idx]) / (
            int(owner_t.max()) + 1)
        optimizer.zero_grad(set_to_none=True)
        # the mean over records of their mean example loss (one example each: the mean), a pass per width group
        loss = 0.0
        for group, losses_of_group in grouped_losses(model, data, idx, precision):
            part = (losses_of_group * weight[group]).sum()
            part.backward()
            loss += float(part.detach())
        mask_rows(model, output_rows)
        optimizer.step()
        keep_rows(model, output_rows)
        losses.append(loss)
    return float(sum(losses) / max(1, len(losses)))


def keep_rows(model: torch.nn.Module, output_rows: list[int] | None) -> None:
    """After a step: the LoRA rows of non-item tokens back to zero, the wide part's held rows to their values."""
    keep_item_rows(model, output_rows)
    head = wide_of(model)
    if head is not None:
        head.hold()


def mask_rows(model: torch.nn.Module, output_rows: list[int] | None) -> None:
    """Before the optimizer step: no share of the clipping norm for the rows `keep_rows` puts back, and the wide
    part's damped rows remembered."""
    mask_grad_samples(model, output_rows)
    head = wide_of(model)
    if head is not None:
        head.mask()
        head.snapshot()


def grouped_losses(model: torch.nn.Module, data: Encoded, idx: torch.Tensor, precision: str
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(positions in `idx`, their per-sample losses) of the rows `idx`, one forward pass per `width_groups` group,
    each trimmed to its own width, on the model's device. Each group's backward is the caller's, before the next."""
    device = model_device(model)
    input_ids, attention_mask, target_ids = (t[idx].to(device) for t in
                                             (data.input_ids, data.attention_mask, data.target_ids))
    for rows, width in width_groups(attention_mask):
        yield rows, per_sample_loss(model, input_ids[rows, :width], attention_mask[rows, :width], target_ids[rows],
                                    precision)


def per_shopper_weight(owner: torch.Tensor, task_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's weight in its shopper's mean: 1 / (rows of the same shopper), or with `task_weight` (one per row)
    that weight over the sum of the shopper's rows' weights. A shopper's rows' weights sum to 1."""
    if task_weight is None:
        return 1.0 / torch.bincount(owner).to(torch.float32)[owner]
    task_weight = task_weight.to(device=owner.device, dtype=torch.float32)
    sums = torch.zeros(int(owner.max()) + 1, dtype=torch.float32, device=owner.device).index_add_(0, owner, task_weight)
    return task_weight / sums[owner]


def row_task_weights(data: Encoded, weights: dict[str, float]) -> torch.Tensor | None:
    """Config key `train-task-weights` as one weight per row of `data`; None when every row weighs the same."""
    if not data.tasks or len({weights.get(t, 1.0) for t in set(data.tasks)}) <= 1:
        return None
    return torch.tensor([weights.get(t, 1.0) for t in data.tasks], dtype=torch.float32)


def shopper_backward(private_model: LoraGradSampleModule, trainable: list[torch.nn.Parameter], data: Encoded,
                     idx: torch.Tensor, owner: torch.Tensor, precision: str = "fp32",
                     task_weight: torch.Tensor | None = None) -> float:
    """Leave in each trainable tensor's `grad_sample` one row per sampled shopper: the mean gradient of that
    shopper's examples in the batch (`owner[i]` is the shopper 0..G-1 of row `idx[i]`), weighted by `task_weight[idx]`
    when given (`row_task_weights`), which DP-SGD then clips as one vector. `private_model` must use the "sum" loss
    reduction. Returns the batch's mean example loss."""
    device = model_device(private_model)
    owner = owner.to(device)
    shoppers = int(owner.max()) + 1
    weight = per_shopper_weight(owner, None if task_weight is None else task_weight[idx])
    summed = [torch.zeros((shoppers, *p.shape), dtype=p.dtype, device=p.device) for p in trainable]
    total = 0.0
    for rows, loss in grouped_losses(private_model, data, idx, precision):  # a pass per group of similar length
        (loss * weight[rows]).sum().backward()  # per-row gradients, each already divided by its shopper's count
        for into, p in zip(summed, trainable, strict=True):  # summed in float32 (a bf16 forward's are bfloat16)
            if p.grad_sample is not None:
                into.index_add_(0, owner[rows], p.grad_sample.to(p.dtype))
            p.grad_sample = None  # the next group's backward leaves its own
        total += float(loss.detach().sum())
    for into, p in zip(summed, trainable, strict=True):
        p.grad_sample = into
    return total / len(idx)


def _noise_generator(uniform: Uniform, device: torch.device) -> tuple[torch.Generator, bool]:
    """(generator, reseed before every step?) on the trainable tensors' `device` (Opacus draws the noise there):
    torchcsprng's OS-backed generator when installed (CPU only); otherwise in secure mode a torch generator
    re-seeded from the OS CSPRNG before every step."""
    if uniform.secure and device.type == "cpu":
        try:
            import torchcsprng  # type: ignore[import-not-found]

            return torchcsprng.create_random_device_generator("/dev/urandom"), False
        except ImportError:
            pass
    generator = torch.Generator(device=device).manual_seed(uniform.seed())
    return generator, uniform.secure


def _private_loop(model: torch.nn.Module, trainable: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                  data: Encoded, sampler: PoissonSampler, steps: int, num_records: int, config: FedShopConfig,
                  state: PrivacyState, noise: float, uniform: Uniform, output_rows: list[int] | None) -> list[float]:
    """Opacus DP-SGD over Poisson batches; leaves the composed accountant history in `state`."""
    # The loss is the sum over records of their mean example loss, so the per-row gradients Opacus computes ("sum"
    # reduction) add up, per record, to that record's mean gradient (`shopper_backward`).
    private_model = LoraGradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    device = model_device(model)
    generator, reseed = _noise_generator(uniform, device)
    private_optimizer = DPOptimizer(optimizer, noise_multiplier=noise, max_grad_norm=config.max_grad_norm,
                                    expected_batch_size=sampler.sample_rate * num_records, loss_reduction="mean",
                                    generator=generator, secure_mode=config.secure_mode)
    accountant = accountant_for(state.history, config.accountant)
    private_optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sampler.sample_rate))
    task_weight = row_task_weights(data, config.train_weights)
    losses: list[float] = []
    try:
        for _ in range(steps):
            rows, owner = sampler.groups()
            idx = torch.from_numpy(rows)
            private_optimizer.zero_grad(set_to_none=True)
            if len(idx) == 0:
                # Poisson sampling drew nobody. T5 cannot run on an empty batch, but the step must still happen:
                # zero per-sample gradients, then Opacus adds the noise and the accountant counts the step.
                for p in trainable:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
            else:  # at the event unit each row is its own record: `owner` numbers the rows
                losses.append(shopper_backward(private_model, trainable, data, idx, torch.from_numpy(owner),
                                               config.train_precision, task_weight))
            mask_rows(model, output_rows)
            if reseed:
                generator.manual_seed(uniform.seed())
            private_optimizer.step()
            keep_rows(model, output_rows)
    finally:
        private_model._close()
    state.history = history_of(accountant)
    return losses
