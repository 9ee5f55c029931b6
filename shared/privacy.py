"""Privacy accounting and sampling that both sides use: the merchant's DP-SGD and the server's central DP.

An accountant history is a list of `(noise_multiplier, sample_rate, steps)`, Opacus's own format: the epsilon of a
history is what one Opacus accountant fed those steps reports, so a ledger row can always be re-derived from it.

Sampling is Poisson over *records*: with probability `sample_rate`, independently per record and per step. A record
is an example (privacy unit `event`), a shopper (unit `shopper`: a sampled shopper contributes one of their examples,
picked uniformly), or a merchant (unit `merchant`, at the server). Secure mode draws every uniform from the operating
system's CSPRNG (`os.urandom`) instead of a seeded generator.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from shared.config import FedShopConfig

History = list[tuple[float, float, int]]
# a merchant's train reply carries, beside its metrics, a ConfigRecord naming what its epsilon is about
PRIVACY_RECORD, PRIVACY_UNIT_KEY, PRIVACY_ACCOUNTANT_KEY = "privacy", "unit", "accountant"


def accountant_for(history: History, accountant: str) -> IAccountant:
    """A fresh Opacus accountant of kind `accountant` holding `history`, loaded through its own state dict (which
    refuses a history saved by another kind of accountant)."""
    engine = create_accountant(accountant)
    engine.load_state_dict({"history": [(float(n), float(q), int(s)) for n, q, s in history], "mechanism": accountant})
    return engine


def history_of(engine: IAccountant) -> History:
    """The `(noise_multiplier, sample_rate, steps)` history an Opacus accountant holds, read from its state dict."""
    return [(float(n), float(q), int(s)) for n, q, s in engine.state_dict()["history"]]


def save_history(history: History, accountant: str) -> str:
    """The accountant's state dict as JSON text (what a merchant keeps between rounds); floats round-trip exactly."""
    return json.dumps(accountant_for(history, accountant).state_dict())


def load_history(text: str, accountant: str) -> History:
    """The history `save_history` wrote, loaded back through an accountant's `load_state_dict`."""
    engine = create_accountant(accountant)
    engine.load_state_dict(json.loads(text))
    return history_of(engine)


def epsilon_of(history: History, delta: float, accountant: str) -> float:
    """Epsilon at `delta` of every step in `history`, composed by one Opacus accountant (0 for no steps)."""
    steps = tuple((float(n), float(q), int(s)) for n, q, s in history if s > 0)
    if not steps:
        return 0.0
    if any(n <= 0 for n, _, _ in steps):
        return math.inf
    return _composed_epsilon(steps, float(delta), accountant)


@functools.lru_cache(maxsize=1024)
def _composed_epsilon(steps: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    """`epsilon_of`'s Opacus call, remembered per process: a round asks for the same history's epsilon before its
    steps (the budget check) and after them, and merchants with the same sample rate and noise share histories;
    Opacus's RDP analysis takes about 0.24 s a call over its fractional orders."""
    with _quiet():
        return float(accountant_for(list(steps), accountant).get_epsilon(delta=delta))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Opacus's RDP analysis notes when the best order sits at the end of its grid: the epsilon it returns is still
    a valid (if slightly loose) bound, and the note is not actionable for a fedshop user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
        yield


@functools.lru_cache(maxsize=256)
def _noise_for_budget(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    with _quiet():
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))


