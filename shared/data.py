"""From a config to a merchant's examples: the one data path every merchant, the pretrainer and the tests use."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shared.canaries import make_canaries
from shared.config import FedShopConfig
from shared.errors import UserError
from shared.semantic import SEMANTIC_FILE, SemanticIds, load_semantic_ids
from shared.sources import file_stat, load_world, world_key
from shared.synthetic import PRICE_BANDS, PUBLIC_MERCHANT, RATING_BANDS, SyntheticData
from shared.tasks import TASK_TOKENS, CatalogueFacts, Example, build_examples, by_split, churn_tokens, level_tokens


@dataclass
class MerchantData:
    merchant_id: str
    facts: CatalogueFacts
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    popularity: np.ndarray  # item view counts visible to training (for the popularity baseline)
    holdout: list[Example] = field(default_factory=list)  # train-split examples of shoppers kept out of training
    # what callers derived from these examples and keep for the next message (shared.modeling.encode_teaching)
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def teaching(self, config: FedShopConfig) -> list[Example]:
        """The training examples a merchant trains on: those of `train-tasks` (baselines fit on all of `train`)."""
        tasks = set(config.train_task_list)
        return [e for e in self.train if e.task in tasks]


def catalogue_facts(data: SyntheticData, semantic: SemanticIds | None = None) -> CatalogueFacts:
    """The catalogue's public facts; with `semantic` (the base's ids), every item's semantic id too (an item the ids
    lack gets one from its facts, `SemanticIds.extend`)."""
    catalogue = data.catalogue
    item_ids = tuple(catalogue.item_ids.tolist())
    category = tuple(catalogue.category_names().tolist())
    price_band = tuple(f"p{b}" for b in catalogue.price_band.tolist())
    public = data.events.event[data.events.merchant_id == PUBLIC_MERCHANT] == "view"
    viewed = data.events.item_id[data.events.merchant_id == PUBLIC_MERCHANT][public]
    index = {item: i for i, item in enumerate(item_ids)}
    names, counts = np.unique(viewed.astype(str), return_counts=True) if len(viewed) else ([], [])
    views = np.zeros(len(item_ids), dtype=np.int64)
    views[[index[name] for name in names]] = counts
    codes, code_tokens = (), ()
    if semantic is not None:
        semantic = semantic.extend(item_ids, category, price_band)
        codes, code_tokens = semantic.texts(item_ids), tuple(semantic.code_tokens())
    return CatalogueFacts(
        item_ids=item_ids, category=category, price_band=price_band,
        rating_band=tuple(f"r{b}" for b in catalogue.rating_band.tolist()),
        codes=codes, code_tokens=code_tokens, public_views=tuple(views.tolist()),
    )


def vocabulary(facts: CatalogueFacts) -> tuple[list[str], list[str], list[str]]:
    """Item, category and attribute tokens; with semantic ids no item has a token of its own, the ids' codes do."""
    categories = sorted(set(facts.category), key=lambda c: int(c[1:]) if c[1:].isdigit() else c)
    bands = [f"p{b}" for b in range(PRICE_BANDS)] + [f"r{b}" for b in range(RATING_BANDS)]
    items = [] if facts.semantic else list(facts.item_ids)
    return items, categories, bands + level_tokens() + churn_tokens() + list(facts.code_tokens)


def public_shopper_count(data: SyntheticData) -> int:
    """Distinct shoppers with events in the public split (what pretraining learns from)."""
    return len(np.unique(data.events.user_id[data.events.merchant_id == PUBLIC_MERCHANT].astype(str)))


def semantic_ids_for(config: FedShopConfig, base_dir: str | Path | None = None) -> SemanticIds | None:
    """The base's semantic ids when the config writes items that way, else None."""
    return load_semantic_ids(base_dir or config.base_dir) if config.item_ids == "semantic" else None


_SERVED: dict[tuple, MerchantData] = {}
# what a process keeps at most: merchants, and their training examples in all (each kept with its encoding: a
# merchant of the demo holds ~6,200, a real log's large merchant tens of thousands)
SERVED_KEPT, SERVED_EXAMPLES_KEPT = 32, 150_000


def served_merchant_data(config: FedShopConfig, merchant_id: str) -> MerchantData:
    """`merchant_data` of the process's world, kept per process for the merchant's next message (a simulation
    actor serves each merchant every round; building its examples again took 0.15-0.2 s a message). Keyed by every
    config key, the world's key (its files' size and mtime) and, for semantic ids, the base's ids file's. Callers
    must not modify what it returns."""
    semantic = str(Path(config.base_dir) / SEMANTIC_FILE) if config.item_ids == "semantic" else ""
    key = (world_key(config), tuple(sorted(config.to_flat().items())), merchant_id, file_stat(semantic))
    hit = _SERVED.get(key)
    if hit is None:
        hit = _SERVED[key] = merchant_data(config, merchant_id)
        while len(_SERVED) > 1 and (len(_SERVED) > SERVED_KEPT
                                    or sum(len(d.train) for d in _SERVED.values()) > SERVED_EXAMPLES_KEPT):
            _SERVED.pop(next(iter(_SERVED)))  # the oldest
    return hit


