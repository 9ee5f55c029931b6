"""Acting on an injected merchant fault (config key `fault-injection`, parsed by `shared.faults`).

`strike` is called in the train handler after the round's DP-SGD steps were taken (and charged to the merchant's
own privacy state beforehand): `raise` raises, `exit` ends the process at once (`os._exit`: no reply, no Python
cleanup, as a crash or an out-of-memory kill would), `hang` sleeps past `round-timeout` and then replies late;
`garbage` is returned to the handler, which replies with `corrupted(...)` tensors.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time

import torch

from shared.config import FedShopConfig
from shared.faults import parse_faults

log = logging.getLogger("fedshop")
EXIT_CODE = 70  # the status an injected `exit` ends the merchant's process with
HANG_MARGIN_SECONDS = 5.0  # an injected `hang` sleeps round-timeout plus this


class InjectedFault(RuntimeError):
    """The exception an injected `raise` fault raises."""


def strike(config: FedShopConfig, merchant: str, server_round: int) -> str | None:
    """Carry out the fault injected for `merchant` in `server_round`, if any; returns its kind when the handler goes
    on (`hang` after its sleep, `garbage`), None without a fault."""
    kind = parse_faults(config.fault_injection, config.num_merchants).get((merchant, server_round))
    if kind is None:
        return None
    log.warning("merchant %s round %d: injected fault %s", merchant, server_round, kind)
    if kind == "raise":
        raise InjectedFault(f"injected fault: merchant {merchant} raised in round {server_round} after training")
    if kind == "exit":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)
    if kind == "hang":
        time.sleep(config.round_timeout + HANG_MARGIN_SECONDS)
    return kind


def corrupted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A garbage update: every tensor of `state` with its shape and dtype but NaN values."""
    return {name: torch.full_like(tensor, math.nan) for name, tensor in state.items()}
