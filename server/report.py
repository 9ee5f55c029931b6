"""`report.md`, `metrics.png` and `price_curve.png`: what a person reads first, built from `metrics.jsonl`,
`privacy.csv` and, when reference runs were trained, `references.json`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from server.audit import describe, read_audit
from server.continuation import continuation_lines
from shared.config import FedShopConfig
from shared.files import write_text_atomic
from shared.ledger import (
    STATUS_DECLINED,
    STATUS_FAILED,
    STATUS_RELEASED,
    epsilon_by_merchant,
    merchant_level_epsilon,
    merchant_level_rows,
    number,
)
from shared.metrics import compare, decide, standard_errors
from shared.rundir import RunDirectory

REFERENCES_FILE = "references.json"
WIDE_WORDS = (" with the wide part (per-token yes weights of intent and churn; next item's per-item biases and "
              "per-category weights of staying in the last item's category; shared/wide.py)")
PAIRED = "paired"  # the key of `references.json` that holds the paired comparisons, beside the reference runs


def _read_references_file(run_dir: str | Path) -> dict:
    path = Path(run_dir) / REFERENCES_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def read_references(run_dir: str | Path) -> dict:
    """The reference runs of `references.json`: {kind: {"metrics": ..., "merchants": ..., ...}}."""
    return {k: v for k, v in _read_references_file(run_dir).items() if k != PAIRED}


def read_paired(run_dir: str | Path) -> dict:
    """The paired comparisons of `references.json`: {"federated vs <scorer>": {metric: {"a", "b", "difference",
    "se", "shoppers", "examples", ...}}}; {} when the run has none."""
    return _read_references_file(run_dir).get(PAIRED, {})


def with_standard_errors(record: dict) -> dict:
    """The metrics of an evaluate record or a reference run, with `<key>-se` from the counts of its merchants."""
    metrics = record.get("metrics", {})
    return {**metrics, **standard_errors(metrics, record.get("merchants", {}).values())}


def figure(value: Any, digits: int = 3) -> str:
    """A figure as reports and model cards print it: n/a for none or nan, inf, else `digits` decimals."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _pm(metrics: dict, key: str, digits: int = 3) -> str:
    """A figure with its standard error (`0.812 ± 0.014`) when `metrics` holds a finite `<key>-se`."""
    se = metrics.get(f"{key}-se")
    text = figure(metrics.get(key), digits)
    return text + f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) and text != "n/a" else text


