"""Pretraining benchmark: the base's public-valid scores for several loss weightings and epoch counts.

Each variant pretrains a base with `fedshop pretrain`'s own code (`shared.pretrain.pretrain`, into a temporary
directory) and reads the public split's valid metrics it reports. Beside them: the logistic baselines fitted on the
public split's training examples (the bar a base should reach on the same data) and the Bayes oracle. Standard
errors are analytic (Hanley-McNeil for AUC, binomial for HR@10).

    python bench/pretraining.py --config configs/default.toml --variant "plain=intent:1,next-item:1,churn:1@8" \
        --variant "default=@8" [--write]
A variant is `name=<pretrain-task-weights>@<pretrain-epochs>`; an empty weight list is the config's own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.sections import write_section  # noqa: E402
from shared.baselines import fit_baselines  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.data import merchant_data  # noqa: E402
from shared.metrics import binomial_se, hanley_mcneil_se, roc_auc  # noqa: E402
from shared.pretrain import pretrain  # noqa: E402
from shared.sources import load_world  # noqa: E402
from shared.synthetic import PUBLIC_MERCHANT  # noqa: E402


def _auc_cell(auc: float, positives: int, negatives: int) -> str:
    return f"{auc:.3f} ± {hanley_mcneil_se(auc, positives, negatives):.3f}"


def public_bars(config) -> tuple[dict[str, str], dict[str, str], dict[str, tuple[int, int]]]:
    """Logistic baselines (fitted on the public train split) and the oracle on the public valid split."""
    public = merchant_data(config, PUBLIC_MERCHANT, load_world(config))
    baselines = fit_baselines(public.train, public.facts, public.popularity)
    fitted, oracle, counts = {}, {}, {}
    for task in ("intent", "churn"):
        examples = [e for e in public.valid if e.task == task]
        labels = np.array([e.label for e in examples])
        counts[task] = (int(labels.sum()), int(len(labels) - labels.sum()))
        p = baselines.intent_probability(examples) if task == "intent" else baselines.churn_probability(examples)
        fitted[task] = _auc_cell(roc_auc(labels, p), *counts[task])
        oracle[task] = _auc_cell(roc_auc(labels, np.array([e.truth for e in examples])), *counts[task])
    return fitted, oracle, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--variant", action="append", default=[], help="name=<task weights>@<epochs>")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", default="", help="write the last variant's base here (e.g. bases/small)")
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    base = load_config(args.config)
    fitted, oracle, counts = public_bars(base)
    rows, variants = [], args.variant or ["config=@" + str(base.pretrain_epochs)]
    for k, variant in enumerate(variants):
        name, _, spec = variant.partition("=")
        weights, _, epochs = spec.partition("@")
        overrides = [f"pretrain-epochs={epochs or base.pretrain_epochs}"]
        overrides += [f"pretrain-task-weights={weights}"] if weights else []
        config = load_config(args.config, overrides)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as directory:
            m = pretrain(config, args.keep if args.keep and k == len(variants) - 1 else Path(directory) / "base")
        hr, n = m["next-hr@10"], m["next-examples"]
        rows.append(f"| {name} | {config.pretrain_task_weights} | {config.pretrain_epochs} | "
                    f"{_auc_cell(m['intent-auc'], *counts['intent'])} | {_auc_cell(m['churn-auc'], *counts['churn'])} "
                    f"| {hr:.3f} ± {binomial_se(hr, n):.3f} | {time.perf_counter() - started:.0f} |")
        print(rows[-1], flush=True)
    rows.append(f"| logistic on the public train split | | | {fitted['intent']} | {fitted['churn']} | | |")
    rows.append(f"| Bayes oracle | | | {oracle['intent']} | {oracle['churn']} | | |")
    table = "\n".join(["| variant | pretrain-task-weights | epochs | intent AUC | churn AUC | next HR@10 | s |",
                       "|---|---|---|---|---|---|---|", *rows])
    print(table)
    if args.write:
        command = "python bench/pretraining.py --config " + args.config + "".join(
            f' --variant "{v}"' for v in args.variant) + f" --threads {args.threads} --write"
        write_section("pretraining", "## Pretraining: how the base's loss weighs the tasks\n\n"
                      f"`{command}` (public split's valid examples, ± 1 SE; seconds on this machine while other "
                      "jobs shared its 2 cores)\n\n" + table)


if __name__ == "__main__":
    main()
