"""Benchmark: merchant faults injected for real on a 10-merchant, 5-round tiny federation, against a fault-free run.

    python bench/faults.py [--config configs/tiny.toml] [--set base-dir=...] [--out runs/bench-faults] [--write]

Runs `fedshop simulate` once fault-free and once per fault plan (kind x count, `fault-injection`), all with the same
config, seed and `round-timeout`, then prints a table; `--write` puts it into BENCHMARKS.md. Columns: the faults
injected, the rounds completed, the failures the run recorded (ledger rows with status failed, and rejected
updates), the final round's next HR@10 and intent AUC with their standard errors (the report's) and their difference
from the fault-free run, and "ledger checked": every ledger row that carries steps (trained, and failed with steps)
has the epsilon an independent Opacus RDP accountant gives for that merchant's rows up to it.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

from opacus.accountants import RDPAccountant

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.sections import write_section  # noqa: E402
from server.report import with_standard_errors  # noqa: E402
from shared.ledger import number  # noqa: E402
from shared.rundir import RunDirectory  # noqa: E402

ROUND_TIMEOUT = 120  # seconds: above a fault-free round of 10 tiny merchants on 2 cores, so only a hang trips it
PLANS = (  # (kind, fault-injection): each fault strikes after a trained round, so its round is charged
    ("none", ""),
    ("raise", "raise@m1:2,raise@m4:4"),
    ("exit", "exit@m2:2,exit@m7:4"),
    ("hang", "hang@m3:3"),
    ("garbage", "garbage@m5:2,garbage@m8:4"),
    ("mixed", "raise@m1:2,exit@m2:3,hang@m3:4,garbage@m4:5"),
)
METRICS = (("next-hr@10", "next HR@10"), ("intent-auc", "intent AUC"))


def ledger_checked(run_dir: Path, delta: float) -> tuple[int, int, int]:
    """(rows whose epsilon matches an independent accountant, rows with steps, rows with unknown steps)."""
    rows = RunDirectory(run_dir).read_privacy()
    matched = with_steps = unknown = 0
    for merchant in sorted({r["merchant"] for r in rows}):
        accountant = RDPAccountant()
        for row in sorted((r for r in rows if r["merchant"] == merchant), key=lambda r: int(r["round"])):
            steps = int(row["steps"])
            if row["status"] == "failed" and steps == 0:
                unknown += 1
                continue
            if row["status"] not in ("trained", "failed") or steps == 0:
                continue
            noise, rate = number(row["noise_multiplier"]), number(row["sample_rate"])
            for _ in range(steps):  # stepped as Opacus's optimizer hook steps it
                accountant.step(noise_multiplier=noise, sample_rate=rate)
            with_steps += 1
            expected = accountant.get_epsilon(delta=delta)
            matched += math.isclose(number(row["epsilon"]), expected, rel_tol=1e-9)
    return matched, with_steps, unknown


def run_one(config: str, sets: list[str], kind: str, plan: str, run_dir: Path) -> dict:
    sets = [*sets, "num-merchants=10", "num-rounds=5", f"round-timeout={ROUND_TIMEOUT}", f"fault-injection={plan}",
            "progress=false"]
    command = [sys.executable, "-m", "server.cli", "simulate", "--config", config, "--run-dir", str(run_dir),
               "--force", *(a for s in sets for a in ("--set", s))]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    row = {"kind": kind, "plan": plan, "injected": len([e for e in plan.split(",") if e]), "ok": done.returncode == 0,
           "seconds": time.perf_counter() - started}
    directory = RunDirectory(run_dir)
    records = directory.read_metrics()
    trains = [r for r in records if r["scope"] == "train"]
    row["rounds"] = sum(1 for r in trains if r["metrics"].get("merchants-aggregated", 0) > 0)
    ledger = directory.read_privacy()
    row["failed"] = sorted(f"{r['merchant']}@{r['round']}" for r in ledger if r["status"] == "failed")
    row["rejected"] = sorted(f"{r['merchant']}@{t['round']}" for t in trains for r in t.get("rejected", []))
    evaluations = [r for r in records if r["scope"] == "evaluate"]
    row["final"] = with_standard_errors(evaluations[-1]) if evaluations else {}
    row["start"] = evaluations[0]["metrics"] if evaluations else {}  # round 0: the base alone
    row["ledger"] = ledger_checked(run_dir, 1e-5)
    if not row["ok"]:
        print(done.stderr[-2000:], file=sys.stderr)
    return row


def table(rows: list[dict]) -> str:
    clean = rows[0]["final"]
    lines = ["| kind | injected (kind@merchant:round) | rounds completed | failures recorded | rejected updates | "
             + " | ".join(f"{name} ± se | Δ {name}" for _, name in METRICS) + " | ledger checked | wall s |",
             "|" + "---|" * (7 + 2 * len(METRICS))]
    for r in rows:
        cells = []
        for key, _ in METRICS:
            value, se = r["final"].get(key, math.nan), r["final"].get(f"{key}-se", math.nan)
            cells.append(f"{value:.3f} ± {se:.3f}")
            cells.append("—" if r is rows[0] else f"{value - clean.get(key, math.nan):+.3f}")
        matched, total, unknown = r["ledger"]
        check = f"{matched}/{total} rows match" + (f", {unknown} unknown (first-round failure)" if unknown else "")
        lines.append(f"| {r['kind']} | {r['injected']}: `{r['plan'] or '—'}` | {r['rounds']}/5"
                     f"{'' if r['ok'] else ' (stopped)'} | {', '.join(r['failed']) or '—'} | "
                     f"{', '.join(r['rejected']) or '—'} | " + " | ".join(cells) + f" | {check} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--set", action="append", default=[], help="extra key=value for every run (e.g. base-dir)")
    parser.add_argument("--out", default="runs/bench-faults")
    parser.add_argument("--kinds", default=",".join(k for k, _ in PLANS), help="which plans to run (none first)")
    parser.add_argument("--write", action="store_true", help="also write the table into BENCHMARKS.md")
    args = parser.parse_args()
    wanted = args.kinds.split(",")
    rows = []
    for kind, plan in (p for p in PLANS if p[0] in wanted):
        print(f"{kind}: {plan or 'no faults'} ...", file=sys.stderr, flush=True)
        rows.append(run_one(args.config, args.set, kind, plan, ROOT / args.out / kind))
    text = table(rows)
    print(text)
    if args.write:
        sets = "".join(f" --set {s}" for s in args.set)
        command = f"python bench/faults.py --config {args.config}{sets} --write"
        section = (f"## Merchant faults\n\n`{command}` ({time.strftime('%Y-%m-%d')}, 2 cores shared with another "
                   f"simulation, nice 10): 10 merchants x 5 rounds of the tiny config, `round-timeout = "
                   f"{ROUND_TIMEOUT}`, `min-merchants = 1`, one run per row, same seed and data. Faults strike after "
                   "the merchant's DP-SGD steps (`fault-injection`). *Failures recorded* are the ledger's failed "
                   "rows (merchant@round), collateral ones included; a failed merchant is charged its round as if it "
                   "finished (the conservative rule). Metrics are the final round's test metrics pooled over "
                   "merchants ± the report's standard error; Δ is against the fault-free run. *Ledger checked*: "
                   "every ledger row with steps (trained, failed with steps) has the epsilon (δ = 1e-5) of a fresh "
                   "Opacus RDP accountant stepped over that merchant's rows up to it. For scale: the fault-free run "
                   "moves from round 0 (the base alone) "
                   + ", ".join(f"{name} {rows[0]['start'].get(key, math.nan):.3f}" for key, name in METRICS)
                   + " to the final figures below. An injected `exit` can also fail one other merchant in its round "
                   "(a message Ray handed to the actor while it restarted), listed among the failures.\n\n" + text)
        write_section("faults", section)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
