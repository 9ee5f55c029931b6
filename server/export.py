"""`fedshop export RUN_DIR --out DIR [--merge]`: the global adapter as a folder plain PEFT loads, with a model card.

The folder holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's own format), the tokenizer, the base
model under `base/` (its path written as `base_model_name_or_path`, so `AutoPeftModelForSeq2SeqLM.from_pretrained(DIR)`
works without fedshop), a model card `README.md` whose Privacy section is built from the run's `privacy.csv`, and
`manifest.json` with the sha256 of every file (`fedshop export --verify DIR` checks it). `--merge` adds `merged/`,
the base with the adapter folded in (a plain `T5ForConditionalGeneration`).

`--round N` exports the global adapter after round N (`checkpoints/round-<N>/` of the run directory) with a card whose
privacy figures are those of the ledger rows of rounds <= N. Every export carries what continued training
(`init-adapter`) needs: the ledger (`privacy.csv`, rows up to the exported round), the run's config
(`run-config.toml`) and, for a run that itself continued another, `continued-from.json`.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

from server.audit import read_audit, run_config
from server.continuation import continuation_lines
from server.manifest import write_manifest
from server.report import ITEM_ID_WORDS, base_words, figure, privacy_lines, read_references, task_tables
from shared.config import FedShopConfig
from shared.errors import UserError
from shared.files import make_dir, sha256
from shared.ledger import CONTINUED_FROM, MERCHANT_LEVEL, STATUS_TRAINED, epsilon_by_merchant, write_privacy
from shared.model import BASE_META, check_adapter_dir, read_json_object
from shared.rundir import CHECKPOINTS, RunDirectory
from shared.semantic import SEMANTIC_FILE
from shared.wide import LINKS_FILE, WIDE_FILE

BASE_FILES = ("config.json", "generation_config.json", "model.safetensors", BASE_META, SEMANTIC_FILE, LINKS_FILE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False, round: int | None = None) -> Path:
    """Write the export of `run_dir`'s final adapter (or of the adapter after round `round`) into `out`."""
    run_dir, out = Path(run_dir), Path(out)
    config = run_config(run_dir)
    adapter_dir = run_dir / "adapter" if round is None else round_checkpoint(run_dir, round)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not " + ("empty" if out.is_dir() else "a directory")
                        + "; choose a new directory")
    tied = [t for t in config.lora_target_list if t in ("lm_head", "embed")]
    if merge and tied:
        raise UserError(f"--merge: {run_dir} adapts {tied[0]}, which T5 ties to its other embeddings (input, output "
                        "and decoder share one weight); folding that LoRA into the shared weight would change them "
                        "all. Export without --merge and load the adapter with PEFT on the base "
                        "(`PeftModel.from_pretrained`)")
    base_dir = Path(config.base_dir)
    if not (base_dir / "model.safetensors").is_file():
        raise UserError(f"the run's base directory {base_dir} is missing; the export needs it beside the adapter")
    check_adapter_dir(adapter_dir)
    ledger = [row for row in RunDirectory(run_dir).read_privacy() if round is None or int(row["round"]) <= round]
    make_dir(out, "--out (the export folder)")
    (out / "base").mkdir()
    for name in BASE_FILES + TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / "base" / name)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    shutil.copy2(adapter_dir / "adapter_model.safetensors", out / "adapter_model.safetensors")
    if (adapter_dir / WIDE_FILE).is_file():
        shutil.copy2(adapter_dir / WIDE_FILE, out / WIDE_FILE)
    # what `fedshop predict` builds inputs with, and what `init-adapter` checks and continues from
    shutil.copy2(run_dir / "config.toml", out / "run-config.toml")
    write_privacy(out / "privacy.csv", ledger)
    if (run_dir / CONTINUED_FROM).is_file():
        shutil.copy2(run_dir / CONTINUED_FROM, out / CONTINUED_FROM)
    adapter_config = read_json_object(adapter_dir / "adapter_config.json", "PEFT's adapter config")
    adapter_config["base_model_name_or_path"] = str((out / "base").resolve())
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    if merge:
        _merge(out)
    exported_round = round if round is not None else last_round(run_dir, config)
    (out / "README.md").write_text(model_card(run_dir, config, out, merge, ledger, round), encoding="utf-8")
    write_manifest(out, base_sha256=sha256(base_dir / "model.safetensors"),
                   extra={"source-run": str(run_dir.resolve()), "round": exported_round})
    return out


