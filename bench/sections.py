"""The one way a benchmark writes its table into BENCHMARKS.md: its own section between two markers, replaced in
place on every run (appended the first time)."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(script: str, section: str) -> None:
    """Replace `bench/<script>.py`'s section (markers included) with `section` (a heading, text and the table)."""
    begin, end = f"<!-- bench/{script}.py begin -->", f"<!-- bench/{script}.py end -->"
    block = f"{begin}\n{section}\n{end}"
    current = BENCHMARKS.read_text(encoding="utf-8") if BENCHMARKS.is_file() else "# fedshop benchmarks\n"
    if begin in current:
        current = current[:current.index(begin)] + block + current[current.index(end) + len(end):]
    else:
        current = current.rstrip("\n") + "\n\n" + block + "\n"
    BENCHMARKS.write_text(current, encoding="utf-8")
