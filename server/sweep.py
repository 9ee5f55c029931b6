"""`fedshop sweep`: the same federation at several privacy budgets, audited, as one table and one plot.

Every run shares the config (data, seed, schedule, base) and differs only in `target-epsilon`; `inf` is the
non-private run (dp = false, same sampler and steps). Each run is a `fedshop simulate` subprocess, so one failing
run is reported and the sweep goes on (its exit status counts: a run that wrote no report of its own has failed);
each finished run is then audited (`fedshop audit`).
"""

from __future__ import annotations

import csv
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

from server.audit import audit_run, read_audit
from server.report import with_standard_errors
from shared.config import FedShopConfig, load_config
from shared.errors import UserError
from shared.files import make_dir
from shared.ledger import (
    MERCHANT_LEVEL,
    STATUS_FAILED,
    epsilon_by_merchant,
    merchant_level_epsilon,
    merchant_level_rows,
    number,
)
from shared.privacy import PrivacyBudget
from shared.rundir import RunDirectory

log = logging.getLogger("fedshop")
METRICS = (("intent-auc", "purchase intent AUC"), ("next-hr@10", "next item HR@10"),
           ("next-ndcg@10", "next item NDCG@10"), ("next-mrr", "next item MRR"))
AUDIT = (("mia-auc", "MIA AUC"), ("mia-tpr@1%fpr", "MIA TPR@1%FPR"), ("canary-auc", "canary AUC"),
         ("eps-emp", "eps_emp"))
COLUMNS = ("target_epsilon", "status", "unit", "delta", "accountant", "epsilon_max", "epsilon_mean",
           "noise_multiplier", "epsilon_merchant_level", *(c for k, _ in METRICS for c in (k, f"{k}-se")),
           *(k for k, _ in AUDIT), "seconds")


def parse_epsilons(text: str) -> list[float]:
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = float(part)
        except ValueError:
            raise UserError(f"--epsilons: {part!r} is not a number or inf; expected e.g. 0.5,1,2,4,8,inf") from None
        if not value > 0 or math.isnan(value):
            raise UserError(f"--epsilons: {part!r} must be > 0 (use inf for the non-private run)")
        values.append(value)
    if not values:
        raise UserError("--epsilons: no budgets given")
    return sorted(dict.fromkeys(values))


def label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def run_sweep(config_path: Path | None, overrides: list[str], epsilons: list[float], out: Path) -> list[dict]:
    config = load_config(config_path, overrides)  # refuse a bad config before the first run
    make_dir(out, "--run-dir (the sweep directory)")
    rows = []
    for i, epsilon in enumerate(epsilons, 1):
        run_dir = out / f"eps-{label(epsilon)}"
        budget = ["dp=false"] if math.isinf(epsilon) else ["dp=true", f"target-epsilon={epsilon!r}"]
        log.info("sweep %d/%d: epsilon %s -> %s", i, len(epsilons), label(epsilon), run_dir)
        # --force: a sweep directory used again keeps its earlier runs, moved aside to eps-<x>.old-<time>
        command = [sys.executable, "-m", "server.cli", "simulate", "--force", *(["--config", str(config_path)]
                   if config_path else []), *(a for o in [*overrides, *budget, f"run-dir={run_dir}"]
                                              for a in ("--set", o))]
        started = time.perf_counter()
        status = "ok"
        if subprocess.run(command, check=False).returncode != 0:
            status = "simulate failed"
            log.error("sweep: the run at epsilon %s failed (see its log above); going on", label(epsilon))
        elif config.audit_canaries or config.audit_holdout:
            try:
                audit_run(run_dir)
            except Exception as exc:  # noqa: BLE001 - one failed audit must not end the sweep
                status = f"audit failed: {exc}"
                log.error("sweep: the audit at epsilon %s failed: %s; going on", label(epsilon), exc)
        rows.append(summarize(run_dir, config.replace(dp=not math.isinf(epsilon), target_epsilon=epsilon
                                                      if math.isfinite(epsilon) else config.target_epsilon),
                              epsilon, status, time.perf_counter() - started))
        write_outputs(out, rows, config)
    return rows


