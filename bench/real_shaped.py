"""The real-shaped preset at epsilon 8 beside the report's own baselines, for one or more variants of it.

    python bench/real_shaped.py [--variants "label:key=value,...;..."] [--out runs/bench-real-shaped] [--reuse]
                                [--no-write]

Each variant is `label:key=value,...` over configs/real-shaped.toml, "/" standing for "," inside a value (the default
variants: the preset's recipe, the demo's, with intent's examples counted once, twice (the preset) or three times,
with the wide part's per-item weights taking a quarter, a tenth or twice each step, and with half or twice the
clipping norm). Every variant runs `fedshop simulate` into OUT/<label> (with --reuse an existing finished run there is
read instead). The table holds the federated model's test figures and the report's paired differences (federated
minus the other scorer, ± the bootstrap SE over test shoppers): next-item HR@10 against round 0, the Markov chain and
local-only; churn AUC against round 0 and the recency/frequency logistic regression; intent AUC against round 0,
local-only and its logistic regression. It is printed and written into BENCHMARKS.md. These are figures, not tests.
"""

from __future__ import annotations

import argparse

import variants
from sections import write_section

from server.report import read_paired
from shared.rundir import RunDirectory

DEFAULT_VARIANTS = ("intent x1:train-task-weights=intent:1/next-item:1/churn:1;"
                    "intent x2 (the preset):;"
                    "intent x3:train-task-weights=intent:3/next-item:1/churn:1;"
                    "intent x2, item step 0.25:wide-item-step=0.25;"
                    "intent x2, item step 0.1:wide-item-step=0.1;"
                    "intent x2, item step 2:wide-item-step=2;"
                    "intent x2, clip 0.05:max-grad-norm=0.05;"
                    "intent x2, clip 0.2:max-grad-norm=0.2")
COLUMNS = (("next-hr@10", "round 0"), ("next-hr@10", "next-markov"), ("next-hr@10", "local-only"),
           ("churn-auc", "round 0"), ("churn-auc", "churn-baseline"), ("intent-auc", "round 0"),
           ("intent-auc", "local-only"), ("intent-auc", "intent-baseline"))


def cell(paired: dict, metric: str, other: str) -> str:
    pair = paired.get(f"federated vs {other}", {}).get(metric)
    return "—" if pair is None else f"{pair['difference']:+.3f} ± {pair['se']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default="runs/bench-real-shaped")
    parser.add_argument("--reuse", action="store_true", help="read a finished run in OUT/<label> instead of running")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    header = ["variant", "next HR@10", *(f"{m.split('-')[0]} vs {o}" for m, o in COLUMNS), "churn AUC",
              "intent AUC", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, sets in variants.parse(args.variants):
        run_dir = variants.run_dir(args.out, label)
        seconds = "—"
        if not (args.reuse and (run_dir / "report.md").is_file()):
            seconds = f"{variants.simulate('real_shaped', 'configs/real-shaped.toml', run_dir, label, sets):.0f}"
        final = [r for r in RunDirectory(run_dir).read_metrics() if r["scope"] == "evaluate"][-1]["metrics"]
        paired = read_paired(run_dir)
        row = [label, f"{final['next-hr@10']:.3f}", *(cell(paired, m, o) for m, o in COLUMNS),
               f"{final['churn-auc']:.3f}", f"{final['intent-auc']:.3f}", seconds]
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        command = variants.command_line("real_shaped", args.variants, DEFAULT_VARIANTS)
        write_section("real_shaped", "## The real-shaped preset (issue 13)\n\n"
                      f"`{command}`\n\n"
                      "`configs/real-shaped.toml`: 8 merchants × 250 shoppers, 2,000 items with power-law "
                      "popularity, median 60 events per shopper, public split 20 %, the demo's recipe (DP ε 8 per "
                      "merchant at the shopper unit, δ 1e-5, rdp; LoRA r 4 on the items' rows of `lm_head` and the "
                      "wide part, Adam 0.1, its dense weights at a quarter step, training steps in bf16; 4 "
                      "rounds of 2 local epochs), one run per variant from the same base. Differences are "
                      "federated minus the named scorer on the same test shoppers, ± the paired bootstrap SE (the "
                      "run's references.json); \"—\" where the variant ran without that reference. wall s is "
                      "the whole `fedshop simulate`, pretraining of the variant's base included (\"—\" when the run "
                      "was read back with --reuse).\n\n" + table)


if __name__ == "__main__":
    main()
