"""The privacy ledger, `privacy.csv`: this module alone writes, reads back and checks its rows (columns, statuses,
units), and computes from them: a merchant's accountant history (with what a continued run carried over in
`continued-from.json`), the epsilon per merchant, the server's merchant-level rows. A run directory
(`shared.rundir.RunDirectory`) and an export each hold one ledger.

The ledger is append-only: no command truncates or rewrites it (an export writes a new file with the rows its
adapter rests on). A row a killed run left unfinished is skipped with a warning; any other damaged row is refused.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import UserError
from shared.files import append_line, reading

if TYPE_CHECKING:
    from shared.privacy import History

LEDGER = "privacy.csv"  # the ledger's name in a run directory or an export
CONTINUED_FROM = "continued-from.json"  # a continued run's (and its export's) carried-over accountant histories
CARRIED_WHAT = "the histories a continued run carried over (JSON, written by fedshop)"  # how errors name that file
PRIVACY_COLUMNS = ("merchant", "round", "noise_multiplier", "sample_rate", "steps", "epsilon", "delta", "unit",
                   "accountant", "status")
# a ledger row's status: trained / declined (a merchant's DP-SGD round), released / declined (the server's
# merchant-level release, merchant "all"), failed (no valid reply in time); trained and released rows are accountant
# steps, and so is a failed row that carries steps (`takes_steps`: charged as if the round finished)
STATUS_TRAINED, STATUS_DECLINED, STATUS_FAILED, STATUS_RELEASED = "trained", "declined", "failed", "released"
STEP_STATUSES = (STATUS_TRAINED, STATUS_RELEASED)
LEDGER_STATUSES = (STATUS_TRAINED, STATUS_DECLINED, STATUS_FAILED, STATUS_RELEASED)
MERCHANT_LEVEL = "all"  # the merchant column of the server's central-DP rows
LOCAL_UNITS = ("event", "shopper")  # the units of a merchant's own DP-SGD; "none": no DP, "merchant": central DP
log = logging.getLogger("fedshop")


# --- the file ------------------------------------------------------------------------------------------------------
def ensure_header(path: Path) -> None:
    """Write the ledger's header into a new (or empty) ledger; refuse to append to one with other columns."""
    if path.is_file() and path.stat().st_size:
        with reading(path, "a fedshop ledger (UTF-8 CSV)"), path.open(newline="", encoding="utf-8") as handle:
            header = tuple(next(csv.reader(handle), []))
        _check_header(path, header)
        return
    with path.open("a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow(PRIVACY_COLUMNS)


def _check_header(path: Path, header: tuple[str, ...]) -> None:
    if header != PRIVACY_COLUMNS:
        raise UserError(f"{path}: header {','.join(header)!r} is not a fedshop ledger's "
                        f"({','.join(PRIVACY_COLUMNS)}); refusing to read or append to it")


def append_privacy(path: Path, row: dict[str, Any]) -> None:
    """Append one row (a dict with every column) as a whole line, flushed to disk."""
    line = io.StringIO()
    csv.writer(line).writerow([_cell(row[c]) for c in PRIVACY_COLUMNS])
    append_line(path, line.getvalue())


def read_privacy(path: Path) -> list[dict[str, str]]:
    """Every complete ledger row (a row a killed run left unfinished is skipped, with a warning); [] without a file."""
    if not path.is_file():
        return []
    with reading(path, f"a fedshop ledger (UTF-8 CSV with columns {','.join(PRIVACY_COLUMNS)})"):
        text = path.read_text(encoding="utf-8")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        _check_header(path, tuple(reader.fieldnames or ()))
        rows = [(reader.line_num, row) for row in reader]
    if rows and not text.endswith("\n"):  # the last row was cut short, even if all its columns are there
        rows[-1] = (rows[-1][0], {**rows[-1][1], None: None})
    complete = [(line, r) for line, r in rows if None not in r and None not in r.values()]
    if len(complete) < len(rows):
        log.warning("%s: %d unfinished row(s) (a run stopped mid-write?) skipped", path, len(rows) - len(complete))
    for line, row in complete:
        _check_row(path, line, row)
    return [row for _, row in complete]


def _check_row(path: Path, line: int, row: dict[str, str]) -> None:
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


def write_privacy(path: Path, rows: list[dict[str, str]]) -> None:
    """A ledger file holding `rows` (an export's copy of the rows its adapter rests on)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PRIVACY_COLUMNS)
        writer.writeheader()
        writer.writerows({c: row[c] for c in PRIVACY_COLUMNS} for row in rows)


def number(cell: str | None) -> float:
    """A ledger or metrics cell as a float: "inf" and None (a missing value: nan) included."""
    if cell is None:
        return math.nan
    return math.inf if cell == "inf" else float(cell)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    return str(value)


# --- accountant histories --------------------------------------------------------------------------------------------
def history_from_ledger(run_dir: str | Path, merchant: str, before_round: int | None = None,
                        rows: list[dict[str, str]] | None = None) -> tuple[float | None, History]:
    """(last noise multiplier, accountant history) of `merchant` in a run directory's (or export's) `privacy.csv`.

    Rows that trained (or, for the server's merchant-level rows, were released) are the steps taken, and so are
    failed rows with steps (a merchant that failed after it started training, charged as if it finished); declined
    rows and failed rows without steps took none. When the run itself continued another (`continued-from.json`
    beside the ledger), the history it carried over comes first, so a chain of continued runs composes every step.
    A merchant absent from both starts from nothing. With `before_round`, only rows of earlier rounds count (a run
    that resumes its own directory reads the steps taken before the round it is in). `rows`: the ledger's rows
    when the caller has already read them (read here otherwise).
    """
    path = Path(run_dir) / LEDGER
    if not path.is_file():
        raise UserError(f"{path} does not exist; expected a finished fedshop run directory or a fedshop export")
    noise, history = carried_history(run_dir, merchant)
    for row in read_privacy(path) if rows is None else rows:
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


def last_round_step(rows: list[dict[str, str]], merchant: str, before_round: int) -> tuple[float, float, int] | None:
    """(noise multiplier, sample rate, steps) of `merchant`'s last trained DP-SGD round before `before_round` among
    a run directory's ledger rows: what a round it fails after starting to train is charged; None when it has none
    (a merchant failing in its first round: the server cannot know its schedule)."""
    last = None
    for row in rows:
        if row["merchant"] == merchant and row["status"] == STATUS_TRAINED and int(row["round"]) < before_round \
                and row["unit"] in LOCAL_UNITS and int(row["steps"]) > 0:
            last = (number(row["noise_multiplier"]), number(row["sample_rate"]), int(row["steps"]))
    return last


def carried_history(run_dir: str | Path, merchant: str) -> tuple[float | None, History]:
    """(noise multiplier, history) that a continued run carried over for `merchant` (none for a fresh run)."""
    entry = _carried(run_dir).get(merchant)
    if not entry:
        return None, []
    path = Path(run_dir) / CONTINUED_FROM
    with reading(path, CARRIED_WHAT):
        return entry["noise-multiplier"], [(float(n), float(q), int(s)) for n, q, s in entry["history"]]


def _carried(run_dir: str | Path) -> dict[str, Any]:
    """The accountant histories a continued run carried over, by merchant ({} for a fresh run)."""
    path = Path(run_dir) / CONTINUED_FROM
    if not path.is_file():
        return {}
    with reading(path, CARRIED_WHAT):
        return json.loads(path.read_text(encoding="utf-8")).get("histories", {})


def ledger_merchants(run_dir: str | Path) -> list[str]:
    """Every merchant (and `all`, the server's merchant-level rows) with a history in a run's or export's ledger,
    the carried-over ones included."""
    return sorted(set(_carried(run_dir)) | {row["merchant"] for row in read_privacy(Path(run_dir) / LEDGER)})


# --- epsilon spent ---------------------------------------------------------------------------------------------------
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
