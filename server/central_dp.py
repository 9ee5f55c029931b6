"""Merchant-level central DP at the server (privacy unit `merchant`, or `central-dp` on top of an event or shopper
unit): the server's privacy account and Flower's server-side fixed clipping around the ledger strategy.

`CentralAccount` holds the server's `PrivacyBudget`, the noise multiplier calibrated from it once over the planned
rounds, the Poisson sampling of merchants (each in with probability `fraction-train`, which the accountant assumes)
and the history of released aggregates. `MerchantLevelDP` clips each merchant's update, lets the ledger strategy
merge the clipped updates with a fixed denominator, and adds the Gaussian noise.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies

from server.aggregation import numpy_of
from shared.config import FedShopConfig
from shared.ledger import MERCHANT_LEVEL, STATUS_RELEASED
from shared.privacy import History, PrivacyBudget, Uniform

log = logging.getLogger("fedshop")


class CentralAccount:
    """The server's merchant-level privacy account: one release (a noised aggregate) per round it admits."""

    def __init__(self, config: FedShopConfig):
        self.budget = PrivacyBudget.for_server(config)
        self.sample_rate = config.fraction_train
        self.expected_merchants = self.sample_rate * config.num_merchants  # the fixed denominator m
        self.noise_multiplier = self.budget.calibrate(self.sample_rate, config.num_rounds)
        self.history: History = []  # the released aggregates (a continued run starts from its origin's)
        self._uniform = Uniform(config.seed + 0x5E4, secure=config.secure_mode)

    @property
    def step(self) -> tuple[float, float, int]:
        return self.noise_multiplier, self.sample_rate, 1

    def epsilon_spent(self) -> float:
        return self.budget.spent(self.history)

    def admits_release(self) -> bool:
        return self.budget.admits(self.history, self.step)

    def release(self) -> None:
        """Account one noised aggregate."""
        self.history.append(self.step)

    def sample(self, nodes: Iterable[int]) -> list[int]:
        """Poisson sampling of merchants: each node in with probability `sample_rate`, independently."""
        ordered = sorted(nodes)
        return [n for n, u in zip(ordered, self._uniform.draw(len(ordered)), strict=True) if u < self.sample_rate]

    def ledger_row(self, server_round: int, status: str) -> dict:
        """The ledger row of this round's release (or of the release it declined)."""
        return {"merchant": MERCHANT_LEVEL, "round": server_round, "noise_multiplier": self.noise_multiplier,
                "sample_rate": self.sample_rate, "steps": 1 if status == STATUS_RELEASED else 0,
                "epsilon": self.epsilon_spent(), "delta": self.budget.delta, "unit": self.budget.unit,
                "accountant": self.budget.accountant, "status": status}


class MerchantLevelDP(DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping and Gaussian noise, with three differences:
    - an update of norm zero (a merchant that sent the adapter back unchanged) is kept as it is; flwr 1.42 divides
      by the norm and fails the round;
    - replies that the wrapped strategy will reject (`check_reply`: wrong names, shapes, dtypes, NaN/Inf, too large
      a norm) are left unclipped for it to reject and record; the others are clipped key by key against the arrays
      sent, so a reply may carry a subset of them (ffa: B only);
    - the noise goes to the tensors the wrapped strategy merges, never to the ones it keeps frozen (ffa: A).
    The wrapped strategy is a `server.fedavg.LedgerFedAvg` (its `check_reply` and `frozen_keys` are used).
    The epsilon is fedshop's own account (`CentralAccount`, kept by the wrapped strategy): Flower's accountant is
    not used. Only public names of flwr 1.42's wrapper are used (its accounting and noise helpers are private).
    """

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.accountant is not None:
            raise RuntimeError("MerchantLevelDP keeps its epsilon in CentralAccount; build it without Flower's "
                               "accountant")
        if not validate_replies(replies, self.num_sampled_clients, strict=False):
            return None, None
        current = numpy_of(self.current_arrays)
        for reply in replies:
            if reply.has_error() or not reply.content.array_records or self.strategy.check_reply(reply) is not None:
                continue
            for name, record in list(reply.content.array_records.items()):
                arrays = numpy_of(record)
                update = {k: a - current[k] for k, a in arrays.items()}
                norm = float(np.sqrt(sum(float(np.sum(u.astype(np.float64) ** 2)) for u in update.values())))
                factor = min(1.0, self.clipping_norm / norm) if norm > 0 else 1.0
                reply.content[name] = ArrayRecord({k: Array((current[k] + factor * update[k]).astype(a.dtype))
                                                   for k, a in arrays.items()})
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays:
            arrays = self.noised(arrays)
        return arrays, metrics

    def noised(self, aggregate: ArrayRecord) -> ArrayRecord:
        """The aggregate with Gaussian noise of std noise_multiplier * C / m on every tensor the wrapped strategy
        merges (drawn as Flower's own fixed-clipping wrapper draws it: numpy's global generator, tensor by tensor in
        record order)."""
        frozen = self.strategy.frozen_keys(aggregate.keys())
        std = float(self.noise_multiplier * self.clipping_norm / self.num_sampled_clients)
        noised = {}
        for key, array in zip(aggregate.keys(), aggregate.to_numpy_ndarrays(), strict=True):
            if key not in frozen:
                array += np.random.normal(0, std, array.shape).astype(array.dtype)
            noised[key] = Array(np.asarray(array))
        log.info("central DP: Gaussian noise of std %.4f added to the aggregate", std)
        return ArrayRecord(noised)


def wrap(ledger: FedAvg, account: CentralAccount, config: FedShopConfig) -> MerchantLevelDP:
    """The ledger strategy inside Flower's server-side fixed clipping, noised to the merchant-level budget."""
    return MerchantLevelDP(
        ledger, noise_multiplier=account.noise_multiplier, clipping_norm=config.central_clip_norm,
        num_sampled_clients=account.expected_merchants,  # type: ignore[arg-type]  # the fixed denominator m
    )