def aggregation_lines(config: FedShopConfig, trains: list[dict]) -> list[str]:
    """The aggregation method, the bytes each merchant sent and received, and every rejected update."""
    robust = "" if config.robust == "none" else (
        f", robust merge {config.robust}" + (f" (trim {config.trim_fraction:g})" if config.robust == "trimmed-mean"
                                             else ""))
    bound = "off" if config.update_norm_bound is None else f"{config.update_norm_bound:g}"
    lines = [f"- method: {config.aggregation}{robust}; update-norm bound {bound}, min-merchants "
             f"{config.min_merchants}"]
    uplink = [number(t["metrics"].get("uplink-bytes-mean")) for t in trains]
    downlink = [number(t["metrics"].get("downlink-bytes-mean")) for t in trains]
    uplink, downlink = [v for v in uplink if math.isfinite(v)], [v for v in downlink if math.isfinite(v)]
    secure = [t["metrics"] for t in trains if "secure-bytes-received" in t["metrics"]]
    if uplink:
        what = "all four SecAgg+ stages" if secure else "tensor data"
        lines.append(f"- bytes per merchant per round ({what}): uplink {sum(uplink) / len(uplink):,.0f}, "
                     f"downlink {sum(downlink) / max(1, len(downlink)):,.0f}")
    if secure:
        seconds = _mean([number(m["secure-seconds"]) for m in secure])
        lines.append(f"- secure aggregation (SecAgg+, `secure-aggregation = true`): the server received only masked "
                     f"updates ({sum(int(number(m['secure-arrays-received'])) for m in secure)} tensors received in "
                     f"{len(secure)} round(s)) and unmasked their weighted mean, {seconds:.1f} s a round for the "
                     "protocol including the training inside it; the update-norm bound and the screening of "
                     "updates applied to that mean, and each merchant checked its own update before masking it")
    dropped = [number(t["metrics"]["svd-dropped-energy-max"]) for t in trains
               if "svd-dropped-energy-max" in t["metrics"]]
    if dropped:
        lines.append(f"- SVD truncation: largest share of energy dropped in a layer {max(dropped):.3g}")
    rejected = [(t["round"], r) for t in trains for r in t.get("rejected", [])]
    lines.append(f"- rejected updates: {len(rejected)}" + ("" if not rejected else ": " + "; ".join(
        f"{r['merchant']} round {rnd} ({r['reason']})" for rnd, r in rejected)))
    return lines


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def timing_lines(trains: list[dict]) -> list[str]:
    """Where a train round's wall time goes, from `round-seconds` and each trained merchant's `train-seconds` /
    `message-seconds` ([] for a run recorded before these existed)."""
    rounds = [t for t in trains if math.isfinite(number(t["metrics"].get("round-seconds")))]
    if not rounds:
        return []
    merchants = [[m for m in t.get("merchants", {}).values() if not m.get("declined") and "train-seconds" in m]
                 for t in rounds]
    seconds = [number(t["metrics"]["round-seconds"]) for t in rounds]
    trained = [m for ms in merchants for m in ms]
    train = [number(m["train-seconds"]) for m in trained]
    message = [number(m["message-seconds"]) for m in trained]
    share = sum(train) / sum(message) if sum(message) > 0 else math.nan
    busy = sum(message) / sum(seconds) if sum(seconds) > 0 else math.nan
    return [f"- time per train round: {figure(_mean(seconds), 1)} s at the server (train messages sent to updates "
            f"aggregated); per merchant that trained, {figure(_mean(message), 1)} s in its train handler, of which "
            f"{figure(_mean(train), 1)} s in the training steps: **training share {figure(100 * share, 0)}%** of "
            f"the handlers' time (the rest: loading the base and the data, encoding, packing the reply), over "
            f"{len(rounds)} round(s); handlers' seconds / round seconds = {figure(busy, 1)} (how many merchants "
            "trained at once on average; what is left of the round is messaging, scheduling and aggregation)"]


# (key prefix, task title, explanation, [(column label, key suffix)])
TASK_TABLES = (
    ("intent", "Purchase intent", "Does the shopper buy the viewed candidate at the offered price? The baseline is a "
     "logistic regression on the candidate's training purchase rate, the shopper's affinity to its category and the "
     "price level.", (("AUC", "auc"), ("log-loss", "logloss"), ("ECE", "ece"))),
    ("next", "Next item", "Full-catalogue ranking of the next item viewed, items the shopper has seen excluded, ties "
     "counted against the scorer.", (("HR@5", "hr@5"), ("HR@10", "hr@10"), ("NDCG@5", "ndcg@5"),
                                     ("NDCG@10", "ndcg@10"), ("MRR", "mrr"))),
    ("churn", "Churn", "Does the shopper come back (any event) within the horizon after a calendar cutoff? The "
     "baseline is a logistic regression on recency/frequency features (sessions, views, mean gap, days since the last "
     "event, bought in the last session).", (("AUC", "auc"), ("log-loss", "logloss"),
                                            ("ECE", "ece"))),
)
BASELINE_ROWS = {  # task -> [(row label, key prefix)]
    "intent": [("logistic baseline (item rate, category affinity, price)", "intent-baseline")],
    "next": [("first-order Markov chain", "next-markov"), ("popularity", "next-popularity")],
    "churn": [("recency/frequency logistic baseline", "churn-baseline")],
    "price": [("logistic baseline (log price level)", "price-baseline")],
}
ITEM_ID_WORDS = {"token": "items written as one token each",
                 "semantic": "items written as semantic ids (category, co-view cluster, price band, slot; ranking "
                             "decodes only valid ids)"}
REFERENCE_LABELS = {"local-only": "local-only (each merchant alone, same DP budget)",
                    "centralised": "centralised (pooled data, no DP)"}


def scorer_rows(final: dict, start: dict, references: dict, prefix: str) -> list[tuple[str, str, dict]]:
    """(row label, key prefix, metrics) of the model, the base and the reference runs for one task."""
    rows = [("**federated model**", prefix, final), ("base alone (round 0)", prefix, start)]
    for kind, label in REFERENCE_LABELS.items():
        if kind in references:
            rows.append((label, prefix, references[kind]["metrics"]))
    return rows


