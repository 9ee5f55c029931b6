"""Aggregation of the merchants' LoRA adapters (Flower Message-API strategies): screening of every reply, then the
merge. The round every strategy runs is `server.fedavg.LedgerFedAvg`'s; which replies count (failed merchants,
rejected updates, the stop when too few remain) is `server.screening`'s; what the rounds leave in the run directory
is `server.recorder`'s; central DP is `server.central_dp`'s.

`aggregation` picks the strategy (`build_strategy`), each a `FedAvg` subclass that differs only in how the validated
updates are merged (the arithmetic is `server.aggregation`'s):
- `fedavg` (`LedgerFedAvg`): weighted mean by num-examples of A and B separately (mean(B_i)·mean(A_i), not the mean
  of the products); both A and B travel both ways.
- `ffa` (`LedgerFFA`): FFA-LoRA. A stays at the server's initialisation; merchants load it from the message, freeze
  it and send back B only; the server averages B and re-attaches its own A, so mean(B_i)·A = mean(B_i·A) exactly.
- `svd` (`LedgerSVD`): weighted mean of (alpha/r)·B_i·A_i per layer, re-factorised to rank r by truncated SVD; the
  dropped energy is recorded. Refused with central DP (the merchant-level noise is calibrated to clipped A and B
  updates, which do not bound one merchant's influence on the SVD factors).
`robust` = median / trimmed-mean replaces the weighted mean of fedavg and ffa by the per-coordinate median / trimmed
mean (Flower's numpy helpers, unweighted).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from server.aggregation import Arrays, max_dropped_energy, numpy_of, record_of, svd_aggregate
from server.central_dp import wrap
from server.fedavg import LedgerFedAvg
from shared.config import FedShopConfig
from shared.model import is_frozen_key
from shared.rundir import RunDirectory


class LedgerFFA(LedgerFedAvg):
    """FFA-LoRA: every lora_A stays at the server's initialisation (`add_lora(base, config, seed=config.seed)`).

    The train messages carry A and B; merchants load both, freeze A (`shared.model.freeze_for`) and send back B only,
    so the uplink is half of fedavg's and DP noise (local or central) only ever touches B. The server merges the B
    tensors (weighted mean, or the robust choice) and re-attaches the A it kept; with one shared A,
    mean(B_i)·A = mean(B_i·A) exactly.
    """

    def __init__(self, run_dir: RunDirectory, config: FedShopConfig, initial: ArrayRecord | None = None, **kwargs):
        super().__init__(run_dir, config, initial, **kwargs)
        self._frozen: Arrays | None = None if initial is None else self._frozen_part(initial)

    def frozen_keys(self, keys: Iterable[str]) -> set[str]:
        return {k for k in keys if is_frozen_key(k, "ffa")}

    def _frozen_part(self, arrays: ArrayRecord) -> Arrays:
        numpy = numpy_of(arrays)
        return {k: numpy[k] for k in self.frozen_keys(numpy)}

    def _check_frozen(self, arrays: ArrayRecord, what: str) -> None:
        """RuntimeError unless the A tensors of `arrays` are bit-identical to the kept ones."""
        assert self._frozen is not None
        got = self._frozen_part(arrays)
        differ = sorted(k for k in self._frozen if k not in got or got[k].dtype != self._frozen[k].dtype
                        or got[k].tobytes() != self._frozen[k].tobytes())
        if differ or set(got) != set(self._frozen):
            raise RuntimeError(f"ffa: the frozen lora_A tensors of {what} differ from the initial ones "
                               f"(first: {(differ or sorted(set(got) ^ set(self._frozen)))[0]})")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        if self._frozen is None:
            self._frozen = self._frozen_part(arrays)
        self._check_frozen(arrays, f"the round-{server_round} arrays")
        return super().configure_train(server_round, arrays, config, grid)

    def _complete(self, merged: Arrays) -> ArrayRecord:
        if self._frozen is None:
            raise RuntimeError("ffa: the server does not know the frozen lora_A tensors (pass the initial arrays)")
        order = list(self._current.keys()) if self._current is not None else sorted({*self._frozen, *merged})
        return record_of({**self._frozen, **merged}, order)

    def final_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        """The last aggregate with the kept A re-attached (checked bit-identical where present)."""
        if self._frozen is None:
            return arrays
        got = numpy_of(arrays)
        if self.frozen_keys(got):
            self._check_frozen(arrays, "the final adapter")
        order = list(self._current.keys()) if self._current is not None else list(arrays.keys())
        return record_of({**got, **self._frozen}, order)


class LedgerSVD(LedgerFedAvg):
    """Exact aggregation of the low-rank updates: per adapted layer the weighted mean of (alpha/r)·B_i·A_i,
    re-factorised to rank r by truncated SVD (`svd_aggregate`); the new A, B are sent the next round. The share of
    squared singular values the truncation drops is recorded per round (`svd-dropped-energy-max` / `-mean`).

    Refused with central DP (`FedShopConfig` raises a ConfigError): `MerchantLevelDP` calibrates its noise to the
    sensitivity C/m of a fixed-denominator mean of clipped A and B updates, but this strategy releases the SVD
    factors of the mean of the products B_i·A_i, and clipping the factors' updates does not bound how much one
    merchant moves those (noising them, or the products' mean, with that noise would not give the accounted epsilon).
    Refused with a robust merge too (a median of factors is not a median of products).
    """

    def merge(self, updates: list[Arrays], weights: list[float]) -> tuple[Arrays, dict[str, float]]:
        scale = self.config.lora_alpha / self.config.lora_r
        merged, dropped = svd_aggregate(updates, weights, scale=scale, rank=self.config.lora_r)
        values = list(dropped.values())
        return merged, {"svd-dropped-energy-max": max_dropped_energy(dropped),
                        "svd-dropped-energy-mean": float(np.mean(values)) if values else 0.0}


STRATEGIES: dict[str, type[LedgerFedAvg]] = {"fedavg": LedgerFedAvg, "ffa": LedgerFFA, "svd": LedgerSVD}


def build_strategy(run_dir: RunDirectory, config: FedShopConfig, initial: ArrayRecord | None = None
                   ) -> tuple[LedgerFedAvg, FedAvg]:
    """(the ledger strategy, the strategy to start): the class `config.aggregation` names; under central DP the
    latter wraps the former in Flower's server-side fixed clipping (`server.central_dp.MerchantLevelDP`), with noise
    calibrated to the merchant-level budget. `initial` is the adapter of round 1 (ffa keeps its A)."""
    ledger = STRATEGIES[config.aggregation](
        run_dir, config, initial, fraction_train=config.fraction_train, fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=1,
        min_evaluate_nodes=1, min_available_nodes=config.num_merchants)
    if ledger.central is None:
        return ledger, ledger
    return ledger, wrap(ledger, ledger.central, config)
