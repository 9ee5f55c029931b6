"""The run directory: the files `simulate` writes and everything else reads (see the README for the contract)."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from typing import Any

from shared.config import FedShopConfig, to_toml
from shared.privacy import CONTINUED_FROM

PRIVACY_COLUMNS = ("merchant", "round", "noise_multiplier", "sample_rate", "steps", "epsilon", "delta", "unit",
                   "accountant", "status")
CHECKPOINTS = "checkpoints"  # checkpoints/round-<N>/: the global adapter after round N (PEFT format)


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def privacy_file(self) -> Path:
        return self.path / "privacy.csv"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.path / CHECKPOINTS / f"round-{server_round}"

    def start(self, config: FedShopConfig) -> None:
        """A fresh run: resolved config written, metrics and ledger emptied."""
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / CHECKPOINTS).is_dir():  # a previous run's checkpoints would pass for this run's
            shutil.rmtree(self.path / CHECKPOINTS)
        (self.path / CONTINUED_FROM).unlink(missing_ok=True)  # written again by a run that continues another
        (self.path / "config.toml").write_text(to_toml(config), encoding="utf-8")
        self.metrics_file.write_text("", encoding="utf-8")
        (self.path / "references.json").unlink(missing_ok=True)  # a previous run's reference runs
        with self.privacy_file.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow(PRIVACY_COLUMNS)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(_jsonable(record), sort_keys=False) + "\n")

    def append_privacy(self, row: dict[str, Any]) -> None:
        with self.privacy_file.open("a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow([_cell(row[c]) for c in PRIVACY_COLUMNS])

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text(encoding="utf-8").splitlines() if line]

    def read_privacy(self) -> list[dict[str, str]]:
        if not self.privacy_file.is_file():
            return []
        with self.privacy_file.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    return str(value)


def _jsonable(value: Any) -> Any:
    """JSON without NaN/Infinity literals: non-finite floats become null or the strings "inf"/"-inf"."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
    return value
