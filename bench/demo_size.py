"""The demo's world size and tasks' weights against issue 13's verdicts: shoppers per merchant, local epochs and
`train-task-weights` on the default config, each variant with its local-only reference and the report's paired tests.

    python bench/demo_size.py [--variants "label:key=value,...;..."] [--out runs/bench-demo-size] [--reuse] [--no-write]

Each variant runs `fedshop simulate --config configs/default.toml --set references=local-only` with its settings into
OUT/<label> (16 merchants x 4 rounds, DP eps 8 at the shopper unit) and reads the paired differences of its
`references.json` (bootstrap over the test shoppers, as the report's "In one look"): the federated model against
round 0, each merchant alone and the logistic baselines, and next HR@10 as a multiple of the Markov chain's.
`--reuse` reads a variant's finished run directory instead of running it again. Every variant starts from the same
base (bases/small) and seed; the data differ where the variant changes the world. Printed and written into
BENCHMARKS.md. These are figures, not tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import variants
from sections import write_section

from server.report import read_paired
from shared.metrics import decide

EQUAL = "train-task-weights=intent:1/next-item:1/churn:1"
DEFAULT_VARIANTS = (f"250 shoppers, 2 epochs (the demo before):shoppers-per-merchant=250,local-epochs=2,{EQUAL};"
                    f"500 shoppers, 1 epoch:shoppers-per-merchant=500,local-epochs=1,{EQUAL};"
                    "500 shoppers, 1 epoch, intent x2 (the demo):shoppers-per-merchant=500,local-epochs=1,"
                    "train-task-weights=intent:2/next-item:1/churn:1;"
                    "500 shoppers, 1 epoch, intent x3:shoppers-per-merchant=500,local-epochs=1,"
                    "train-task-weights=intent:3/next-item:1/churn:1")
# (column, paired comparison in references.json, metric)
DIFFERENCES = (("intent − round 0", "federated vs round 0", "intent-auc"),
               ("next HR@10 − round 0", "federated vs round 0", "next-hr@10"),
               ("churn − round 0", "federated vs round 0", "churn-auc"),
               ("intent − local-only", "federated vs local-only", "intent-auc"),
               ("next HR@10 − local-only", "federated vs local-only", "next-hr@10"),
               ("intent − logistic", "federated vs intent-baseline", "intent-auc"),
               ("churn − logistic", "federated vs churn-baseline", "churn-auc"))


MARKS = {"beats": " ✓", "is beaten by": " ✗", "level with": "", "vs": ""}


def row(label: str, run_dir: Path) -> str:
    paired = read_paired(run_dir)
    cells = [label, f"{paired['federated vs round 0']['intent-auc']['a']:.3f}",
             f"{paired['federated vs round 0']['next-hr@10']['a']:.3f}",
             f"{paired['federated vs round 0']['churn-auc']['a']:.3f}"]
    for _, comparison, metric in DIFFERENCES:
        figure = paired[comparison][metric]
        mark = MARKS[decide(figure["difference"], figure["se"]).verdict]  # the report's rule, at 2 SE
        cells.append(f"{figure['difference']:+.3f} ± {figure['se']:.3f}{mark}")
    markov = paired["federated vs next-markov"]["next-hr@10"]
    cells.append(f"{markov['a'] / markov['b']:.2f}×")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default="runs/bench-demo-size")
    parser.add_argument("--reuse", action="store_true", help="read a variant's finished run instead of rerunning it")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    header = ["variant", "intent AUC", "next HR@10", "churn AUC", *(name for name, _, _ in DIFFERENCES),
              "next HR@10 / Markov"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, sets in variants.parse(args.variants):
        run_dir = variants.run_dir(args.out, label)
        if not (args.reuse and (run_dir / "references.json").is_file()):
            variants.simulate("demo_size", "configs/default.toml", run_dir, label, sets,
                              "--set", "references=local-only")
        lines.append(row(label, run_dir))
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        command = variants.command_line("demo_size", args.variants, DEFAULT_VARIANTS)
        write_section("demo_size", "## The demo's size and the tasks' weights (issue 13)\n\n"
                      f"`{command}`\n\n"
                      "The default demo (16 merchants × 4 rounds, ε 8 per merchant at the shopper unit, δ 1e-5, "
                      "rdp) with its local-only reference, one run per variant from the same base and seed. "
                      "`train-task-weights` weighs each task's examples in a shopper's clipped gradient (`/` "
                      "separates them in a variant). Differences are the report's paired bootstrap over the test "
                      "shoppers (± one SE); ✓ beats, ✗ is beaten by (beyond 2 SE), no mark: level. AUCs and HR@10 "
                      "are the federated model's on all test examples pooled.\n\n" + table)


if __name__ == "__main__":
    main()
