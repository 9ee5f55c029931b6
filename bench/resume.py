"""Kill and resume: a run left alone against the same run SIGKILLed after round K and finished with
`fedshop simulate --resume`. Prints whether the final adapter, every checkpoint, the ledger and the metrics are
equal bit for bit, with the wall times, and writes the table to BENCHMARKS.md (section "Kill and resume").

    python bench/resume.py --config configs/default.toml --kill-after 2 --set references=none
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from sections import write_section

ROOT = Path(__file__).resolve().parents[1]


def simulate(config: str, run: Path, sets: list[str]) -> list[str]:
    return [sys.executable, "-m", "server.cli", "simulate", "--config", config, "--run-dir", str(run), "--no-progress",
            *(a for s in sets for a in ("--set", s))]


def adapters_equal(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def ledger(run: Path) -> list[tuple[str, ...]]:
    with (run / "privacy.csv").open(newline="") as handle:
        return sorted(tuple(row.values()) for row in csv.DictReader(handle))


def metrics(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["round"], r["scope"], {k: v for k, v in r["metrics"].items() if "seconds" not in k}) for r in records]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--kill-after", type=int, default=1, help="SIGKILL the server once this round is checkpointed")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work", default="runs/bench-resume")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    work = ROOT / args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    alone, killed = work / "alone", work / "killed"

    started = time.perf_counter()
    subprocess.run(simulate(args.config, alone, args.set), cwd=ROOT, check=True, capture_output=True)
    alone_s = time.perf_counter() - started

    started = time.perf_counter()
    process = subprocess.Popen(simulate(args.config, killed, args.set), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    mark = killed / "checkpoints" / f"round-{args.kill_after}" / "adapter_model.safetensors"
    while not mark.is_file() and process.poll() is None:
        time.sleep(0.05)
    if process.poll() is not None:
        raise SystemExit(f"the run ended (exit {process.returncode}) before round {args.kill_after} was checkpointed")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_s = time.perf_counter() - started
    rows_at_kill = len(ledger(killed))

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "server.cli", "simulate", "--resume", str(killed), "--no-progress"],
                   cwd=ROOT, check=True, capture_output=True)
    resume_s = time.perf_counter() - started

    rounds = sorted(int(p.name.removeprefix("round-")) for p in (alone / "checkpoints").iterdir())
    same_checkpoints = all(adapters_equal(alone / "checkpoints" / f"round-{n}", killed / "checkpoints" / f"round-{n}")
                           for n in rounds)
    rows = ledger(alone)
    final = "bit-exact" if adapters_equal(alone / "adapter", killed / "adapter") else "DIFFERENT"
    table = ["| run | wall s | final adapter | checkpoints | ledger rows | metrics records |",
             "|---|---|---|---|---|---|",
             f"| left alone | {alone_s:.0f} | | rounds {rounds[0]}-{rounds[-1]} | {len(rows)} | "
             f"{len(metrics(alone))} |",
             f"| SIGKILL after round {args.kill_after} ({rows_at_kill} ledger rows), then `--resume` | "
             f"{killed_s:.0f} + {resume_s:.0f} | {final} | "
             f"{'bit-exact' if same_checkpoints else 'DIFFERENT'} | "
             f"{'equal' if ledger(killed) == rows else 'DIFFERENT'} (every column, epsilon to the last digit) | "
             f"{'equal' if metrics(killed) == metrics(alone) else 'DIFFERENT'} (wall times left out) |"]
    text = "\n".join(table)
    print(text)
    if args.write:
        command = " ".join(["python bench/resume.py", "--config", args.config, "--kill-after", str(args.kill_after),
                            *(f"--set {s}" for s in args.set)])
        write_section("resume", f"## Kill and resume\n\n`{command}` ({time.strftime('%Y-%m-%d')}, "
                      f"{os.cpu_count()} cores). The server process is SIGKILLed as soon as the round's checkpoint "
                      "is on disk; `fedshop simulate --resume` finishes the run from it. Ledger rows are compared "
                      "sorted (merchants append theirs in reply order).\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
