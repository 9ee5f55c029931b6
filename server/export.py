"""`fedshop export RUN_DIR --out DIR [--merge]`: the global adapter as a folder plain PEFT loads, with a model card.

The folder holds `adapter_config.json` and `adapter_model.safetensors` (PEFT's own format), the tokenizer, the base
model under `base/` (its path written as `base_model_name_or_path`, so `AutoPeftModelForSeq2SeqLM.from_pretrained(DIR)`
works without fedshop), a model card `README.md` whose Privacy section is built from the run's `privacy.csv`, and
`manifest.json` with the sha256 of every file (`fedshop export --verify DIR` checks it). `--merge` adds `merged/`,
the base with the adapter folded in (a plain `T5ForConditionalGeneration`).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import warnings
from pathlib import Path

from server.audit import read_audit, run_config
from server.report import TASK_ROWS, _epsilon_by_merchant, _f, privacy_lines
from server.rundir import RunDirectory
from shared.config import FedShopConfig
from shared.errors import UserError

MANIFEST = "manifest.json"
BASE_FILES = ("config.json", "generation_config.json", "model.safetensors", "fedshop_base.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_run(run_dir: str | Path, out: str | Path, merge: bool = False) -> Path:
    run_dir, out = Path(run_dir), Path(out)
    config = run_config(run_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} exists and is not empty; choose a new directory")
    base_dir = Path(config.base_dir)
    if not (base_dir / "model.safetensors").is_file():
        raise UserError(f"the run's base directory {base_dir} is missing; the export needs it beside the adapter")
    out.mkdir(parents=True, exist_ok=True)
    (out / "base").mkdir()
    for name in BASE_FILES + TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / "base" / name)
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    shutil.copy2(run_dir / "adapter" / "adapter_model.safetensors", out / "adapter_model.safetensors")
    shutil.copy2(run_dir / "config.toml", out / "run-config.toml")  # what `fedshop predict` builds inputs with
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = str((out / "base").resolve())
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n", encoding="utf-8")
    if merge:
        _merge(out)
    (out / "README.md").write_text(model_card(run_dir, config, out, merge), encoding="utf-8")
    write_manifest(out, base_sha256=sha256(base_dir / "model.safetensors"))
    return out


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


def write_manifest(out: Path, base_sha256: str) -> None:
    files = {str(p.relative_to(out)): sha256(p) for p in sorted(out.rglob("*")) if p.is_file() and p.name != MANIFEST}
    manifest = {"format": "fedshop-export/1", "base-model-sha256": base_sha256, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def verify(out: str | Path) -> list[str]:
    """The problems of an export folder against its manifest (empty when every file matches)."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        raise UserError(f"{out} is not a fedshop export (no {MANIFEST})")
    files = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]
    problems = [f"{name}: missing" for name in files if not (out / name).is_file()]
    problems += [f"{name}: sha256 differs from the manifest" for name, digest in files.items()
                 if (out / name).is_file() and sha256(out / name) != digest]
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems += [f"{name}: not in the manifest" for name in sorted(present - set(files))]
    return problems


def model_card(run_dir: Path, config: FedShopConfig, out: Path, merged: bool) -> str:
    directory = RunDirectory(run_dir)
    records = directory.read_metrics()
    evaluations = [r for r in records if r["scope"] == "evaluate"]
    final = evaluations[-1]["metrics"] if evaluations else {}
    start = evaluations[0]["metrics"] if evaluations else {}
    ledger = directory.read_privacy()
    spent = [v for v in _epsilon_by_merchant(ledger).values() if math.isfinite(v)]
    local = [r for r in ledger if r["merchant"] != "all" and r["status"] == "trained"]
    audit = read_audit(run_dir)
    front = ["---", "library_name: peft", f"base_model: {(out / 'base').resolve()}",
             "tags:", *(f"- {t}" for t in ("lora", "t5", "federated-learning", "differential-privacy", "dp-sgd")),
             "---", ""]
    lines = [
        f"# fedshop global adapter — run `{run_dir}`", "",
        "A LoRA adapter for a T5 shopper-behaviour model, trained with Flower across merchants that each kept their "
        "event logs; only adapter tensors and scalar metrics left a merchant.", "",
        "## Load it", "", "```python",
        "from peft import AutoPeftModelForSeq2SeqLM",
        "model = AutoPeftModelForSeq2SeqLM.from_pretrained(\"<this folder>\")  # base: ./base", "```", "",
        "## Tasks and test metrics (leave-last-out per shopper, weighted over merchants)", "",
        "| metric | this adapter | base alone | popularity | Bayes oracle (synthetic truth) |", "|---|---|---|---|---|",
    ]
    for label, key, popular, oracle in TASK_ROWS:
        if key in final:
            lines.append(f"| {label} | {_f(final.get(key))} | {_f(start.get(key))} | "
                         f"{_f(final.get(popular)) if popular else 'n/a'} | {_f(final.get(oracle))} |")
    lines += ["", "## Training", "",
              f"- {config.num_merchants} merchants x {config.num_rounds} rounds, aggregation `{config.aggregation}`, "
              f"{config.local_epochs} local epoch(s) per round, batch {config.batch_size}, learning rate "
              f"{config.learning_rate:g} (AdamW).",
              f"- LoRA r = {config.lora_r}, alpha = {config.lora_alpha:g}, dropout {config.lora_dropout:g}, targets "
              f"{config.lora_targets}; base T5 `{config.model_size}` (base-model sha256 in `manifest.json`)."
              + (" `merged/` holds the base with the adapter folded in." if merged else ""), "",
              "## Privacy", ""]
    lines += privacy_lines(config, ledger)
    if config.local_dp and local:
        rates = sorted({float(r["sample_rate"]) for r in local})
        steps = sorted({int(r["steps"]) for r in local})
        noise = sorted({float(r["noise_multiplier"]) for r in local})
        lines += ["", "| privacy figure | value |", "|---|---|",
                  f"| unit | {config.privacy_unit} |",
                  f"| epsilon per merchant, max / mean | {_f(max(spent), 3)} / {_f(sum(spent) / len(spent), 3)} |",
                  f"| delta | {config.target_delta:g} |", f"| accountant | {config.accountant} |",
                  f"| noise multiplier (the merchants' values) | {', '.join(f'{n:.4g}' for n in noise)} |",
                  f"| clipping norm | {config.max_grad_norm:g} |",
                  f"| sampling rate (the merchants' values) | {', '.join(f'{q:.4g}' for q in rates)} |",
                  f"| local steps per round (the merchants' values) | {', '.join(str(s) for s in steps)} |",
                  f"| rounds | {config.num_rounds} |",
                  f"| secure RNG | {'on' if config.secure_mode else 'off'} |"]
    if audit:
        from server.audit import describe

        lines += ["", f"- Empirical audit: {describe(audit)}."]
    return "\n".join(front + lines) + "\n"
