"""The run directory: the files `simulate` writes and everything else reads (see the README for the contract).

This module owns the directory's layout and its files `metrics.jsonl`, `config.toml`, `plan.json` and the
checkpoints; `privacy.csv` (the ledger: its columns, statuses and units, the epsilon per merchant, the accountant
histories, with `continued-from.json`'s carried-over ones) is `shared.ledger`'s, which `RunDirectory`'s ledger
methods call. Report, sweep, export and continuation read the directory through them.

`privacy.csv` and `metrics.jsonl` are append-only: no command truncates or rewrites them. A fresh run refuses a
directory that already holds a run (`fedshop simulate --force` moves that one aside first, never deletes it); a run
that resumes its own directory (`resume-from` = `run-dir`) appends to both and numbers its rounds on from the last.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import ledger
from shared.config import FedShopConfig, to_toml
from shared.errors import UserError
from shared.files import append_line, reading, write_text_atomic
from shared.ledger import CONTINUED_FROM, LEDGER

log = logging.getLogger("fedshop")
CHECKPOINTS = "checkpoints"  # checkpoints/round-<N>/: the global adapter after round N (PEFT format)
PLAN = "plan.json"  # {"last-round": N}: the round the run ends at, which `fedshop simulate --resume` finishes
# what makes a directory hold a run: a fresh run refuses to write into one that has any of these
RUN_FILES = (LEDGER, "metrics.jsonl", "report.md", "adapter", CHECKPOINTS, "config.toml", "references.json",
             CONTINUED_FROM, PLAN)


@dataclass(frozen=True)
class ResumePoint:
    """Where a stopped run picks up (`RunDirectory.resume_point`)."""
    checkpoint: int  # the last complete checkpoint: the global adapter the resumed rounds start from
    offset: int  # the resumed rounds are numbered offset + 1, offset + 2, ...
    rounds: int  # rounds left to the planned last round
    evaluated: bool  # the checkpoint's federated evaluation is already in metrics.jsonl


class RunDirectory:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def privacy_file(self) -> Path:
        return self.path / LEDGER

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.path / CHECKPOINTS / f"round-{server_round}"

    def run_files(self) -> list[str]:
        """The run files this directory already holds (empty for a new or empty directory)."""
        return [name for name in RUN_FILES if (self.path / name).exists()]

    def last_round(self) -> int:
        """The last round recorded in the ledger or the metrics (0 when none)."""
        return self._recorded()[0]

    def _recorded(self) -> tuple[int, list[dict[str, Any]]]:
        """(the last round recorded in the ledger or the metrics, the metrics records): each file read once."""
        rows, records = self.read_privacy(), self.read_metrics()
        rounds = [int(r["round"]) for r in rows] + [int(r["round"]) for r in records]
        return max(rounds, default=0), records

    def move_aside(self) -> Path:
        """Rename the directory to `<dir>.old-<time>` (a free name), so a fresh run can take its place."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, k = self.path.with_name(f"{self.path.name}.old-{stamp}"), 1
        while target.exists():
            target, k = self.path.with_name(f"{self.path.name}.old-{stamp}-{k}"), k + 1
        os.rename(self.path, target)
        return target

    def check_fresh(self) -> None:
        """UserError if the directory already holds a run (a fresh run never writes over another's files)."""
        present = self.run_files()
        if present:
            raise UserError(
                f"run directory {self.path} already holds a run ({', '.join(present)}): a fresh run never overwrites "
                f"one; pass --force to move it aside to {self.path}.old-<time> (nothing is deleted), choose another "
                f"--run-dir, or continue it in place with --set resume-from={self.path}")

    def start(self, config: FedShopConfig) -> int:
        """Prepare the directory for this run and return its round offset: 0 for a fresh run (refused if the
        directory holds a run), the last recorded round for a run resuming its own directory. The resolved config
        is (re)written; metrics and ledger are created if missing and otherwise only ever appended to."""
        offset = 0
        if config.resumes_in_place:
            offset = self.last_round()
            self._keep_previous(offset)
        else:
            self.check_fresh()
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "config.toml", to_toml(config))
        self.metrics_file.touch()
        ledger.ensure_header(self.privacy_file)
        self.write_plan(offset + config.num_rounds)
        return offset

    def write_plan(self, last_round: int) -> None:
        """A fresh or continued run's plan: the round it ends at; the resumes of an earlier part (in place) are kept."""
        write_text_atomic(self.path / PLAN, json.dumps({"last-round": last_round, "resumed": self.resumes()}) + "\n")

    def record_resume(self, point: ResumePoint) -> None:
        """`fedshop simulate --resume`: the plan names the checkpoint each resume started from (the report says so);
        a round that was under way when the run stopped moves the last round on."""
        plan = self._plan()
        plan["last-round"] = point.offset + point.rounds
        plan["resumed"].append({"checkpoint": point.checkpoint, "first-round": point.offset + 1,
                                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        write_text_atomic(self.path / PLAN, json.dumps(plan) + "\n")

    def resumes(self) -> list[dict[str, Any]]:
        """The resumes after a stop recorded in the plan (none for a run without one, or an older run)."""
        return self._plan()["resumed"] if (self.path / PLAN).is_file() else []

    def planned_last_round(self) -> int:
        return self._plan()["last-round"]

    def _plan(self) -> dict[str, Any]:
        path = self.path / PLAN
        if not path.is_file():
            raise UserError(f"{path} does not exist: {self.path} is not a run `fedshop simulate --resume` can finish "
                            "(it was not started by this version of fedshop, or it is not a run directory)")
        with reading(path, 'a JSON object {"last-round": N, "resumed": [...]}, written by fedshop'):
            plan = json.loads(path.read_text(encoding="utf-8"))
            last, resumed = plan["last-round"], plan["resumed"]
            if not isinstance(last, int) or isinstance(last, bool) or last < 0 or not isinstance(resumed, list):
                raise ValueError(f"last-round = {last!r}, resumed = {resumed!r}")
        return plan

    def complete_checkpoints(self) -> list[int]:
        """Rounds whose checkpoint holds its weights (written last, atomically: present means complete)."""
        folder = self.path / CHECKPOINTS
        rounds = []
        for entry in folder.iterdir() if folder.is_dir() else ():
            name = entry.name.removeprefix("round-")
            if name.isdigit() and (entry / "adapter_model.safetensors").is_file():
                rounds.append(int(name))
        return sorted(rounds)

    def resume_point(self) -> ResumePoint:
        """Where a run that stopped before its planned last round (killed, or stopped by a fault) picks up: the last
        complete checkpoint. Rows and records of a round that was under way when it stopped stay as they are (its
        merchants' steps were taken: they count); the resumed rounds then number on after it (`record_resume` moves
        the plan on by as many rounds). UserError if nothing is left to do or nothing can be resumed. Reads only."""
        last = self.planned_last_round()
        checkpoints = self.complete_checkpoints()
        if not checkpoints:
            raise UserError(f"{self.path / CHECKPOINTS}: no complete checkpoint (the run stopped before its round-0 "
                            "evaluation); start it afresh with --force, which moves this directory aside")
        checkpoint = checkpoints[-1]
        recorded, records = self._recorded()
        if checkpoint >= last and (self.path / "report.md").is_file() and (self.adapter_dir / "adapter_model"
                                                                          ".safetensors").is_file():
            raise UserError(f"{self.path} finished its {last} rounds: nothing to resume; to train it further, "
                            f"continue it in place with --set resume-from={self.path} --run-dir {self.path}")
        offset = max(checkpoint, recorded)
        rounds = max(0, last - checkpoint)
        evaluated = any(r["scope"] == "evaluate" and r["round"] == checkpoint for r in records)
        return ResumePoint(checkpoint, offset, rounds, evaluated)

    def _keep_previous(self, offset: int) -> None:
        """Resuming in place: the earlier part's config and reference runs stay beside it, named by the round
        this part starts at."""
        kept = f"before-round-{offset + 1}"
        config = self.path / "config.toml"
        if config.is_file() and not (self.path / f"config-{kept}.toml").exists():
            write_text_atomic(self.path / f"config-{kept}.toml", config.read_text(encoding="utf-8"))
        references = self.path / "references.json"  # trained for the earlier part: not this part's references
        if references.is_file() and not (self.path / f"references-{kept}.json").exists():
            os.replace(references, self.path / f"references-{kept}.json")

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_line(self.metrics_file, json.dumps(_jsonable(record), sort_keys=False) + "\n")

    def append_privacy(self, row: dict[str, Any]) -> None:
        """Append one ledger row (`shared.ledger.append_privacy`)."""
        ledger.append_privacy(self.privacy_file, row)

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every complete record (a line a killed run left unfinished is skipped, with a warning)."""
        if not self.metrics_file.is_file():
            return []
        records = []
        with reading(self.metrics_file, "one JSON object per line (UTF-8)"):
            lines = self.metrics_file.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if line:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    log.warning("%s:%d: an unfinished record (a run stopped mid-write?), skipped", self.metrics_file,
                                number)
                    continue
                if not (isinstance(record, dict) and isinstance(record.get("round"), int)
                        and isinstance(record.get("scope"), str) and isinstance(record.get("metrics", {}), dict)):
                    raise UserError(f"{self.metrics_file}:{number}: not a fedshop metrics record (expected a JSON "
                                    "object with an integer \"round\", a \"scope\" and \"metrics\"): "
                                    f"{line[:80]!r}")
                records.append(record)
        return records

    def read_privacy(self) -> list[dict[str, str]]:
        """Every complete ledger row (`shared.ledger.read_privacy`)."""
        return ledger.read_privacy(self.privacy_file)


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