def summarize(run_dir: Path, config: FedShopConfig, epsilon: float, status: str, seconds: float) -> dict:
    """One row of the sweep table. Epsilon max / mean is per merchant of its own DP-SGD (event or shopper unit), or
    the merchant-level epsilon for the merchant unit, inf without DP; the merchant-level epsilon of central DP (the
    merchant unit, or central-dp on top of an event or shopper unit) has its own column."""
    budget = PrivacyBudget.for_server(config) if config.privacy_unit == "merchant" else \
        PrivacyBudget.for_merchants(config)
    row: dict = {"target_epsilon": label(epsilon), "status": status, "delta": budget.delta, "unit": budget.unit,
                 "accountant": budget.ledger_accountant, "seconds": round(seconds, 1)}
    directory = RunDirectory(run_dir)
    ledger = directory.read_privacy()
    central = merchant_level_rows(ledger)
    row["epsilon_merchant_level"] = merchant_level_epsilon(ledger) if central else math.nan
    if not budget.private:
        spent, noise = [math.inf], [0.0]
    elif budget.unit == "merchant":
        spent = [row["epsilon_merchant_level"]] if central else []
        noise = [number(r["noise_multiplier"]) for r in central]
    else:
        spent = list(epsilon_by_merchant(ledger).values())
        last = {r["merchant"]: r for r in ledger if r["merchant"] != MERCHANT_LEVEL and r["status"] != STATUS_FAILED}
        noise = [number(r["noise_multiplier"]) for r in last.values()]
    row["epsilon_max"] = max(spent) if spent else math.nan
    row["epsilon_mean"] = sum(spent) / len(spent) if spent else math.nan
    row["noise_multiplier"] = sum(noise) / len(noise) if noise else math.nan
    evaluations = [r for r in directory.read_metrics() if r["scope"] == "evaluate"]
    final = with_standard_errors(evaluations[-1]) if evaluations else {}
    for key, _ in METRICS:
        row[key] = _value(final.get(key))
        row[f"{key}-se"] = _value(final.get(f"{key}-se"))
    audit = read_audit(run_dir) or {}
    for key, _ in AUDIT:
        value = audit.get(key)
        row[key] = math.nan if value is None else value
    return row


def _value(value) -> float:
    return math.nan if value is None else float(value)


def _cell(value) -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.3f}")
    return str(value)


def write_outputs(out: Path, rows: list[dict], config: FedShopConfig) -> None:
    with (out / "sweep.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    unit = config.privacy_unit
    lines = [f"# Privacy-budget sweep — `{out}`", "",
             f"{config.num_merchants} merchants x {config.num_rounds} rounds, unit **{unit}**, delta "
             f"{config.target_delta:g}, {config.accountant} accountant, same data, seed and schedule in every row; "
             "`inf` is the non-private run. Epsilon is per merchant, composed over all rounds (max and mean over "
             "merchants); merchant-level eps is the server's central DP (n/a without it). Audit: loss-threshold "
             "membership attack (members vs held-out shoppers) and the one-run "
             "canary audit's lower bound eps_emp at the same delta (95 % confidence). ± is one standard error of "
             "the test metric (binomial for HR@10, Hanley-McNeil for AUC, the binomial bound for NDCG and MRR; the "
             "report's SE words give the detail); the plot's bars are ±1 SE.", "",
             "| target eps | eps max | eps mean | noise mult. | merchant-level eps | "
             + " | ".join(n for _, n in METRICS) + " | " + " | ".join(n for _, n in AUDIT) + " | s | status |",
             "|" + "---|" * (7 + len(METRICS) + len(AUDIT))]
    for r in rows:
        lines.append(f"| {r['target_epsilon']} | {_cell(r['epsilon_max'])} | {_cell(r['epsilon_mean'])} | "
                     f"{_cell(r['noise_multiplier'])} | {_cell(r['epsilon_merchant_level'])} | "
                     + " | ".join(_with_se(r, k) for k, _ in METRICS) + " | "
                     + " | ".join(_cell(r[k]) for k, _ in AUDIT) + f" | {r['seconds']:.0f} | {r['status']} |")
    if plot(out, rows):
        lines += ["", "![utility vs epsilon](privacy_utility.png)"]
    (out / "sweep.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _with_se(row: dict, key: str) -> str:
    se = row.get(f"{key}-se", math.nan)
    return _cell(row[key]) + ("" if isinstance(se, float) and math.isnan(se) else f" ± {_cell(se)}")


def plot(out: Path, rows: list[dict]) -> bool:
    private = [r for r in rows if r["target_epsilon"] != "inf" and r["status"] == "ok"]
    reference = next((r for r in rows if r["target_epsilon"] == "inf" and r["status"] == "ok"), None)
    if not private:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [float(r["target_epsilon"]) for r in private]
    for i, (key, name) in enumerate(METRICS):
        ys = [float(r[key]) for r in private]
        if all(math.isnan(y) for y in ys):
            continue
        color = f"C{i}"
        ax.errorbar(xs, ys, yerr=[float(r.get(f"{key}-se", math.nan)) for r in private], marker="o", color=color,
                    label=name, capsize=3)
        if reference is not None and not math.isnan(float(reference[key])):
            ax.axhline(float(reference[key]), color=color, linestyle="--", alpha=0.6)
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("target epsilon per merchant (log scale)")
    ax.set_ylabel("test metric")
    ax.set_title("privacy-utility (dashed: non-private run)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "privacy_utility.png", dpi=100)
    plt.close(fig)
    return True