def merchant_data(config: FedShopConfig, merchant_id: str, data: SyntheticData | None = None,
                  semantic: SemanticIds | None = None) -> MerchantData:
    """A merchant's (or the public split's) examples, split leave-last-out per shopper.

    With item-ids = semantic the ids come from `semantic`, else from the base directory (`semantic-ids.json`).
    """
    data = data if data is not None else load_world(config)
    if merchant_id != PUBLIC_MERCHANT and merchant_id not in data.merchant_ids:
        raise UserError(f"merchant {merchant_id!r} does not exist; merchants are {', '.join(data.merchant_ids)}")
    rows = np.flatnonzero(data.events.merchant_id == merchant_id)
    facts = catalogue_facts(data, semantic if semantic is not None else semantic_ids_for(config))
    examples = build_examples(
        data.events.take(rows), facts, tasks=config.task_list, history_length=config.history_length,
        truth_purchase_prob=data.truth_purchase_prob[rows], truth_next_rank=data.truth_next_rank[rows],
        price_level=None if data.price_level is None else data.price_level[rows],
        truth_price_curve=None if data.truth_price_curve is None else data.truth_price_curve[rows],
        churn_horizon_days=config.churn_horizon_days, window_end_ms=data.window_end_ms,
        churn_truth=data.shopper_truth,
    )
    splits = by_split(examples)
    popularity = np.zeros(len(facts.item_ids))
    index = facts.index()
    # views visible to training: every view of a shopper except their valid and test targets
    held_out = {(e.user_id, facts.item_ids[e.label]) for e in splits["valid"] + splits["test"]
                if e.task == "next-item"}
    merchant_log = data.events.take(rows)
    for user, item, event in zip(merchant_log.user_id, merchant_log.item_id, merchant_log.event, strict=True):
        if event == "view" and (user, item) not in held_out:
            popularity[index[item]] += 1
    train, holdout = splits["train"], []
    if merchant_id != PUBLIC_MERCHANT:
        held = holdout_shoppers(sorted({e.user_id for e in examples}), config, data.merchant_ids.index(merchant_id))
        holdout = [e for e in train if e.user_id in held]
        train = [e for e in train if e.user_id not in held]
        if config.audit_canaries:
            canaries = make_canaries(config.audit_canaries, facts, list(data.merchant_ids), seed=config.seed,
                                     history_length=config.history_length)
            train += [c.example for c in canaries if c.included and c.merchant_id == merchant_id]
    return MerchantData(merchant_id, facts, train, splits["valid"], splits["test"], popularity, holdout)


def holdout_shoppers(shoppers: list[str], config: FedShopConfig, merchant_index: int) -> set[str]:
    """The shoppers whose events never train (the membership audit's non-members), fixed by the seed."""
    count = int(round(config.audit_holdout * len(shoppers)))
    rng = np.random.default_rng([config.seed, 0x401D, merchant_index])
    return {shoppers[i] for i in rng.permutation(len(shoppers))[:count]}


def merchant_id_for_partition(partition_id: int) -> str:
    return f"m{partition_id}"


def catalogue_fingerprint(facts: CatalogueFacts) -> str:
    """sha256 of the catalogue facts and task vocabulary a base was pretrained on (items, categories, bands, tokens)."""
    payload = json.dumps([facts.item_ids, facts.category, facts.price_band, facts.rating_band, TASK_TOKENS,
                          level_tokens(), churn_tokens()])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def check_base_matches(meta: dict, config: FedShopConfig, data: SyntheticData | None = None) -> None:
    """A base knows one catalogue (its item tokens or ids, and what it learned about them): refuse a base made for
    another, or for the other way of writing items."""
    flat = config.to_flat()
    written = meta.get("item-ids", "token")
    if written != config.item_ids:
        raise UserError(f"base directory {config.base_dir} writes items as item-ids = {written!r}, the config asks for "
                        f"item-ids = {config.item_ids!r}: pretrain a base with this config (`fedshop pretrain`) or "
                        "set base-dir to one made for it")
    if meta.get("wide") and not config.wide:
        raise UserError(f"base directory {config.base_dir} was pretrained with its wide part (wide = true), which "
                        "its T5 alone lacks: set wide = true, or pretrain a base with wide = false into another "
                        "base-dir")
    if config.base_model and meta.get("base-model") != str(Path(config.base_model).expanduser().resolve()):
        origin = (f"from the checkpoint {meta['base-model']}" if meta.get("base-model") else
                  f"as a fresh T5 `{meta.get('model-size')}`")
        raise UserError(f"base directory {config.base_dir} was pretrained {origin}, the config asks for base-model = "
                        f"{config.base_model!r}: pretrain a base from it (`fedshop pretrain`) or set base-dir to a new "
                        "directory")
    # a real log's catalogue comes from the file, not from the generator's knobs: its fingerprint alone decides
    knobs = ("seed", "num-items", "num-categories") if not config.data_path else ()
    different = [f"{key} = {meta.get(key)!r} in the base, {flat[key]!r} in the config"
                 for key in knobs if meta.get(key) != flat[key]]
    if not different:
        facts = catalogue_facts(data if data is not None else load_world(config))
        if meta.get("catalogue-sha256") != catalogue_fingerprint(facts):
            different.append("the catalogue facts or task tokens differ (" + (
                f"the base was pretrained on other data than {config.data_path}, or by a fedshop with other task "
                "tokens" if config.data_path else "the base predates this version of the data generator or of "
                "fedshop's task tokens") + ")")
    if different:
        raise UserError(f"base directory {config.base_dir} was pretrained for another catalogue ("
                        + "; ".join(different) + "): pretrain a base for this config (`fedshop pretrain`) "
                        "or set base-dir to a new directory")