@dataclass(frozen=True)
class PrivacyBudget:
    """A privacy budget: at most `epsilon` at `delta` for the protected record `unit`, composed by one Opacus
    `accountant`. The merchants' DP-SGD (unit event or shopper) and the server's central DP (unit merchant) each
    hold one; unit `none` is a run without that kind of DP (nothing to spend, epsilon inf)."""

    epsilon: float
    delta: float
    accountant: str
    unit: str

    @classmethod
    def for_merchants(cls, config: FedShopConfig) -> PrivacyBudget:
        """The budget of each merchant's DP-SGD (unit `none` without local DP)."""
        return cls(config.target_epsilon, config.target_delta, config.accountant,
                   config.privacy_unit if config.local_dp else "none")

    @classmethod
    def for_server(cls, config: FedShopConfig) -> PrivacyBudget:
        """The budget of the server's merchant-level central DP (unit `none` without it)."""
        return cls(config.merchant_level_target_epsilon, config.target_delta, config.accountant,
                   "merchant" if config.central else "none")

    @property
    def private(self) -> bool:
        return self.unit != "none"

    @property
    def ledger_accountant(self) -> str:
        """The accountant a ledger row names: `none` when nothing is accounted."""
        return self.accountant if self.private else "none"

    def reply_fields(self) -> dict[str, str]:
        """What a merchant's reply says its epsilon is about (the `PRIVACY_RECORD` ConfigRecord's fields)."""
        return {PRIVACY_UNIT_KEY: self.unit, PRIVACY_ACCOUNTANT_KEY: self.ledger_accountant}

    def calibrate(self, sample_rate: float, steps: int) -> float:
        """The smallest noise multiplier whose `steps` steps at `sample_rate` stay within the budget."""
        return _noise_for_budget(self.epsilon, self.delta, sample_rate, steps, self.accountant)

    def spent(self, history: History) -> float:
        """Epsilon (at this budget's delta and accountant) that the steps of `history` spent."""
        return epsilon_of(history, self.delta, self.accountant)

    def admits(self, history: History, step: tuple[float, float, int]) -> bool:
        """Whether taking `step` after `history` stays within the budget."""
        return self.spent([*history, step]) <= self.epsilon


class Uniform:
    """Uniform [0, 1) draws: from a seeded generator, or in secure mode from the OS CSPRNG."""

    def __init__(self, seed: int, secure: bool = False):
        self.secure = secure
        self._rng = None if secure else np.random.default_rng(seed)

    def draw(self, n: int) -> np.ndarray:
        if not self.secure:
            return self._rng.random(n)
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64)
        return (raw >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # 53 random bits per float

    def seed(self) -> int:
        """A fresh 63-bit seed (for a torch generator)."""
        if self.secure:
            return int.from_bytes(os.urandom(8), "little") >> 1
        return int(self._rng.integers(2 ** 63 - 1))


class PoissonSampler:
    """One DP-SGD batch per call: each record in with probability `sample_rate`, then up to `per_record` of its
    examples (one for the event unit).

    `records[i]` lists the example indices of record i: one index per record for the event unit, every example of
    a shopper for the shopper unit. A record's examples in one batch are distinct, and `groups()` says which record
    each row came from, so a record's rows can be merged into one gradient before clipping.
    """

    def __init__(self, records: Sequence[Sequence[int]], sample_rate: float, uniform: Uniform, per_record: int = 1):
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample rate {sample_rate} not in (0, 1]")
        self.records = [np.asarray(r, dtype=np.int64) for r in records]
        if any(len(r) == 0 for r in self.records):
            raise ValueError("every record needs at least one example")
        self.sample_rate = sample_rate
        self.uniform = uniform
        self.per_record = per_record

    def batch(self) -> np.ndarray:
        """Example indices of one step (one per sampled record)."""
        return self.groups()[0]

    def groups(self) -> tuple[np.ndarray, np.ndarray]:
        """(example indices, record position 0..G-1 of each) of one step; G sampled records."""
        chosen = np.flatnonzero(self.uniform.draw(len(self.records)) < self.sample_rate)
        if len(chosen) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        if self.per_record == 1:
            picks = self.uniform.draw(len(chosen))
            return (np.array([self.records[r][int(u * len(self.records[r]))] for r, u in
                              zip(chosen, picks, strict=True)], dtype=np.int64), np.arange(len(chosen)))
        rows, owner = [], []
        for position, r in enumerate(chosen):  # a uniformly random subset of per_record examples (all if fewer)
            members = self.records[r]
            take = members[np.argsort(self.uniform.draw(len(members)), kind="stable")[:self.per_record]]
            rows.append(take)
            owner.append(np.full(len(take), position, dtype=np.int64))
        return np.concatenate(rows), np.concatenate(owner)


def records_of(owners: Sequence[str], unit: str) -> list[list[int]]:
    """Example indices grouped into privacy records: one per example (event) or one per owner (shopper)."""
    if unit != "shopper":
        return [[i] for i in range(len(owners))]
    grouped: dict[str, list[int]] = {}
    for i, owner in enumerate(owners):
        grouped.setdefault(owner, []).append(i)
    return [grouped[k] for k in sorted(grouped)]


def schedule(num_records: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(Poisson sample rate, steps per round): an expected `batch_size` records per step, `local_epochs` passes."""
    batches = max(1, math.ceil(num_records / batch_size))
    return 1.0 / batches, local_epochs * batches
