"""The run directory: the files `simulate` writes and everything else reads (see the README for the contract).

This module owns the directory's files: it writes and reads back `privacy.csv` (the ledger: its columns, statuses and
units, the epsilon per merchant, the accountant histories), `metrics.jsonl`, `config.toml` and `continued-from.json`;
report, sweep, export and continuation read them through it.

`privacy.csv` and `metrics.jsonl` are append-only: no command truncates or rewrites them. A fresh run refuses a
directory that already holds a run (`fedshop simulate --force` moves that one aside first, never deletes it); a run
that resumes its own directory (`resume-from` = `run-dir`) appends to both and numbers its rounds on from the last.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import FedShopConfig, to_toml
from shared.errors import UserError
from shared.files import reading, write_text_atomic

if TYPE_CHECKING:
    from shared.privacy import History

CONTINUED_FROM = "continued-from.json"  # a continued run's (and its export's) carried-over accountant histories
PRIVACY_COLUMNS = ("merchant", "round", "noise_multiplier", "sample_rate", "steps", "epsilon", "delta", "unit",
                   "accountant", "status")
# a ledger row's status: trained / declined (a merchant's DP-SGD round), released / declined (the server's
# merchant-level release, merchant "all"), failed (no valid reply in time); trained and released rows are accountant
# steps, and so is a failed row that carries steps (`takes_steps`: charged as if the round finished)
STATUS_TRAINED, STATUS_DECLINED, STATUS_FAILED, STATUS_RELEASED = "trained", "declined", "failed", "released"
STEP_STATUSES = (STATUS_TRAINED, STATUS_RELEASED)
MERCHANT_LEVEL = "all"  # the merchant column of the server's central-DP rows
LOCAL_UNITS = ("event", "shopper")  # the units of a merchant's own DP-SGD; "none": no DP, "merchant": central DP
log = logging.getLogger("fedshop")
CHECKPOINTS = "checkpoints"  # checkpoints/round-<N>/: the global adapter after round N (PEFT format)
PLAN = "plan.json"  # {"last-round": N}: the round the run ends at, which `fedshop simulate --resume` finishes
# what makes a directory hold a run: a fresh run refuses to write into one that has any of these
RUN_FILES = ("privacy.csv", "metrics.jsonl", "report.md", "adapter", CHECKPOINTS, "config.toml", "references.json",
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
        return self.path / "privacy.csv"

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
        rounds = [int(r["round"]) for r in self.read_privacy()] + [int(r["round"]) for r in self.read_metrics()]
        return max(rounds, default=0)

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
        self._ledger_header()
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
        recorded = self.last_round()
        if checkpoint >= last and (self.path / "report.md").is_file() and (self.adapter_dir / "adapter_model"
                                                                          ".safetensors").is_file():
            raise UserError(f"{self.path} finished its {last} rounds: nothing to resume; to train it further, "
                            f"continue it in place with --set resume-from={self.path} --run-dir {self.path}")
        offset = max(checkpoint, recorded)
        rounds = max(0, last - checkpoint)
        evaluated = any(r["scope"] == "evaluate" and r["round"] == checkpoint for r in self.read_metrics())
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

    def _ledger_header(self) -> None:
        """Write the ledger's header into a new (or empty) ledger; refuse to append to one with other columns."""
        if self.privacy_file.is_file() and self.privacy_file.stat().st_size:
            with reading(self.privacy_file, "a fedshop ledger (UTF-8 CSV)"), \
                    self.privacy_file.open(newline="", encoding="utf-8") as handle:
                header = tuple(next(csv.reader(handle), []))
            self._check_header(header)
            return
        with self.privacy_file.open("a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow(PRIVACY_COLUMNS)

    def _check_header(self, header: tuple[str, ...]) -> None:
        if header != PRIVACY_COLUMNS:
            raise UserError(f"{self.privacy_file}: header {','.join(header)!r} is not a fedshop ledger's "
                            f"({','.join(PRIVACY_COLUMNS)}); refusing to read or append to it")

    def append_metrics(self, record: dict[str, Any]) -> None:
        _append_line(self.metrics_file, json.dumps(_jsonable(record), sort_keys=False) + "\n")

    def append_privacy(self, row: dict[str, Any]) -> None:
        line = io.StringIO()
        csv.writer(line).writerow([_cell(row[c]) for c in PRIVACY_COLUMNS])
        _append_line(self.privacy_file, line.getvalue())

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
        """Every complete ledger row (a row a killed run left unfinished is skipped, with a warning)."""
        if not self.privacy_file.is_file():
            return []
        with reading(self.privacy_file, f"a fedshop ledger (UTF-8 CSV with columns {','.join(PRIVACY_COLUMNS)})"):
            text = self.privacy_file.read_text(encoding="utf-8")
            reader = csv.DictReader(io.StringIO(text, newline=""))
            self._check_header(tuple(reader.fieldnames or ()))
            rows = [(reader.line_num, row) for row in reader]
        if rows and not text.endswith("\n"):  # the last row was cut short, even if all its columns are there
            rows[-1] = (rows[-1][0], {**rows[-1][1], None: None})
        complete = [(line, r) for line, r in rows if None not in r and None not in r.values()]
        if len(complete) < len(rows):
            log.warning("%s: %d unfinished row(s) (a run stopped mid-write?) skipped", self.privacy_file,
                        len(rows) - len(complete))
        for line, row in complete:
            _check_ledger_row(self.privacy_file, line, row)
        return [row for _, row in complete]


LEDGER_STATUSES = (STATUS_TRAINED, STATUS_DECLINED, STATUS_FAILED, STATUS_RELEASED)


def _check_ledger_row(path: Path, line: int, row: dict[str, str]) -> None:
    """UserError naming the file, line and column unless every cell of a complete ledger row parses."""
    def refuse(column: str, expected: str) -> UserError:
        return UserError(f"{path}:{line}: column {column} = {row[column]!r} is not {expected}; the ledger is "
                         "damaged (restore it from a copy: fedshop never rewrites it)")

    for column in ("round", "steps"):
        if not row[column].isdigit():
            raise refuse(column, "a whole number")
    for column in ("noise_multiplier", "sample_rate", "epsilon", "delta"):
        try:
            number(row[column])
        except ValueError:
            raise refuse(column, "a number") from None
    if row["status"] not in LEDGER_STATUSES:
        raise refuse("status", f"one of {', '.join(LEDGER_STATUSES)}")


def history_from_ledger(run_dir: str | Path, merchant: str, before_round: int | None = None
                        ) -> tuple[float | None, History]:
    """(last noise multiplier, accountant history) of `merchant` in a run directory's (or export's) `privacy.csv`.

    Rows that trained (or, for the server's merchant-level rows, were released) are the steps taken, and so are
    failed rows with steps (a merchant that failed after it started training, charged as if it finished); declined
    rows and failed rows without steps took none. When the run itself continued another (`continued-from.json`
    beside the ledger), the history it carried over comes first, so a chain of continued runs composes every step.
    A merchant absent from both starts from nothing. With `before_round`, only rows of earlier rounds count (a run
    that resumes its own directory reads the steps taken before the round it is in).
    """
    path = Path(run_dir) / "privacy.csv"
    if not path.is_file():
        raise UserError(f"{path} does not exist; expected a finished fedshop run directory or a fedshop export")
    noise, history = carried_history(run_dir, merchant)
    for row in RunDirectory(run_dir).read_privacy():
        if row["merchant"] != merchant or not takes_steps(row):
            continue
        if before_round is not None and int(row["round"]) >= before_round:
            continue
        if row["unit"] == "none":  # trained without DP: nothing to compose
            continue
        noise = float(row["noise_multiplier"])
        history.append((noise, float(row["sample_rate"]), int(row["steps"])))
    return noise, merged_history(history)


def merged_history(history: History) -> History:
    """Consecutive entries with the same noise multiplier and sample rate as one, as Opacus's accountants keep their
    history: a history read back from the ledger then composes in the same float operations as the accountant that
    took the steps (rdp x (s1 + s2), not rdp x s1 + rdp x s2), so a resumed run reports the uninterrupted run's
    epsilon to the last digit."""
    merged: History = []
    for noise, rate, steps in history:
        if merged and merged[-1][0] == noise and merged[-1][1] == rate:
            merged[-1] = (noise, rate, merged[-1][2] + steps)
        else:
            merged.append((noise, rate, steps))
    return merged


def takes_steps(row: dict[str, str]) -> bool:
    """Whether a ledger row's steps count in its merchant's accountant history: trained and released rows, and a
    failed row that carries steps (the conservative rule: a merchant that failed after it started training is
    charged its round as if it finished)."""
    return row["status"] in STEP_STATUSES or (row["status"] == STATUS_FAILED and int(row["steps"]) > 0)


def last_round_step(run_dir: str | Path, merchant: str, before_round: int) -> tuple[float, float, int] | None:
    """(noise multiplier, sample rate, steps) of `merchant`'s last trained DP-SGD round before `before_round` in
    this run directory's ledger: what a round it fails after starting to train is charged; None when it has none
    (a merchant failing in its first round: the server cannot know its schedule)."""
    last = None
    for row in RunDirectory(run_dir).read_privacy():
        if row["merchant"] == merchant and row["status"] == STATUS_TRAINED and int(row["round"]) < before_round \
                and row["unit"] in LOCAL_UNITS and int(row["steps"]) > 0:
            last = (number(row["noise_multiplier"]), number(row["sample_rate"]), int(row["steps"]))
    return last


def carried_history(run_dir: str | Path, merchant: str) -> tuple[float | None, History]:
    """(noise multiplier, history) that a continued run carried over for `merchant` (none for a fresh run)."""
    path = Path(run_dir) / CONTINUED_FROM
    if not path.is_file():
        return None, []
    with reading(path, "the histories a continued run carried over (JSON, written by fedshop)"):
        entry = json.loads(path.read_text(encoding="utf-8")).get("histories", {}).get(merchant)
        if not entry:
            return None, []
        return entry["noise-multiplier"], [(float(n), float(q), int(s)) for n, q, s in entry["history"]]


def ledger_merchants(run_dir: str | Path) -> list[str]:
    """Every merchant (and `all`, the server's merchant-level rows) with a history in a run's or export's ledger,
    the carried-over ones included."""
    names: set[str] = set()
    path = Path(run_dir) / CONTINUED_FROM
    if path.is_file():
        with reading(path, "the histories a continued run carried over (JSON, written by fedshop)"):
            names |= set(json.loads(path.read_text(encoding="utf-8")).get("histories", {}))
    names |= {row["merchant"] for row in RunDirectory(run_dir).read_privacy()}
    return sorted(names)


def epsilon_by_merchant(rows: list[dict[str, str]]) -> dict[str, float]:
    """Each merchant's epsilon spent by its own DP-SGD (event or shopper unit): the largest composed epsilon of its
    rows (declined rows repeat what was spent). Merchants without local DP rows are absent."""
    spent: dict[str, float] = {}
    for row in rows:
        if row["merchant"] == MERCHANT_LEVEL or row["unit"] not in LOCAL_UNITS:
            continue
        value = number(row["epsilon"])
        if not math.isnan(value):
            spent[row["merchant"]] = max(spent.get(row["merchant"], 0.0), value)
    return spent


def merchant_level_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The server's central-DP rows (unit merchant), in ledger order."""
    return [r for r in rows if r["merchant"] == MERCHANT_LEVEL]


def merchant_level_epsilon(rows: list[dict[str, str]]) -> float:
    """The merchant-level epsilon spent at the end of `rows` (0 without central-DP rows)."""
    central = merchant_level_rows(rows)
    return number(central[-1]["epsilon"]) if central else 0.0


def number(cell: str | None) -> float:
    """A ledger or metrics cell as a float: "inf" and None (a missing value: nan) included."""
    if cell is None:
        return math.nan
    return math.inf if cell == "inf" else float(cell)


def write_privacy(path: Path, rows: list[dict[str, str]]) -> None:
    """A ledger file holding `rows` (an export's copy of the rows its adapter rests on)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PRIVACY_COLUMNS)
        writer.writeheader()
        writer.writerows({c: row[c] for c in PRIVACY_COLUMNS} for row in rows)


def _append_line(path: Path, text: str) -> None:
    """Append one whole line and flush it to disk; after a line a killed writer left unfinished, the new one still
    starts on a line of its own."""
    with path.open("a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size:
            handle.seek(size - 1)
            if handle.read(1) != b"\n":
                text = "\n" + text
        handle.write(text.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


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
