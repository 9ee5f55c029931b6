"""Merchant faults injected on purpose (config key `fault-injection`), for reliability tests and benchmarks.

The syntax is comma-separated `kind@merchant:round` entries, e.g. `exit@m1:2,hang@m2:3,garbage@m0:1`:
- `raise`: the merchant's train handler raises an exception after its round's DP-SGD steps were taken;
- `exit`: the merchant's process ends (`os._exit`) after those steps, no reply, no cleanup;
- `hang`: the merchant sleeps past `round-timeout` after those steps, so its reply comes too late;
- `garbage`: the merchant replies on time with a corrupted update (NaN tensors) that the server must reject.

Every kind strikes after training, so the round's privacy cost was paid: that is the case the conservative ledger
rule is for (a failed merchant's round counts as if it finished). Parsing lives here (no flwr), acting on a fault in
`client.faults`.
"""

from __future__ import annotations

import re

FAULT_KINDS = ("raise", "exit", "hang", "garbage")
_ENTRY = re.compile(r"^(?P<kind>[a-z]+)@m(?P<partition>\d+):(?P<round>\d+)$")


def parse_faults(text: str, num_merchants: int) -> dict[tuple[str, int], str]:
    """{(merchant, round): kind} of a `fault-injection` value; ConfigError naming the first bad entry."""
    from shared.config import ConfigError

    faults: dict[tuple[str, int], str] = {}
    for raw in (e.strip() for e in text.split(",")):
        if not raw:
            continue
        match = _ENTRY.match(raw)
        expected = (f"expected kind@merchant:round with kind one of {', '.join(FAULT_KINDS)}, merchant m0..m"
                    f"{num_merchants - 1} and round >= 1 (e.g. \"exit@m1:2\")")
        if match is None or match["kind"] not in FAULT_KINDS or int(match["partition"]) >= num_merchants \
                or int(match["round"]) < 1 or match["partition"] != str(int(match["partition"])):
            raise ConfigError(f"config key 'fault-injection' entry {raw!r}: {expected}")
        key = (f"m{int(match['partition'])}", int(match["round"]))
        if key in faults:
            raise ConfigError(f"config key 'fault-injection' entry {raw!r}: {key[0]} already has a fault in round "
                              f"{key[1]} ({faults[key]}); one fault per merchant and round")
        faults[key] = match["kind"]
    return faults