def _metric_table(columns, rows: list[tuple[str, str, dict]]) -> list[str]:
    """A markdown table of `columns` ((label, key suffix)) for each (row label, key prefix, metrics) that has any."""
    lines = ["| scorer | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, prefix, metrics in rows:
        keys = [f"{prefix}-{suffix}" for _, suffix in columns]
        if any(metrics.get(k) is not None for k in keys):
            lines.append(f"| {label} | " + " | ".join(_pm(metrics, k) for k in keys) + " |")
    return lines + [""]


def task_tables(final: dict, start: dict, references: dict) -> list[str]:
    """One table per task: the federated model, the base, the reference runs, the baselines and the Bayes oracle."""
    lines: list[str] = []
    for task, title, words, columns in TASK_TABLES:
        if f"{task}-{columns[0][1]}" not in final:
            continue
        rows = scorer_rows(final, start, references, task)
        rows += [(label, prefix, final) for label, prefix in BASELINE_ROWS[task]]
        rows.append(("Bayes oracle (synthetic truth)", f"{task}-oracle", final))
        lines += [f"### {title}", "", words, ""] + _metric_table(columns, rows)
        if task == "next" and "next-new-hr@10" in final:
            lines += [f"The {final['next-new-examples']:.0f} test targets the base never saw (items with no view in "
                      "the public split), pooled over merchants:", ""]
            lines += _metric_table(columns, scorer_rows(final, start, references, "next-new"))
    if "price-elasticity" in final:
        levels = _price_levels(final)
        lines += ["### Price sensitivity", "",
                  "The intent head asked at every price level (offered price / list price) for each test view: the "
                  "mean purchase probability per level, the elasticity (slope of log mean probability on log price) "
                  "and the mean absolute distance to the true curve of each view.", "",
                  "| scorer | " + " | ".join(f"P(buy) at {t}" for t in levels) + " | elasticity | curve MAE |",
                  "|---" * (len(levels) + 3) + "|"]
        rows = scorer_rows(final, start, references, "price")
        rows += [(label, prefix, final) for label, prefix in BASELINE_ROWS["price"]]
        rows.append(("truth (synthetic generator)", "price-oracle", final))
        for label, prefix, metrics in rows:
            if f"{prefix}-elasticity" not in metrics:
                continue
            lines.append(f"| {label} | " + " | ".join(figure(metrics.get(f"{prefix}-p@{t}")) for t in levels)
                         + f" | {figure(metrics.get(f'{prefix}-elasticity'), 2)} | "
                         + f"{_pm(metrics, f'{prefix}-curve-mae') if prefix != 'price-oracle' else '-'} |")
        lines.append("")
    return lines


COMPARISONS = (  # (what, task, model key, higher is better)
    ("purchase intent AUC", "intent", "intent-auc", True),
    ("next item HR@10", "next", "next-hr@10", True),
    ("churn AUC", "churn", "churn-auc", True),
    ("price curve MAE", "price", "price-curve-mae", False),
)


PAIRED_NAMES = {"the base alone (round 0)": "round 0", **{label: kind for kind, label in REFERENCE_LABELS.items()},
                **{label: prefix for rows in BASELINE_ROWS.values() for label, prefix in rows}}  # row -> paired name


def verdict_lines(final: dict, start: dict, references: dict, paired: dict | None = None) -> list[str]:
    """The claims a reader checks first: the final federated model against the base alone (round 0), the reference
    runs and the baselines, each decided by `shared.metrics.decide` and shown with its difference and SE: the paired
    bootstrap SE where `paired` (from `references.json`) holds the comparison, else the unpaired SE from aggregates."""
    lines = []
    for what, task, key, higher in COMPARISONS:
        if final.get(key) is None:
            continue
        suffix = key.split("-", 1)[1]
        others = [("the base alone (round 0)", start, key)]
        others += [(label, references[kind]["metrics"], key) for kind, label in REFERENCE_LABELS.items()
                   if kind in references]
        others += [(label, final, f"{prefix}-{suffix}") for label, prefix in BASELINE_ROWS[task]]
        parts = []
        for label, metrics, other in others:
            if metrics.get(other) is None:
                continue
            pair = (paired or {}).get(f"federated vs {PAIRED_NAMES[label]}", {}).get(key)
            if pair is not None and math.isfinite(number(pair["se"])):
                c = decide(number(pair["difference"]), number(pair["se"]), higher_is_better=higher)
                parts.append(f"  - {c.verdict} {label} {_pm(metrics, other)} (paired bootstrap over "
                             f"{pair['shoppers']} test shoppers: on all {pair['examples']} test examples pooled "
                             f"{figure(pair['a'])} vs {figure(pair['b'])}, difference {c.difference:+.3f} ± "
                             f"{figure(c.standard_error)})")
                continue
            c = compare(number(final[key]), number(final.get(f"{key}-se")), number(metrics[other]),
                        number(metrics.get(f"{other}-se")), higher_is_better=higher)
            parts.append(f"  - {c.verdict} {label} {_pm(metrics, other)} (difference {c.difference:+.3f} ± "
                         f"{figure(c.standard_error)})")
        if parts:
            lines += [f"- federated {what} {_pm(final, key)}:"] + parts
    return lines


SE_WORDS = (
    "± is one standard error, computed from the figure and the pooled test counts as if all merchants' test examples "
    "were scored at once (the figures are means over merchants weighted by test shoppers): Hanley-McNeil for AUC, "
    "binomial for HR@K, and the binomial form as a conservative upper bound for NDCG, MRR and the price-curve MAE "
    "(log-loss and ECE have none). A verdict says \"beats\" only when the difference exceeds twice its standard "
    "error, \"is beaten by\" below minus twice, \"level with\" in between. Without \"paired bootstrap\" the "
    "standard error of the difference is the unpaired sqrt(se_A² + se_B²), which ignores that every scorer sees the "
    "same test examples, so it errs towards \"level with\".")
PAIRED_WORDS = (
    "A line marked \"paired bootstrap\" compares the two scorers example by example: both figures are computed once "
    "over all merchants' test examples pooled (for AUC this pooled figure is not the shopper-weighted mean of the "
    "merchants' AUCs shown above it; for HR@10 the two agree up to weighting), and the standard error of their "
    "difference is the spread of that difference over 1,000 resamples of the test shoppers with replacement (a "
    "shopper's examples drawn together, fixed seed). See \"paired\" in `references.json`, which also holds NDCG@10, "
    "MRR and the analytic paired SE of each ranking metric.")


def base_words(meta: dict, config: FedShopConfig) -> str:
    """How a report names the base a run loaded: its preset (T5 `small`) or the checkpoint it was pretrained from
    (config key base-model), from the base's metadata."""
    if meta.get("base-model"):
        return f"T5 checkpoint `{meta['base-model']}`"
    return f"T5 `{meta.get('model-size', config.model_size)}`"


FAILURE_RULE = ("Conservative rule: a merchant that failed (raised, its process exited, or no reply within "
                "round-timeout) may have failed after it started training, so its round is charged as if it finished: "
                "its ledger row (status failed) carries the noise multiplier, sample rate and steps of its last "
                "trained round and the epsilon of its history with that round added, and every later epsilon composes "
                "it. A merchant that failed before any trained round has no schedule the server could know: its row "
                "says epsilon NaN and 0 steps, and that round is not in its epsilon.")


def failure_lines(ledger: list[dict[str, str]], trains: list[dict], records: list[dict]) -> list[str]:
    """The run's merchant failures per merchant and round (with the reason each train record gives), the
    conservative ledger rule, and a stop, if the run stopped."""
    failed = [r for r in ledger if r["status"] == STATUS_FAILED]
    stopped = [r for r in records if r["scope"] == "stopped"]
    if not failed and not stopped:
        return []
    reasons = {(f["merchant"], t["round"]): f["reason"] for t in trains for f in t.get("failed", [])}
    lines = ["", "### Merchant failures", "", FAILURE_RULE, "", "| merchant | round | steps charged | epsilon | why |",
             "|---|---|---|---|---|"]
    for row in sorted(failed, key=lambda r: (r["merchant"], int(r["round"]))):
        charged = int(row["steps"])
        lines.append(f"| {row['merchant']} | {row['round']} | {charged if charged else '0 (unknown schedule)'} | "
                     f"{figure(number(row['epsilon']), 3)} | "
                     f"{reasons.get((row['merchant'], int(row['round'])), '-').replace('|', '/')} |")
    rejected = [(r["merchant"], t["round"], r["reason"]) for t in trains for r in t.get("rejected", [])]
    if rejected:
        lines.append("")
        lines.append("Rejected updates (the merchant trained and is charged as trained; its update was not "
                     "aggregated): " + "; ".join(f"{m} round {k} ({why})" for m, k, why in rejected) + ".")
    for stop in stopped:
        lines += ["", f"**The run stopped:** {stop.get('reason', '')}"]
    return lines


def wide_words(config: FedShopConfig, base_meta: dict) -> str:
    if not config.wide:
        return ""
    start = "the weights pretrained with the base" if base_meta.get("wide") else "zero (a base pretrained without it)"
    return f"{WIDE_WORDS}, starting from {start}"


def write_report(run_dir: RunDirectory, config: FedShopConfig, base_meta: dict) -> None:
    records = run_dir.read_metrics()
    evaluations = {r["round"]: r for r in records if r["scope"] == "evaluate"}
    trains = {r["round"]: r for r in records if r["scope"] == "train"}
    ledger = run_dir.read_privacy()
    references, paired = read_references(run_dir.path), read_paired(run_dir.path)
    last_round = max(evaluations) if evaluations else 0
    final = with_standard_errors(evaluations.get(last_round, {}))
    start = with_standard_errors(evaluations.get(0, {}))
    references = {kind: {**run, "metrics": with_standard_errors(run)} for kind, run in references.items()}
    unit, delta = config.privacy_unit, config.target_delta
    privacy_words = (f"DP, unit {unit}, target epsilon {config.target_epsilon:g} at delta {delta:g} "
                     f"({config.accountant} accountant)" if config.dp else "no DP (non-private comparison run)")
    lines = [
        f"# fedshop run report — `{run_dir.path}`", "",
        f"{config.num_merchants} merchants x {config.num_rounds} rounds, {base_words(base_meta, config)} base from "
        f"`{config.base_dir}` (pretrained without DP on the public split), LoRA r={config.lora_r} "
        f"alpha={config.lora_alpha:g} on {config.lora_targets}"
        f"{wide_words(config, base_meta)}; "
        f"{privacy_words}; tasks {config.tasks}, trained on {config.train_tasks} (churn horizon "
        f"{config.churn_horizon_days:g} days); {ITEM_ID_WORDS[config.item_ids]}.", "",
    ]
    resumed = sorted(int(p.stem.rsplit("-", 1)[1]) for p in run_dir.path.glob("config-before-round-*.toml"))
    if resumed:
        lines += [f"Resumed in place at round {', '.join(map(str, resumed))} (rounds 1-{last_round} in all): "
                  "metrics, ledger and checkpoints run on over every part, each merchant's epsilon composes all of "
                  "them; the config above is the last part's, each earlier part's is `config-before-round-<N>.toml`.",
                  ""]
    sampled = config.fraction_evaluate < 1  # round 0 and the last round scored different merchants
    verdict = verdict_lines(final, start if last_round and not sampled else {}, references, paired)
    if verdict:
        lines += ["## In one look", ""] + verdict + ["", SE_WORDS, ""] + ([PAIRED_WORDS, ""] if paired else [])
    lines += [
        "## Test metrics (leave-last-out in time per shopper, weighted over merchants by test shoppers)", "",
        "Every scorer is evaluated on the same test examples; baselines are fitted on each merchant's training "
        "examples only. Round 0 is the pretrained base before any federated training. "
        + (f"With fraction-evaluate {config.fraction_evaluate:g} each round's evaluation is a fresh sample of "
           "merchants: the model rows are the last round's sample, round 0 another one (no verdict compares them). "
           if sampled else "") + "± is one standard error"
        + (" (see above). " if verdict else ". ")
        + ("Reference runs: " + ", ".join(REFERENCE_LABELS[k] for k in references) + "; see `references.json`."
           if references else "No reference runs (set references = \"local-only,centralised\")."), "",
    ]
    lines += task_tables(final, start, references)
    if "intent-auc" in final and final.get("intent-oracle-auc"):
        gap = (number(final["intent-auc"]) - 0.5) / (number(final["intent-oracle-auc"]) - 0.5)
        lines += [f"Purchase intent closes **{gap:.0%}** of the gap between 0.5 and the Bayes-oracle AUC.", ""]
    local = references.get("local-only", {}).get("merchants", {})
    columns = [("intent AUC", "intent-auc"), ("next HR@10", "next-hr@10"), ("churn AUC", "churn-auc"),
               ("price elasticity", "price-elasticity")]
    merchants = evaluations.get(last_round, {}).get("merchants", {})
    present = [(label, key) for label, key in columns if any(key in v for v in merchants.values())]
    lines += ["## Per merchant (final round; local-only in brackets)", "",
              "| merchant | test shoppers | " + " | ".join(label for label, _ in present)
              + f" | epsilon (delta {delta:g}, {unit}) |", "|---" * (len(present) + 3) + "|"]
    spent = epsilon_by_merchant(ledger)
    for merchant, values in merchants.items():
        cells = []
        for _, key in present:
            alone = local.get(merchant, {}).get(key)
            cells.append(figure(values.get(key)) + (f" ({figure(alone)})" if alone is not None else ""))
        lines.append(f"| {merchant} | {values.get('num-examples')} | " + " | ".join(cells)
                     + f" | {figure(spent.get(merchant), 2)} |")
    lines += ["", "## Per round", "", "| round | merchants trained | train loss | epsilon max | intent AUC | "
              "next HR@10 | churn AUC |", "|---|---|---|---|---|---|---|"]
    for rnd in sorted(evaluations):
        train = trains.get(rnd, {}).get("metrics", {})
        metrics = evaluations[rnd]["metrics"]
        lines.append(f"| {rnd} | {train.get('merchants-trained', '-')} | {figure(train.get('train-loss'))} | "
                     f"{figure(number(train.get('epsilon-max')), 2) if train else '-'} | "
                     f"{figure(metrics.get('intent-auc'))} | "
                     f"{figure(metrics.get('next-hr@10'))} | {figure(metrics.get('churn-auc'))} |")
    lines += ["", "## Aggregation", ""]
    lines += aggregation_lines(config, [trains[r] for r in sorted(trains)])
    lines += timing_lines([trains[r] for r in sorted(trains)])
    lines += ["", "## Privacy", ""]
    lines += privacy_lines(config, ledger)
    lines += continuation_lines(run_dir.path)
    for resume in run_dir.resumes():
        lines.append(f"- **Resumed** ({resume['at']}) after the run stopped: rounds from {resume['first-round']} on "
                     f"started from `checkpoints/round-{resume['checkpoint']}`, each merchant's accountant history "
                     "read back from `privacy.csv` (every step taken before the stop counts, a round under way "
                     "included).")
    lines += failure_lines(ledger, [trains[r] for r in sorted(trains)], records)
    declined = [r for r in ledger if r["status"] == STATUS_DECLINED]  # failed rows have their own table
    if declined:
        lines.append(f"- {len(declined)} merchant-round(s) did not train: "
                     + ", ".join(f"{r['merchant']} round {r['round']} ({r['status']})" for r in declined))
    pre = base_meta.get("public-valid-metrics", {})
    if pre:
        lines += ["", "## Base model", "", f"Pretrained on {base_meta.get('public-shoppers')} public shoppers; on "
                  f"the public valid split: intent AUC {figure(pre.get('intent-auc'))}, next HR@10 "
                  f"{figure(pre.get('next-hr@10'))}."]
    audit = read_audit(run_dir.path)
    if audit:
        lines += ["", "## Empirical privacy audit", "", f"- {describe(audit)}.",
                  "- eps_emp is a statistical lower bound on the epsilon the training actually gave the canaries; a "
                  "DP run must show eps_emp <= its epsilon. See `audit.json`."]
    if _plot(run_dir, evaluations):
        lines += ["", "![metrics per round](metrics.png)"]
    if _plot_price(run_dir, final, references):
        lines += ["", "![price response](price_curve.png)"]
    write_text_atomic(run_dir.path / "report.md", "\n".join(lines) + "\n")


UNIT_WORDS = {
    "event": "each training example (one view of one shopper) is the protected record; a shopper with k examples "
             "is protected only at the weaker group level of k records",
    "shopper": "everything one shopper did at a merchant is the protected record: every DP-SGD step Poisson-samples "
               "shoppers and each sampled shopper adds one clipped gradient (the mean over up to examples-per-shopper "
               "of their examples), so epsilon bounds what the adapter reveals about any one shopper, however many "
               "events they have",
    "merchant": "a whole merchant's data is the protected record: the server clips each merchant's adapter update "
                "and adds Gaussian noise to the aggregate (central DP; the server sees the clipped updates)",
}


def privacy_lines(config: FedShopConfig, ledger: list[dict[str, str]]) -> list[str]:
    """The Privacy section: unit, epsilon at delta with its accountant, and what the guarantee does not cover."""
    if not config.dp:
        return ["- This run is **not private** (dp = false): no clipping, no noise, epsilon = inf."]
    delta, lines = config.target_delta, []
    if config.local_dp:
        spent = [v for v in epsilon_by_merchant(ledger).values() if math.isfinite(v)]
        lines += [
            f"- Unit: **{config.privacy_unit}** — {UNIT_WORDS[config.privacy_unit]}.",
            f"- Epsilon per merchant ({config.privacy_unit} level), composed over every round it trained, at delta = "
            f"{delta:g}, {config.accountant} accountant: max **{figure(max(spent) if spent else math.nan, 3)}**, mean "
            f"{figure(sum(spent) / len(spent) if spent else math.nan, 3)} (budget {config.target_epsilon:g}).",
            f"- DP-SGD with Opacus: clipping norm {config.max_grad_norm:g}, Poisson sampling of "
            f"{'shoppers' if config.privacy_unit == 'shopper' else 'examples'}, noise multiplier calibrated once over "
            f"{config.num_rounds} rounds x {config.local_epochs} local epoch(s); secure randomness "
            f"{'on' if config.secure_mode else 'off (not for production)'}; see `privacy.csv`.",
        ]
    if config.central:
        central = merchant_level_rows(ledger)
        released = [r for r in central if r["status"] == STATUS_RELEASED]
        eps = merchant_level_epsilon(ledger)
        noise = number(central[0]["noise_multiplier"]) if central else math.nan
        lines += [
            f"- Unit: **merchant** — {UNIT_WORDS['merchant']}.",
            f"- Merchant-level epsilon **{figure(eps, 3)}** at delta = {delta:g}, {config.accountant} accountant, over "
            f"{len(released)} released aggregate(s) (budget {config.merchant_level_target_epsilon:g}); update "
            f"clipping norm {config.central_clip_norm:g}, noise multiplier {figure(noise, 3)}, merchants sampled with "
            f"probability {config.fraction_train:g} per round (Flower's DifferentialPrivacyServerSideFixedClipping). "
            "The server's noise comes from numpy's generator, also in secure mode.",
        ]
    lines += ["- Only the LoRA tensors were trained with DP; the base was pretrained without DP on the public split, "
              "which holds no merchant's shoppers.",
              "- Not covered: the evaluation metrics the merchants report (computed on their test shoppers, not "
              "privatised), the number of examples each merchant reports, and the fact that a merchant took part."]
    return lines


def _price_levels(metrics: dict) -> list[str]:
    """The price-level tokens (x0.8 ...) the price metrics carry, in price order."""
    return sorted({k.split("@", 1)[1] for k in metrics if k.startswith("price-p@")}, key=lambda t: float(t[1:]))


def _line_plot(path, series: list[tuple[str, list[float], list[float], str]], xlabel: str, ylabel: str,
               xticks: list[float] | None = None) -> None:
    """One PNG of (label, x, y, line style) series; a series with no value at all is left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, x, y, style in series:
        if not all(math.isnan(v) for v in y):
            ax.plot(x, y, style, marker="o", label=label)
    if xticks is not None:
        ax.set_xticks(xticks)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot(run_dir: RunDirectory, evaluations: dict[int, dict]) -> bool:
    if len(evaluations) < 2:
        return False
    rounds = sorted(evaluations)
    series = [(label, rounds, [number(evaluations[r]["metrics"].get(key)) for r in rounds], "-")
              for key, label in (("intent-auc", "purchase intent AUC"), ("next-hr@10", "next item HR@10"),
                                 ("churn-auc", "churn AUC"))]
    _line_plot(run_dir.path / "metrics.png", series, "round (0 = pretrained base)", "test metric", xticks=rounds)
    return True


def _plot_price(run_dir: RunDirectory, final: dict, references: dict) -> bool:
    levels = _price_levels(final)
    if not levels:
        return False
    x = [float(t[1:]) for t in levels]
    curves = [("federated model", "price", final, "-"), ("truth", "price-oracle", final, "--"),
              ("logistic baseline", "price-baseline", final, ":")]
    curves += [(kind, "price", references[kind]["metrics"], "-.") for kind in references]
    series = [(label, x, [number(metrics.get(f"{prefix}-p@{t}")) for t in levels], style)
              for label, prefix, metrics, style in curves]
    _line_plot(run_dir.path / "price_curve.png", series, "offered price / list price",
               "mean P(purchase) over test views")
    return True
