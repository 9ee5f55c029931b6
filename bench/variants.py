"""The one way a benchmark reads its `--variants` and runs each of them.

A variant list is `label:key=value,...;label:...`, "/" standing for "," inside a value (`train-task-weights=intent:2/
next-item:1/churn:1`). Each variant runs `fedshop simulate` with its settings into OUT/<label as a slug>.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(text: str) -> list[tuple[str, list[str]]]:
    """(label, ["key=value", ...]) of every variant in `text`."""
    variants = []
    for variant in text.split(";"):
        label, _, sets = variant.partition(":")
        variants.append((label, [pair.replace("/", ",") for pair in sets.split(",") if pair]))
    return variants


def run_dir(out: str, label: str) -> Path:
    """The variant's run directory: OUT/<label, lower case, each run of other characters a dash>."""
    return ROOT / out / re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def simulate(script: str, config: str, directory: Path, label: str, sets: list[str], *extra: str) -> float:
    """Run `fedshop simulate --config CONFIG` into `directory` with `extra` and the variant's settings (which come
    last, so they win); the wall seconds it took. A failed run stops the benchmark naming it and the variant."""
    command = [sys.executable, "-m", "server.cli", "simulate", "--config", config, "--run-dir", str(directory),
               "--force", *extra]
    for pair in sets:
        command += ["--set", pair]
    started = time.perf_counter()
    if subprocess.run(command, cwd=ROOT).returncode:
        sys.exit(f"bench/{script}.py: variant {label!r}: fedshop simulate failed (its output is above)")
    return time.perf_counter() - started


def command_line(script: str, variants: str, default: str) -> str:
    """How the table was made, for BENCHMARKS.md: the script, and its --variants unless they are the default."""
    return f"python bench/{script}.py" + (f' --variants "{variants}"' if variants != default else "")
