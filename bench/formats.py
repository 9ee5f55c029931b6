"""Demo: `fedshop data inspect` and a 2-round `fedshop simulate` on a generated file in every format.

    python bench/formats.py [--config configs/tiny.toml] [--out runs/formats] [--no-write]

For each format: `fedshop data synth --format F` writes the tiny synthetic world in that layout, `data inspect`
reports it, and `simulate` (its own tiny base pretrained on the file's public split) runs 2 rounds. The merchant
partition is the file's natural column where the format has one, else dirichlet. Prints a table and writes it into
BENCHMARKS.md (the section between the markers below is replaced). These are figures, not tests.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from sections import write_section

ROOT = Path(__file__).resolve().parents[1]
FORMATS = {
    # format: (file name, extra --set overrides)
    "canonical": ("events.csv", ["partition=natural:merchant_id"]),
    "parquet": ("events.parquet", ["partition=natural:merchant_id"]),
    "retailrocket": ("events.csv", ["partition=dirichlet", "item-properties-path={dir}/events_item_properties.csv"]),
    "taobao": ("UserBehavior.csv", ["partition=dirichlet"]),
    "rees46": ("2019-Oct.csv", ["partition=natural:brand"]),
    "recbole": ("shop.inter", ["partition=natural:shop"]),
    "transactions": ("sales.csv", ["partition=natural:store", "item-column=sku", "min-shopper-events=8"]),
}


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=ROOT, capture_output=True, text=True)
    return done, time.perf_counter() - started


def run_format(fmt: str, config: str, out: Path) -> dict:
    folder = out / fmt
    name, sets = FORMATS[fmt]
    path = folder / name
    sets = [s.format(dir=folder) for s in sets]
    flags = [a for s in sets for a in ("--set", s)]
    row: dict = {"format": fmt, "sets": " ".join(s for s in sets if "path" not in s)}
    done, _ = cli("data", "synth", "--config", config, "--out", str(path), "--format", fmt)
    if done.returncode != 0:
        return {**row, "status": f"synth failed: {done.stderr.strip().splitlines()[-1]}"}
    done, seconds = cli("data", "inspect", str(path), "--config", config, *flags, "--out", str(folder / "report"))
    if done.returncode != 0:
        return {**row, "status": f"inspect failed: {done.stderr.strip().splitlines()[-1]}"}
    report = (folder / "report" / "data-report.md").read_text()
    kept = next(line for line in report.splitlines() if line.startswith("- after cleaning"))
    row.update({"inspect-s": seconds, "kept": kept.split(": ", 1)[1]})
    done, seconds = cli("simulate", "--config", config, *flags, "--set", f"data-path={path}", "--set",
                        f"base-dir={folder / 'base'}", "--run-dir", str(folder / "run"), "--no-progress")
    row["simulate-s"] = seconds
    if done.returncode != 0:
        return {**row, "status": f"simulate failed: {done.stderr.strip().splitlines()[-1][:200]}"}
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines() if line]
    final = [r for r in records if r["scope"] == "evaluate"][-1]["metrics"]
    row.update({"status": "ok", "intent-auc": final.get("intent-auc"), "next-hr@10": final.get("next-hr@10"),
                "popularity-hr@10": final.get("next-popularity-hr@10"), "oracle": final.get("next-oracle-hr@10")})
    return row


def _f(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--out", default="runs/formats")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    rows = []
    for fmt in args.formats.split(","):
        print(f"{fmt} ...", file=sys.stderr, flush=True)
        rows.append(run_format(fmt, args.config, out))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    lines = ["| format | settings | after cleaning and assignment | inspect s | simulate s | status | intent AUC | "
             "next HR@10 | popularity HR@10 | oracle |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['sets']} | {r.get('kept', '')} | {r.get('inspect-s', 0):.0f} | "
                     f"{r.get('simulate-s', 0):.0f} | {r['status']} | {_f(r.get('intent-auc'))} | "
                     f"{_f(r.get('next-hr@10'))} | {_f(r.get('popularity-hr@10'))} | {_f(r.get('oracle'))} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        command = f"nice -n 10 python bench/formats.py --config {args.config}"
        section = (f"## Formats\n\n`{command}` ({time.strftime('%Y-%m-%d')}, 2 shared cores): the tiny "
                   "synthetic world written in each format by `fedshop data synth --format F`, then `fedshop data "
                   "inspect` and a 2-round `fedshop simulate` (3 merchants, DP ε 8, its own tiny base pretrained on "
                   "the file's public split). Seconds include process start and, for simulate, pretraining. Real "
                   "data has no oracle (n/a). Transactions keep purchases only (each also a view), so every intent "
                   "label is yes and its AUC is undefined.\n\n" + text)
        write_section("formats", section)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
