"""The one typed configuration of a fedshop run.

Every tunable is a flat kebab-case key (Flower style). The dataclass below is the single source of the defaults;
`pyproject.toml`'s `[tool.flwr.app.config]` repeats them for `flwr run .` and a test keeps the two equal.
Values are parsed and validated once, here, and a bad key or value is refused with its name and the allowed range.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import UserError

MODEL_SIZES = ("tiny", "small", "t5-small")  # shared.model.PRESETS
ITEM_ID_CHOICES = ("token", "semantic")
ACCOUNTANTS = ("rdp", "prv")
PRIVACY_UNITS = ("event", "shopper", "merchant")
LORA_TARGET_CHOICES = ("q", "k", "v", "o", "wi", "wo", "lm_head", "embed")
TASK_CHOICES = ("intent", "next-item", "churn", "price")
AGGREGATIONS = ("fedavg", "ffa", "svd")
ROBUST_CHOICES = ("none", "median", "trimmed-mean")
PRECISIONS = ("fp32", "bf16", "bf16-train")  # FedShopConfig.train_precision, eval_precision
DEVICES = ("auto", "cpu", "cuda")  # shared.modeling.resolve_device
REFERENCE_CHOICES = ("none", "local-only", "centralised")
DATA_FORMATS = ("auto", "canonical", "parquet", "retailrocket", "taobao", "rees46", "recbole", "transactions")
ON_BAD_ROWS = ("error", "skip")
PARTITION_KINDS = ("iid", "dirichlet", "size-skew")
WORLD_CACHE_DIR = "~/.cache/fedshop/worlds"  # world-cache-dir's default (shared.worldcache)


class ConfigError(UserError):
    """A configuration key or value that fedshop refuses."""


def _spec(default: Any, help: str, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False, choices: tuple[str, ...] | None = None,
          multi: bool = False) -> Any:
    """A dataclass field carrying its help text and its allowed range (PEFT-config style)."""
    meta = {"help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": choices, "multi": multi}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class FedShopConfig:
    # --- data: the embedded synthetic generator -------------------------------------------------------------
    seed: int = _spec(7, "seed of the synthetic data, the model init and the DP sampling", low=0, high=1_000_000_000)
    num_merchants: int = _spec(4, "number of merchants (federation clients)", low=1, high=1000)
    shoppers_per_merchant: int = _spec(200, "private shoppers per merchant", low=10, high=1_000_000)
    public_shoppers: int = _spec(1000, "shoppers of the public platform split used only for pretraining",
                                 low=10, high=10_000_000)
    num_items: int = _spec(400, "catalogue size", low=20, high=1_000_000)
    num_categories: int = _spec(16, "number of item categories", low=2, high=10_000)
    days: int = _spec(60, "days of event history", low=1, high=3650)
    popularity_exponent: float = _spec(0.0, "item popularity: 0 = lognormal; above 0 a power law, the r-th most "
                                       "popular item weighs r^-exponent (1 is a Zipf catalogue: a few items take "
                                       "most views, a long tail the rest)", low=0.0, high=5.0)
    views_per_session: float = _spec(3.5, "mean views in a session (1 + Poisson)", low=1.0, high=1000.0)
    mean_gap_days: float = _spec(6.0, "mean days between a shopper's sessions (each shopper's own mean is this x a "
                                 "lognormal)", low=0.0, low_open=True, high=3650.0)
    leave_bias: float = _spec(-2.0, "logit of P(a shopper leaves for good after a session that ended with a "
                              "purchase), for an average shopper; lower = longer histories", low=-20.0, high=20.0)
    merchant_skew: float = _spec(0.3, "Dirichlet concentration of merchants' category mixes (smaller = more "
                                 "non-IID)", low=0.0, low_open=True, high=100.0)
    history_length: int = _spec(4, "most recent events of a shopper shown to the model", low=1, high=512)
    tasks: str = _spec("intent,next-item,churn,price", "comma-separated behaviour tasks, all in one adapter: intent "
                       "(purchase after a view), next-item (full-catalogue ranking), churn (does the shopper return "
                       "within churn-horizon-days of a session's end), price (the intent head's purchase probability "
                       "across price levels; needs intent)", choices=TASK_CHOICES, multi=True)
    train_tasks: str = _spec("all", "the tasks whose examples merchants train on (all: every task in tasks; price "
                             "trains through intent). With LoRA on lm_head alone and only the items' rows moving, "
                             "yes/no answers have no weights to move: name next-item alone, so each sampled "
                             "shopper's clipped gradient is all next-item signal", choices=("all", *TASK_CHOICES[:3]),
                             multi=True)
    new_items: int = _spec(0, "the last this many catalogue items never appear in the public split (items launched "
                           "after the base was pretrained; for measuring how item-ids handles them)", low=0,
                           high=1_000_000)
    drift: float = _spec(0.0, "how far the world moved since the public split was collected: every item's popularity "
                         "(log, sd drift x 1.0) and latent quality (sd drift x 1.0) changed, and shoppers leave more "
                         "readily after a session without a purchase (leave logit + drift x 1.0), the same at every "
                         "merchant, while the public split and the catalogue's public facts show the old world; what "
                         "merchants know that the base cannot (synthetic only; 0 = no change)", low=0.0, high=10.0)
    item_links: float = _spec(0.0, "the probability that a shopper's next view in a session is one of the previous "
                              "item's 3 linked items (any category, drawn once per catalogue, the same at every "
                              "merchant and in the public split): item-to-item order, as in real logs, which a "
                              "first-order Markov chain catches (synthetic only; 0 = none)", low=0.0, high=0.95)
    churn_horizon_days: float = _spec(7.0, "churn: a shopper who starts no session within this many days of a "
                                      "session's end has churned", low=0.0, low_open=True, high=3650.0)
    # --- data: your own event log instead of the generator (shared/sources.py; README "Your own data") ------------
    data_path: str = _spec("", "events file to train on instead of the synthetic generator (empty = synthetic)")
    data_format: str = _spec("auto", "format of data-path (auto = detected from the file name and header)",
                             choices=DATA_FORMATS)
    item_properties_path: str = _spec("", "retailrocket: item_properties.csv file(s), comma-separated, for categories "
                                      "(property categoryid) and prices (790); recbole: the .item file (default: "
                                      "the .item beside the .inter)")
    event_map: str = _spec("", "raw event -> view|cart|purchase|drop, comma-separated pairs over the format's "
                           "defaults, e.g. \"pv:view,buy:purchase,cart:cart,fav:view\"; drop = dropped and counted")
    item_column: str = _spec("", "transactions: the column naming the item bought (empty = one \"basket\" item)")
    timestamp_format: str = _spec("", "strptime format of date strings (rees46, transactions); empty = ISO 8601")
    purchase_rating: float = _spec(4.0, "recbole: a rated interaction at least this is also a purchase", low=0.0)
    on_bad_rows: str = _spec("error", "a malformed row stops loading with file:line:column (error) or is skipped "
                             "and counted in the data report (skip)", choices=ON_BAD_ROWS)
    partition: str = _spec("dirichlet", "merchant assignment: natural:<column> (one merchant per value, e.g. "
                           "natural:brand), iid, dirichlet (over shoppers' main category) or size-skew")
    partition_alpha: float = _spec(0.5, "Dirichlet concentration of the dirichlet and size-skew partitions (smaller = "
                                   "more skewed)", low=0.0, low_open=True, high=1e6)
    shoppers_at_several_merchants: bool = _spec(False, "let one shopper appear at several merchants (natural: every "
                                                "merchant they bought from; partitioners: per shopper and category); "
                                                "shopper-level epsilon then composes over those merchants")
    public_fraction: float = _spec(0.2, "fraction of shoppers that form the public split (pretraining only)",
                                   low=0.0, low_open=True, high=0.9)
    min_shopper_events: int = _spec(0, "cleaning: drop shoppers with fewer events (k-core, with min-item-events); "
                                    "0 = by task: 1 for a transactions log or tasks = churn (one-time customers are "
                                    "what a churn study is about), else 5, stopping with a message when that would "
                                    "drop more than half of the shoppers", low=0, high=1_000_000)
    min_item_events: int = _spec(2, "cleaning: drop items with fewer events (k-core)", low=1, high=1_000_000)
    max_events_per_shopper_per_day: int = _spec(1000, "cleaning: a shopper with more events on one day is a bot and "
                                                "dropped (0 = no limit)", low=0)
    time_window_start: str = _spec("", "cleaning: keep events at or after this ISO date/time (UTC; empty = no bound)")
    time_window_end: str = _spec("", "cleaning: keep events before this ISO date/time (UTC; empty = no bound)")
    world_cache_dir: str = _spec(WORLD_CACHE_DIR, "folder of the on-disk cache of a world (a real log parsed, "
                                 "cleaned and partitioned, or the generator's draw; shared/worldcache.py): the first "
                                 "process builds it and writes it there, every later one (merchant messages, "
                                 "simulation actors, pretraining, references, predict) reads it in milliseconds; "
                                 "keyed by every data key and each file's path, size and modification time (for the "
                                 "generator, its code's fingerprint). Left at its default, the environment variable "
                                 "FEDSHOP_WORLD_CACHE_DIR replaces it when set. Empty = no disk cache")
    # --- model -------------------------------------------------------------------------------------------
    model_size: str = _spec("small", "T5 size preset of a fresh base model (unused when base-model names a "
                            "checkpoint)", choices=MODEL_SIZES)
    base_dir: str = _spec("bases/small", "base directory (config, safetensors, tokenizer) every merchant loads")
    base_model: str = _spec("", "a local Hugging Face T5 checkpoint directory (config.json with model_type t5, "
                            "model.safetensors, tokenizer.json) that `fedshop pretrain` starts from instead of a fresh "
                            "model-size preset: its tokenizer gains fedshop's domain tokens, its embeddings grow to "
                            "match, and it trains on the public split like a preset; never downloaded (empty = a "
                            "fresh T5 of model-size)")
    item_ids: str = _spec("token", "how the model writes an item: token (one token per catalogue item, ranked in one "
                          "decoder step) or semantic (category, co-view cluster, price band and a slot, built from "
                          "public facts when the base is pretrained; ranking decodes only valid items; items new to "
                          "the base get an id from their facts)", choices=ITEM_ID_CHOICES)
    semantic_clusters: int = _spec(4, "item-ids = semantic: co-view clusters per category", low=1, high=256)
    pretrain_epochs: int = _spec(8, "epochs of supervised pretraining on the public split", low=0, high=1000)
    pretrain_batch_size: int = _spec(128, "batch size of pretraining", low=1, high=65536)
    pretrain_learning_rate: float = _spec(5e-3, "learning rate of pretraining (AdamW)", low=0.0, low_open=True,
                                          high=1.0)
    pretrain_task_weights: str = _spec("intent:1,next-item:1,churn:1", "pretraining loss: each task's mean example "
                                       "loss times its weight (task:weight, comma-separated; a task not named weighs "
                                       "1). Averaging over examples instead let next-item, the largest loss, drown "
                                       "the yes/no tasks")
    train_task_weights: str = _spec("intent:1,next-item:1,churn:1", "merchant training (and the reference runs): "
                                    "a sampled shopper's gradient is the weighted mean of its examples' gradients, "
                                    "each example weighing its task's weight (task:weight, comma-separated; a task "
                                    "not named weighs 1), so a task with few examples per shopper (churn) keeps a "
                                    "share of the clipped gradient")
    lora_r: int = _spec(8, "LoRA rank", low=1, high=1024)
    lora_alpha: float = _spec(16.0, "LoRA alpha (update scale alpha / r)", low=0.0, low_open=True, high=1e4)
    lora_dropout: float = _spec(0.0, "dropout on the LoRA branch", low=0.0, high=1.0, high_open=True)
    wide: bool = _spec(False, "a wide part beside the T5 (shared/wide.py): one trainable number per feature token of "
                       "a yes/no question added to its yes logit (intent: the candidate item, its category, bands "
                       "and price level; churn: the activity bands), and for a next-item answer one bias per item and "
                       "one weight per category for staying in the most recent item's category, trained with the "
                       "LoRA tensors under the same DP-SGD; what lets intent and churn learn per-item purchase rates "
                       "and the merchants' leaving behaviour, which no LoRA weight of an lm_head-only adapter feeds, "
                       "and next item the items' drifted popularity and category following")
    wide_links: bool = _spec(True, "with wide = true: `fedshop pretrain` counts how often each item followed another "
                             "in the public split and the wide part adds, to a next-item answer, a trained weight "
                             "times the log of those counts from the most recent item (public knowledge; what lets "
                             "next item use which item came last, as a Markov chain does); false: a base without "
                             "them (a base is pretrained with or without them: give each its own base-dir)")
    wide_dense_step: float = _spec(1.0, "with wide = true: the share of each optimizer step that the wide part's "
                                   "dense weights keep (intent's features other than the candidate item, the churn "
                                   "bands, the categories' stay weights: each read by many examples of every "
                                   "shopper); below 1 they move less than the per-item weights (shared/wide.py, "
                                   "WideHead.train_only)", low=0.0, high=1.0)
    wide_item_step: float = _spec(1.0, "with wide = true: the share of each optimizer step that the wide part's "
                                  "per-item weights keep (intent's candidate-item weights, the next-item biases); "
                                  "above 1 they move further than the step took them", low=0.0, high=4.0)
    lora_targets: str = _spec("q,v", "comma-separated T5 layers LoRA adapts: linear layers of the attention "
                              "(q, k, v, o) and feed-forward (wi, wo); lm_head, the output layer, which gives every "
                              "item token r adaptable output weights; embed, the encoder's input embedding, which "
                              "gives every item token r adaptable input coordinates (how the model reads an item in a "
                              "history or as an intent candidate)", choices=LORA_TARGET_CHOICES, multi=True)
    # --- federation ----------------------------------------------------------------------------------------
    num_rounds: int = _spec(3, "federated rounds", low=1, high=100_000)
    fraction_train: float = _spec(1.0, "fraction of merchants sampled for training each round", low=0.0,
                                  low_open=True, high=1.0)
    fraction_evaluate: float = _spec(1.0, "fraction of merchants sampled for each round's federated evaluation (round "
                                     "0 included): below 1 every round scores a fresh sample, so the report gives no "
                                     "verdict against round 0 (for runs of many merchants)", low=0.0, low_open=True,
                                     high=1.0)
    local_epochs: int = _spec(1, "local epochs per round (in expected Poisson batches)", low=1, high=1000)
    batch_size: int = _spec(64, "expected batch size of Poisson sampling", low=1, high=65536)
    learning_rate: float = _spec(2e-3, "merchant learning rate (AdamW on LoRA tensors)", low=0.0, low_open=True,
                                 high=10.0)
    server_learning_rate: float = _spec(1.0, "the server moves the global adapter by this times the merchants' mean "
                                        "update (fedavg and ffa; 1 = plain averaging). Averaging M merchants' "
                                        "DP-noised updates cuts their noise by about sqrt(M), so a step larger than 1 "
                                        "uses that; post-processing of the merchants' DP outputs, no privacy cost",
                                        low=0.0, low_open=True, high=100.0)
    eval_batch_size: int = _spec(256, "batch size of evaluation", low=1, high=65536)
    # --- aggregation of the merchants' adapters ----------------------------------------------------------------
    aggregation: str = _spec("ffa", "how the server merges the adapters: fedavg (weighted mean of A and B "
                             "separately), ffa (FFA-LoRA: A frozen at its shared initialisation, only B trains and "
                             "travels to the server, so the mean of B times A is the mean of the updates), svd "
                             "(weighted mean of the products (alpha/r)*B*A, re-factorised to rank r by truncated SVD; "
                             "refused with central DP)", choices=AGGREGATIONS)
    robust: str = _spec("none", "replace the weighted mean of the merchants' tensors by the per-coordinate median or "
                        "trimmed mean, unweighted (fedavg and ffa only; refused with svd and with central DP)",
                        choices=ROBUST_CHOICES)
    trim_fraction: float = _spec(0.2, "robust = trimmed-mean: fraction of merchants cut at each end per coordinate "
                                 "(floor(fraction x merchants))", low=0.0, high=0.5, high_open=True)
    secure_aggregation: bool = _spec(False, "each train round through Flower's SecAgg+ protocol: merchants send "
                                     "masked updates and the server learns only their weighted mean (fedavg or ffa, "
                                     "robust = none, no central DP; max-update-norm then bounds the mean only)")
    secure_max_weight: float = _spec(100_000.0, "secure-aggregation: the largest num-examples a merchant may weigh "
                                     "with (SecAgg+ encodes weights as fractions of it in fixed point)",
                                     low=1.0, high=1e9)
    max_update_norm: float = _spec(1e4, "a merchant's update (L2 norm over all its tensors of what it sent minus what "
                                   "the server sent) above this is rejected; 0 or inf = no bound", low=0.0)
    min_merchants: int = _spec(1, "a round aggregates only if at least this many merchants replied, trained and sent "
                               "a valid update, unless none failed or was rejected (declines alone never stop a run); "
                               "otherwise the run stops with an error naming the round and why each merchant failed, "
                               "and its last complete checkpoint (formerly min-valid-merchants)", low=1, high=1000)
    round_timeout: float = _spec(3600.0, "seconds the server waits for a round's replies (train and evaluate each); "
                                 "a merchant that has not replied by then counts as failed for that round",
                                 low=1.0, high=1e7)
    fault_injection: str = _spec("", "inject merchant faults for reliability tests: comma-separated "
                                 "kind@merchant:round entries, kind one of raise (an exception after training), "
                                 "exit (the merchant's process ends after training), hang (sleeps past "
                                 "round-timeout after training), garbage (replies with a NaN update), e.g. "
                                 "\"exit@m1:2,hang@m2:3\"; empty = none")
    # --- privacy -------------------------------------------------------------------------------------------
    dp: bool = _spec(True, "train with DP-SGD (false gives the non-private run for comparison)")
    target_epsilon: float = _spec(8.0, "each merchant's privacy budget epsilon over the whole planned schedule",
                                  low=0.0, low_open=True, high=1e6)
    target_delta: float = _spec(1e-5, "delta of the privacy budget", low=0.0, low_open=True, high=1.0,
                                high_open=True)
    examples_per_shopper: int = _spec(1, "privacy-unit = shopper: examples a sampled shopper gives one DP-SGD step "
                                      "(drawn without replacement); their gradients are averaged before clipping, so "
                                      "a shopper still adds one clipped vector per step and the epsilon is the same",
                                      low=1, high=4096)
    max_grad_norm: float = _spec(1.0, "per-sample gradient clipping norm C", low=0.0, low_open=True, high=1e6)
    accountant: str = _spec("rdp", "privacy accountant", choices=ACCOUNTANTS)
    privacy_unit: str = _spec("event", "the protected record: event (one training example), shopper (everything one "
                              "shopper did: each DP-SGD step samples shoppers, one clipped gradient each) or merchant "
                              "(central DP at the server over whole merchant updates)", choices=PRIVACY_UNITS)
    central_dp: bool = _spec(False, "add merchant-level central DP at the server on top of an event or shopper unit "
                             "(always on when privacy-unit = merchant)")
    central_target_epsilon: float = _spec(8.0, "merchant-level epsilon budget when central-dp is combined with an "
                                          "event or shopper unit (with privacy-unit = merchant, target-epsilon is "
                                          "that budget)", low=0.0, low_open=True, high=1e6)
    central_clip_norm: float = _spec(0.05, "L2 bound on each merchant's adapter update under central DP",
                                     low=0.0, low_open=True, high=1e6)
    secure_mode: bool = _spec(False, "cryptographically secure randomness for DP noise and sampling (the production "
                              "setting; slower)")
    audit_canaries: int = _spec(0, "canary records for the one-run privacy audit, each inserted with probability "
                                "1/2 (0 = none)", low=0, high=100_000)
    audit_holdout: float = _spec(0.1, "fraction of each merchant's shoppers kept out of training as the membership "
                                 "audit's non-members", low=0.0, high=0.5)
    # --- run -----------------------------------------------------------------------------------------------
    run_dir: str = _spec("runs/latest", "run directory written by the server")
    resume_from: str = _spec("", "a finished run directory to continue: its final adapter is the starting point and "
                             "every merchant's privacy ledger carries on from its privacy.csv (empty = a fresh run)")
    resume_unfinished: bool = _spec(False, "set by `fedshop simulate --resume RUN_DIR`: resume-from (= run-dir) "
                                    "stopped before its planned last round; the run goes on from its last complete "
                                    "checkpoint (checkpoints/round-<N>) to that round, with every merchant's "
                                    "accountant history read from its ledger")
    init_adapter: str = _spec("", "an export folder (fedshop export) to continue on new data: its adapter is the "
                              "starting point (verified against its manifest, its base and this config's LoRA "
                              "shape) and the merchants in its privacy.csv carry their accountant history on; "
                              "merchants new to the federation start from zero (empty = a fresh run; not with "
                              "resume-from)")
    references: str = _spec("none", "reference runs `fedshop simulate` trains after the federation, on the same "
                            "splits, for the report: local-only (each merchant alone, same recipe and DP budget), "
                            "centralised (all merchants' training data pooled, no DP); simulation only",
                            choices=REFERENCE_CHOICES, multi=True)
    merchant_nodes: str = _spec("", "deployment: a JSON file mapping the node ids the SuperLink authenticated to "
                                "merchant names (fedshop deploy --auth writes it); the ledger then names merchants by "
                                "it, not by the partition-id they report (empty = the reported partition-id)")
    progress: bool = _spec(True, "show a progress line per round")
    torch_threads: int = _spec(1, "torch intra-op threads per merchant process", low=1, high=256)
    merchant_gpu_share: float = _spec(0.25, "simulation with device cuda: the share of one GPU each merchant actor "
                                      "reserves (Ray's client_resources num_gpus; 0.25 = four merchants train on a "
                                      "GPU at once); unused on the CPU", low=0.0, high=1.0, low_open=True)
    precision: str = _spec("fp32", "arithmetic of the model's forward passes (merchants, pretraining, reference "
                           "runs, predict): fp32; bf16 for training and evaluation (autocast: matmuls in bfloat16, "
                           "weights, losses and the clipped, noised DP gradients stay float32); or bf16-train, bf16 "
                           "for training steps only, every evaluation and predict in fp32 (a base's evaluated "
                           "figures then do not depend on bfloat16 rounding)", choices=PRECISIONS)
    device: str = _spec("auto", "where models train and evaluate (pretraining, merchants, reference runs, predict): "
                        "cuda, cpu, or auto (cuda when torch sees a CUDA device, else cpu); cuda on a machine without "
                        "one is refused when a model is placed", choices=DEVICES)

    def __post_init__(self) -> None:
        """Combinations of keys that fedshop refuses (each key on its own was checked by `from_mapping`)."""
        central = "central DP (privacy-unit = merchant or central-dp = true)"
        if self.aggregation == "svd" and self.central:
            raise ConfigError(f"config key 'aggregation' = 'svd' cannot be combined with {central}: the noise is "
                              "calibrated to a mean of clipped A and B updates (sensitivity central-clip-norm / "
                              "merchants), while svd releases the SVD factors of the mean of the products B_i*A_i, "
                              "whose dependence on one merchant that clipping does not bound, so the merchant-level "
                              "epsilon would not hold; use aggregation = fedavg or ffa")
        if self.robust != "none" and self.aggregation == "svd":
            raise ConfigError(f"config key 'robust' = {self.robust!r} cannot be combined with aggregation = 'svd' "
                              "(a median of A and B factors is not a median of the updates); use robust = none")
        if self.robust != "none" and self.central:
            raise ConfigError(f"config key 'robust' = {self.robust!r} cannot be combined with {central}: the noise "
                              "is calibrated to the fixed-denominator mean of clipped updates (each merchant's "
                              "influence is already bounded by central-clip-norm / merchants); use robust = none")
        if self.server_learning_rate != 1.0 and (self.aggregation == "svd" or self.central):
            raise ConfigError(f"config key 'server-learning-rate' = {self.server_learning_rate:g} works with "
                              "aggregation fedavg or ffa without central DP (svd re-factorises the mean of the "
                              "products; central DP's noise is calibrated to the plain mean); set it to 1")
        if self.secure_aggregation and (self.aggregation == "svd" or self.central or self.robust != "none"):
            raise ConfigError("config key 'secure-aggregation' = true needs aggregation fedavg or ffa, robust = none "
                              f"and no {central}: the server then sees only the sum of the updates, while svd, "
                              "robust aggregation and central DP's per-merchant clipping need each update")
        if self.secure_aggregation and int(self.num_merchants * self.fraction_train) < 2:
            raise ConfigError("config key 'secure-aggregation' = true needs at least 2 merchants a round "
                              f"(num-merchants {self.num_merchants} x fraction-train {self.fraction_train:g}): "
                              "SecAgg+ masks each update with the others'")
        if self.resume_unfinished and not self.resumes_in_place:
            raise ConfigError("config key 'resume-unfinished' needs resume-from = run-dir (the stopped run itself); "
                              "use `fedshop simulate --resume RUN_DIR`")
        if self.resume_from and self.init_adapter:
            raise ConfigError("config keys 'resume-from' and 'init-adapter' cannot both be set: resume-from continues "
                              "a run directory, init-adapter an export folder; set one of them")
        if self.lora_target_list == ["lm_head"] and "next-item" not in self.train_task_list and not self.wide:
            raise ConfigError(f"config key 'train-tasks' = {self.train_tasks!r} with lora-targets = "
                              "'lm_head' and wide = false: that adapter moves only the items' output rows, which no "
                              "yes/no answer reads, so training would leave the model at its base; set wide = true, "
                              "add next-item to the tasks, or a layer that intent and churn pass through to "
                              "lora-targets (e.g. \"q,v,lm_head\")")
        if not set(self.train_task_list) <= set(self.task_list):
            raise ConfigError(f"config key 'train-tasks' = {self.train_tasks!r}: every task trained must be in "
                              f"tasks = {self.tasks!r}")
        if "price" in self.task_list and "intent" not in self.task_list:
            raise ConfigError(f"config key 'tasks' = {self.tasks!r}: price needs intent (the price curve is the intent "
                              "head queried at every price level); add intent")
        if self.partition not in PARTITION_KINDS and not (self.partition.startswith("natural:")
                                                          and self.partition[len("natural:"):].strip()):
            raise ConfigError(f"config key 'partition' = {self.partition!r}: expected natural:<column> (e.g. "
                              f"natural:brand) or one of {', '.join(PARTITION_KINDS)}")
        for key in ("time-window-start", "time-window-end"):
            parse_time_bound(key, getattr(self, key.replace("-", "_")))
        for pair in _split(self.event_map):
            raw, _, canonical = pair.partition(":")
            if not raw.strip() or canonical.strip() not in ("view", "cart", "purchase", "drop"):
                raise ConfigError(f"config key 'event-map' entry {pair!r}: expected raw:canonical with canonical one "
                                  "of view, cart, purchase, drop (e.g. \"pv:view,buy:purchase,fav:drop\")")
        if self.new_items and self.data_path:
            raise ConfigError("config key 'new-items' shapes the synthetic generator and cannot be combined with "
                              "data-path: in your own log the items no public-split shopper viewed are the new ones "
                              "(set new-items = 0, or --set new-items=0)")
        if self.drift and self.data_path:
            raise ConfigError("config key 'drift' shapes the synthetic generator and cannot be combined with "
                              "data-path: a real log drifts (or not) by itself (set drift = 0, or --set drift=0)")
        if self.new_items >= self.num_items:
            raise ConfigError(f"config key 'new-items' = {self.new_items} must be below num-items = {self.num_items}")
        _ = self.pretrain_weights  # parsed here so that a malformed entry is refused with the config, key named
        _ = self.train_weights
        if self.min_merchants > self.num_merchants:
            raise ConfigError(f"config key 'min-merchants' = {self.min_merchants} exceeds num-merchants "
                              f"= {self.num_merchants}")
        from shared.faults import parse_faults

        parse_faults(self.fault_injection, self.num_merchants)  # refused here, entry named

    # ---------------------------------------------------------------------------------------------------------
    @property
    def update_norm_bound(self) -> float | None:
        """`max-update-norm` as a bound, None when it is off (0 or inf)."""
        return None if self.max_update_norm == 0 or math.isinf(self.max_update_norm) else self.max_update_norm

    @property
    def lora_target_list(self) -> list[str]:
        return _split(self.lora_targets)

    @property
    def reference_list(self) -> list[str]:
        return [r for r in _split(self.references) if r != "none"]

    @property
    def pretrain_weights(self) -> dict[str, float]:
        """`pretrain-task-weights` as {task: weight} over the tasks that have examples (price has none)."""
        return _task_weights("pretrain-task-weights", self.pretrain_task_weights)

    @property
    def train_weights(self) -> dict[str, float]:
        """`train-task-weights` as {task: weight} over the tasks that have examples (price has none)."""
        return _task_weights("train-task-weights", self.train_task_weights)

    @property
    def task_list(self) -> list[str]:
        return _split(self.tasks)

    @property
    def train_task_list(self) -> list[str]:
        """The tasks merchants and reference runs train on (`train-tasks`, or every task but price)."""
        named = _split(self.train_tasks)
        return [t for t in self.task_list if t != "price"] if "all" in named else named

    @property
    def train_precision(self) -> str:
        """The arithmetic of training steps' forward passes (shared.modeling.autocast): bf16 for bf16 and bf16-train."""
        return "fp32" if self.precision == "fp32" else "bf16"

    @property
    def eval_precision(self) -> str:
        """The arithmetic of evaluation and predict: bf16 only for `precision = bf16`."""
        return "bf16" if self.precision == "bf16" else "fp32"

    @property
    def local_dp(self) -> bool:
        """DP-SGD at each merchant (event or shopper unit)."""
        return self.dp and self.privacy_unit in ("event", "shopper")

    @property
    def central(self) -> bool:
        """Merchant-level central DP at the server (clipping of updates, Gaussian noise at aggregation)."""
        return self.dp and (self.privacy_unit == "merchant" or self.central_dp)

    @property
    def merchant_level_target_epsilon(self) -> float:
        """The budget of the server's central DP: target-epsilon for the merchant unit, else central-target-epsilon."""
        return self.target_epsilon if self.privacy_unit == "merchant" else self.central_target_epsilon

    @property
    def continued_from(self) -> str:
        """The run directory or export folder this run continues (resume-from or init-adapter), '' for none."""
        return self.resume_from or self.init_adapter

    @property
    def resumes_in_place(self) -> bool:
        """resume-from names this run's own run-dir: the run continues that directory (ledger and metrics appended,
        rounds numbered on) instead of starting a new one."""
        return bool(self.resume_from) and Path(self.resume_from).resolve() == Path(self.run_dir).resolve()

    def idle_generator_keys(self) -> list[str]:
        """With data-path: the synthetic generator's keys set away from their defaults, which shape nothing then
        (a preset such as configs/real-shaped.toml brought to a real log keeps them)."""
        if not self.data_path:
            return []
        return [_kebab(name) for name in GENERATOR_KEYS
                if getattr(self, name) != FIELDS[_kebab(name)].default]

    def to_flat(self) -> dict[str, Any]:
        """Kebab-case mapping of every key, as Flower's run config and `config.toml` hold it."""
        return {_kebab(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> FedShopConfig:
        return from_mapping({**self.to_flat(), **{_kebab(k): v for k, v in changes.items()}})


def parse_time_bound(key: str, text: str) -> int | None:
    """An ISO date or date-time (naive = UTC) in ms since the epoch; None when empty."""
    if not text:
        return None
    from datetime import UTC, datetime

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"config key '{key}' = {text!r}: expected an ISO date or date-time such as 2019-10-01 or "
                          "2019-10-01T12:00:00") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _kebab(name: str) -> str:
    return name.replace("_", "-")


FIELDS = {_kebab(f.name): f for f in dataclasses.fields(FedShopConfig)}
# The generator's keys that a real log (data-path) replaces: its sizes and its shoppers' behaviour.
GENERATOR_KEYS = ("shoppers_per_merchant", "public_shoppers", "num_items", "num_categories", "days",
                  "popularity_exponent", "views_per_session", "mean_gap_days", "leave_bias", "merchant_skew",
                  "item_links")


def describe_range(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta["choices"]:
        joined = ", ".join(meta["choices"])
        return f"a comma-separated list of {joined}" if meta["multi"] else f"one of {joined}"
    if f.type in ("bool", bool):
        return "true or false"
    kind = "an integer" if f.type in ("int", int) else ("a number" if f.type in ("float", float) else "a string")
    low, high = meta["low"], meta["high"]
    if low is None and high is None:
        return kind
    left = "(" if meta["low_open"] else "["
    right = ")" if meta["high_open"] else "]"
    lo = "-inf" if low is None else f"{low:g}"
    hi = "inf" if high is None else f"{high:g}"
    return f"{kind} in {left}{lo}, {hi}{right}"


def _coerce(key: str, f: dataclasses.Field, raw: Any, where: str) -> Any:
    kind = f.type
    expected = describe_range(f)

    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{where}config key '{key}' = {_shown(raw)}: {why}; expected {expected}")

    if kind in ("bool", bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("true", "false"):
            return raw.strip().lower() == "true"
        raise refuse("not a boolean")
    if kind in ("int", int):
        if isinstance(raw, bool):
            raise refuse("not an integer")
        if isinstance(raw, int):
            value: Any = raw
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif isinstance(raw, str):
            try:
                value = int(raw.strip())
            except ValueError:
                raise refuse("not an integer") from None
        else:
            raise refuse("not an integer")
    elif kind in ("float", float):
        if isinstance(raw, bool):
            raise refuse("not a number")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise refuse("not a number") from None
        except OverflowError:  # an integer beyond float's range
            raise refuse("out of range") from None
        if math.isnan(value):
            raise refuse("not a number")
    else:
        if not isinstance(raw, str):
            raise refuse("not a string")
        if "\x00" in raw or not _encodes(raw):
            raise refuse("a NUL character or bytes that are not UTF-8 (from the command line)")
        value = raw.strip()
    meta = f.metadata
    if meta["choices"]:
        parts = _split(value) if meta["multi"] else [value]
        bad = [p for p in parts if p not in meta["choices"]]
        if bad or not parts:
            raise refuse(f"{', '.join(_shown(b) for b in bad) or 'empty'} not allowed")
        if meta["multi"]:
            value = ",".join(dict.fromkeys(parts))
    if isinstance(value, (int, float)):
        low, high = meta["low"], meta["high"]
        if low is not None and (value < low or (meta["low_open"] and value <= low)):
            raise refuse("out of range")
        if high is not None and (value > high or (meta["high_open"] and value >= high)):
            raise refuse("out of range")
    return value


def _shown(value: Any) -> str:
    """A value as a message shows it: its repr, at most 200 characters."""
    try:
        text = repr(value)
    except ValueError:  # an int (or a list holding one) of more digits than Python converts to text
        size = f" of about {int(value.bit_length() * math.log10(2))} digits" if isinstance(value, int) else ""
        return f"<{type(value).__name__}{size}, too long to show>"
    return text if len(text) <= 200 else f"{text[:180]}... ({len(text)} characters)"


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a byte of the command line that was not UTF-8
        return False
    return True


def from_run_config(run_config: Mapping[str, Any]) -> FedShopConfig:
    """The config of a Flower run config (`context.run_config`), parsed and validated once per distinct run config:
    a ClientApp is handed the same run config with every message of a run. The config is frozen, so one parsed
    object may serve every message."""
    return _parsed(tuple(sorted(run_config.items())))


@functools.lru_cache(maxsize=4)
def _parsed(items: tuple[tuple[str, Any], ...]) -> FedShopConfig:
    return from_mapping(dict(items))


def from_mapping(values: dict[str, Any], where: str = "") -> FedShopConfig:
    """Parse and validate a flat kebab-case mapping; missing keys take their defaults."""
    kwargs = _coerce_all(values, where)
    try:
        return FedShopConfig(**kwargs)
    except ConfigError as exc:
        if not where:
            raise
        raise ConfigError(f"{where}{exc}") from None


def _coerce_all(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Each key checked on its own (name, type, range): the dataclass's keyword arguments."""
    kwargs = {}
    for key, raw in values.items():
        if key in RENAMED:  # an older name, still read (a run directory's config.toml written before the rename)
            if RENAMED[key] in values:
                raise ConfigError(f"{where}config keys {_shown(key)} and '{RENAMED[key]}' are the same key (the first "
                                  "is its former name); give only the second")
            key = RENAMED[key]
        f = FIELDS.get(key)
        if f is None:
            hint = _closest(key)
            raise ConfigError(f"{where}unknown config key {_shown(key)}"
                              + (f" (did you mean '{hint}'?)" if hint else "") + "; known keys: " + ", ".join(FIELDS))
        kwargs[f.name] = _coerce(key, f, raw, where)
    return kwargs


RENAMED = {"min-valid-merchants": "min-merchants"}  # former name -> key


def _closest(key: str) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(FIELDS), n=1)
    return matches[0] if matches else None


def parse_override(text: str) -> tuple[str, str]:
    """`key=value` from the command line."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def load_toml(path: str | Path) -> dict[str, Any]:
    """A config override file: flat keys at top level (or under [tool.flwr.app.config])."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} " + ("is a directory; expected a TOML file" if path.is_dir() else
                                                    "does not exist"))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits; arrays nested thousands deep
        why = "arrays or tables nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise ConfigError(f"{path}: not a TOML file fedshop can read ({why})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    nested: Any = data
    for section in ("tool", "flwr", "app", "config"):  # a pyproject.toml's [tool.flwr.app.config]
        nested = nested.get(section) if isinstance(nested, dict) else None
    if isinstance(nested, dict):
        data = nested
    for key, value in data.items():
        if isinstance(value, dict):
            raise ConfigError(f"{path}: section [{_shown(key)[1:-1]}] not allowed; fedshop configs are flat key = "
                              "value pairs")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> FedShopConfig:
    """Defaults, then a TOML file, then `--set key=value` overrides, validated together."""
    values: dict[str, Any] = {}
    if path is not None:
        file_values = load_toml(path)
        _coerce_all(file_values, where=f"{path}: ")  # name the file in any error about one of its keys
        values.update(file_values)
    for text in overrides or []:
        key, value = parse_override(text)
        if key not in FIELDS:
            _coerce_all({key: value}, where="--set: ")
        values[key] = value
    return from_mapping(values)


def to_toml(config: FedShopConfig) -> str:
    """`config.toml` of a run directory: every key, resolved."""
    lines = ["# fedshop resolved configuration: every key, as this run used it", ""]
    for key, value in config.to_flat().items():
        lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    return '"' + "".join(_TOML_ESCAPES.get(c) or (f"\\u{ord(c):04x}" if c < " " or c == "\x7f" else c)
                         for c in str(value)) + '"'


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _task_weights(key: str, value: str) -> dict[str, float]:
    """A `task:weight` list (config key `key`) as {task: weight} over the tasks that have examples; unnamed: 1."""
    weights = {task: 1.0 for task in ("intent", "next-item", "churn")}
    for pair in _split(value):
        task, _, raw = pair.partition(":")
        try:
            weight = float(raw)
        except ValueError:
            weight = float("nan")
        if task.strip() not in weights or not (math.isfinite(weight) and weight > 0):
            raise ConfigError(f"config key {key!r} entry {pair!r}: expected task:weight with task one of "
                              f"{', '.join(weights)} and a weight > 0 (e.g. \"intent:3,churn:2\")")
        weights[task.strip()] = weight
    return weights
