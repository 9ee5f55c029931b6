"""`fedshop audit RUN_DIR`: the empirical privacy audit of a run's global adapter (see `shared.audit`).

Reads the run's resolved config and final adapter, rebuilds the merchants' data, canaries and held-out shoppers
from the config's seed, and writes `audit.json` (and the audit section of `report.md`) into the run directory.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from shared.audit import canary_audit, example_losses, mean_loss_by_shopper, membership_inference
from shared.canaries import CANARY_PREFIX, make_canaries
from shared.config import FedShopConfig, load_config
from shared.data import catalogue_facts, merchant_data, semantic_ids_for
from shared.errors import UserError
from shared.model import check_adapter_dir, load_base, load_saved_adapter
from shared.sources import load_world
from shared.wide import at_base

log = logging.getLogger("fedshop")
AUDIT_FILE = "audit.json"
MAX_MEMBERS = 600  # members scored for the membership attack (a seeded sample; AUC does not depend on balance)


def run_config(run_dir: Path) -> FedShopConfig:
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a fedshop run directory (no config.toml)")
    if not (Path(run_dir) / "adapter" / "adapter_model.safetensors").is_file():
        raise UserError(f"{run_dir}/adapter/adapter_model.safetensors is missing: the run did not finish")
    return load_config(path)


def audit_run(run_dir: str | Path) -> dict[str, float]:
    run_dir = Path(run_dir)
    config = run_config(run_dir)
    import torch

    torch.set_num_threads(max(1, config.torch_threads))
    check_adapter_dir(run_dir / "adapter")
    base, tokenizer, _ = load_base(config.base_dir)
    data = load_world(config)
    facts = catalogue_facts(data, semantic_ids_for(config))
    model = load_saved_adapter(base, tokenizer, run_dir / "adapter", facts)
    members: dict[str, float] = {}
    nonmembers: dict[str, float] = {}
    for merchant_id in data.merchant_ids:
        merchant = merchant_data(config, merchant_id, data)
        trained = [e for e in merchant.train if not e.user_id.startswith(CANARY_PREFIX)]
        members.update({f"{merchant_id}/{k}": v for k, v in mean_loss_by_shopper(
            trained, example_losses(model, tokenizer, trained, config.eval_batch_size)).items()})
        nonmembers.update({f"{merchant_id}/{k}": v for k, v in mean_loss_by_shopper(
            merchant.holdout, example_losses(model, tokenizer, merchant.holdout, config.eval_batch_size)).items()})
    if len(members) > MAX_MEMBERS:
        keep = np.random.default_rng(config.seed).choice(sorted(members), MAX_MEMBERS, replace=False)
        members = {k: members[k] for k in keep}
    result: dict[str, float] = membership_inference(members, nonmembers)
    if config.audit_canaries:
        canaries = make_canaries(config.audit_canaries, facts, list(data.merchant_ids), seed=config.seed,
                                 history_length=config.history_length)
        examples = [c.example for c in canaries]
        trained_loss = example_losses(model, tokenizer, examples, config.eval_batch_size)
        with model.disable_adapter(), at_base(model):  # the base alone: no LoRA, the base's wide part
            base_loss = example_losses(model, tokenizer, examples, config.eval_batch_size)
        included = np.array([c.included for c in canaries])
        result.update(canary_audit(base_loss - trained_loss, included, config.target_delta))
    else:
        result.update({"eps-emp": math.nan, "canaries": 0})
    result["delta"] = config.target_delta
    (run_dir / AUDIT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def read_audit(run_dir: str | Path) -> dict[str, float] | None:
    path = Path(run_dir) / AUDIT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def describe(result: dict[str, float]) -> str:
    parts = [f"membership attack AUC {result['mia-auc']:.3f}, TPR at 1% FPR {result['mia-tpr@1%fpr']:.3f} "
             f"({result['mia-members']} members, {result['mia-nonmembers']} held-out shoppers)"]
    if result.get("canaries"):
        parts.append(f"canary attack AUC {result['canary-auc']:.3f}, {result['canary-correct']}/"
                     f"{result['canary-guesses']} guesses right of {result['canaries']} canaries -> eps_emp "
                     f"{result['eps-emp']:.3f} at delta {result['delta']:g} ({1 - result['audit-confidence']:.0%} "
                     "confidence)")
    return "; ".join(parts)