def available_rounds(run_dir: Path) -> list[int]:
    """The rounds whose global adapter `run_dir/checkpoints/round-<N>/` holds."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(int(p.name.split("-", 1)[1]) for p in folder.glob("round-*")
                  if p.name.split("-", 1)[1].isdigit() and (p / "adapter_model.safetensors").is_file())


def round_checkpoint(run_dir: Path, round: int) -> Path:
    """`checkpoints/round-<round>/` of a run, or a UserError listing the rounds there are."""
    rounds = available_rounds(run_dir)
    if round not in rounds:
        have = (f"available rounds: {', '.join(map(str, rounds))}" if rounds else
                "it has no per-round checkpoints (runs write checkpoints/round-<N>/ since this version)")
        raise UserError(f"--round {round}: {run_dir} has no checkpoint of round {round}; {have}")
    return run_dir / CHECKPOINTS / f"round-{round}"


def last_round(run_dir: Path, config: FedShopConfig) -> int:
    rounds = [r["round"] for r in RunDirectory(run_dir).read_metrics() if r["scope"] == "evaluate"]
    return max(rounds) if rounds else config.num_rounds


def _merge(out: Path) -> None:
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base = T5ForConditionalGeneration.from_pretrained(out / "base")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        merged = PeftModel.from_pretrained(base, str(out)).merge_and_unload()
    merged.save_pretrained(out / "merged", safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (out / name).is_file():
            shutil.copy2(out / name, out / "merged" / name)


def model_card(run_dir: Path, config: FedShopConfig, out: Path, merged: bool, ledger: list[dict[str, str]],
               round: int | None = None) -> str:
    """The card of an export: `ledger` holds the privacy rows the exported adapter rests on (rounds <= `round`)."""
    directory = RunDirectory(run_dir)
    records = directory.read_metrics()
    evaluations = [r for r in records if r["scope"] == "evaluate" and (round is None or r["round"] <= round)]
    final = evaluations[-1]["metrics"] if evaluations else {}
    start = evaluations[0]["metrics"] if evaluations else {}
    spent = [v for v in epsilon_by_merchant(ledger).values() if math.isfinite(v)]
    rounds = config.num_rounds if round is None else round
    local = [r for r in ledger if r["merchant"] != MERCHANT_LEVEL and r["status"] == STATUS_TRAINED]
    audit = read_audit(run_dir) if round is None else None  # the audit attacked the final adapter
    meta_file = out / "base" / BASE_META
    base_meta = read_json_object(meta_file, "the base's metadata") if meta_file.is_file() else {}
    origin = (f", pretrained on the public split (the checkpoint's sha256 in `base/{BASE_META}`, the base's in "
              "`manifest.json`)" if base_meta.get("base-model") else " (base-model sha256 in `manifest.json`)")
    front = ["---", "library_name: peft", f"base_model: {(out / 'base').resolve()}",
             "tags:", *(f"- {t}" for t in ("lora", "t5", "federated-learning", "differential-privacy", "dp-sgd")),
             "---", ""]
    lines = [
        f"# fedshop global adapter — run `{run_dir}`"
        + ("" if round is None else f", round {round} of {config.num_rounds}"), "",
        *([] if round is None else [f"This is the global adapter after round **{round}** (of {config.num_rounds}), "
                                    f"from `checkpoints/round-{round}/`; its metrics and privacy figures are those of "
                                    f"rounds 0-{round}.", ""]),
        "A LoRA adapter for a T5 shopper-behaviour model, trained with Flower across merchants that each kept their "
        "event logs; only adapter tensors and scalar metrics left a merchant.", "",
        "## Load it", "", "```python",
        "from peft import AutoPeftModelForSeq2SeqLM",
        "model = AutoPeftModelForSeq2SeqLM.from_pretrained(\"<this folder>\")  # base: ./base", "```", "",
        *(["The adapter has a wide part (`wide.safetensors`, config key `wide`): one number per feature token of an "
           "intent or churn question, added to its \"yes\" logit, and for a next-item answer one bias per item and "
           "one weight per category for staying in the most recent item's category, and one per category of the "
           "most recent item on the public split's counts of the items viewed after it (`base/links.safetensors`, "
           "when the base has them), which trained with the LoRA tensors under the same DP-SGD. Plain PEFT does not "
           "load it: without it, intent and churn answers are the "
           "base's and next-item answers lack those terms. "
           "`fedshop predict` applies it; in Python, `shared.model.load_saved_wide(model, tokenizer, \"<this "
           "folder>\")` after the lines above.", ""] if (out / WIDE_FILE).is_file() else []),
        "## Tasks and test metrics (leave-last-out in time per shopper, weighted over merchants)", "",
        f"Tasks `{config.tasks}` in one adapter, each with its task prefix (see `fedshop predict`); churn means no "
        f"event within {config.churn_horizon_days:g} days. \"federated model\" is this adapter"
        + ("" if round is None else f" (round {round})") + "; baselines are fitted on each merchant's training "
        "examples; the Bayes oracle uses the synthetic generator's truth (n/a on real data).", "",
    ]
    references = read_references(run_dir) if round is None else {}  # the references match the final round
    lines += task_tables(final, start, references)
    lines += ["## Training", "",
              f"- {config.num_merchants} merchants x {rounds} rounds, aggregation `{config.aggregation}`"
              + (" under secure aggregation (SecAgg+: the server saw only the mean of the updates)"
                 if config.secure_aggregation else "") + ", "
              f"{config.local_epochs} local epoch(s) per round, batch {config.batch_size}, learning rate "
              f"{config.learning_rate:g} (AdamW).",
              f"- LoRA r = {config.lora_r}, alpha = {config.lora_alpha:g}, dropout {config.lora_dropout:g}, targets "
              f"{config.lora_targets}{', with the wide part' if config.wide else ''}; trained on the "
              f"{config.train_tasks} tasks' examples; base {base_words(base_meta, config)}{origin}; "
              f"{ITEM_ID_WORDS[config.item_ids]}."
              + (" `merged/` holds the base with the adapter folded in." if merged else ""), "",
              "## Privacy", ""]
    lines += privacy_lines(config, ledger)
    lines += continuation_lines(run_dir)
    if config.local_dp and local and spent:
        rates = sorted({float(r["sample_rate"]) for r in local})
        steps = sorted({int(r["steps"]) for r in local})
        noise = sorted({float(r["noise_multiplier"]) for r in local})
        lines += ["", "| privacy figure | value |", "|---|---|",
                  f"| unit | {config.privacy_unit} |",
                  f"| epsilon per merchant, max / mean | {figure(max(spent), 3)} / "
                  f"{figure(sum(spent) / len(spent), 3)} |",
                  f"| delta | {config.target_delta:g} |", f"| accountant | {config.accountant} |",
                  f"| noise multiplier (the merchants' values) | {', '.join(f'{n:.4g}' for n in noise)} |",
                  f"| clipping norm | {config.max_grad_norm:g} |",
                  f"| sampling rate (the merchants' values) | {', '.join(f'{q:.4g}' for q in rates)} |",
                  f"| local steps per round (the merchants' values) | {', '.join(str(s) for s in steps)} |",
                  f"| rounds | {rounds} |",
                  f"| secure RNG | {'on' if config.secure_mode else 'off'} |"]
    if audit:
        from server.audit import describe

        lines += ["", f"- Empirical audit: {describe(audit)}."]
    return "\n".join(front + lines) + "\n"
