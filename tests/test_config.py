import re
import tomllib
from pathlib import Path

import pytest

from shared.config import ConfigError, FedShopConfig, from_mapping, from_run_config, load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_the_config_defaults():
    # Prepare
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # Execute
    flwr_defaults = pyproject["tool"]["flwr"]["app"]["config"]
    # Assert
    assert flwr_defaults == FedShopConfig().to_flat()


@pytest.mark.parametrize("key, value, words", [
    ("target-epsilon", 0, "(0, 1e+06]"),
    ("target-epsilon", -1.5, "(0, 1e+06]"),
    ("target-delta", 1, "(0, 1)"),
    ("num-merchants", 0, "[1, 1000]"),
    ("lora-targets", "q,x", "comma-separated list of q, k, v, o, wi, wo"),
    ("accountant", "gdp", "one of rdp, prv"),
    ("dp", "maybe", "true or false"),
    ("num-rounds", "three", "an integer"),
    ("aggregation", "fedsgd", "one of fedavg, ffa, svd"),
    ("robust", "mean", "one of none, median, trimmed-mean"),
    ("trim-fraction", 0.5, "[0, 0.5)"),
    ("max-update-norm", -1.0, "[0, inf]"),
    ("min-merchants", 0, "[1, 1000]"),
    ("round-timeout", 0.5, "[1, 1e+07]"),
    ("device", "gpu", "one of auto, cpu, cuda"),
])
def test_bad_values_are_refused_naming_key_and_range(key, value, words):
    with pytest.raises(ConfigError) as error:
        from_mapping({key: value})
    assert f"'{key}'" in str(error.value)
    assert words in str(error.value)


@pytest.mark.parametrize("values, words", [
    ({"aggregation": "svd", "privacy-unit": "merchant"}, "'aggregation' = 'svd' cannot be combined with central DP"),
    ({"aggregation": "svd", "central-dp": True}, "'aggregation' = 'svd' cannot be combined with central DP"),
    ({"aggregation": "svd", "robust": "median"}, "'robust' = 'median' cannot be combined with aggregation = 'svd'"),
    ({"robust": "trimmed-mean", "central-dp": True}, "'robust' = 'trimmed-mean' cannot be combined with central DP"),
    ({"min-merchants": 5, "num-merchants": 4}, "'min-merchants' = 5 exceeds num-merchants = 4"),
    ({"fault-injection": "crash@m1:2"}, "'fault-injection' entry 'crash@m1:2': expected kind@merchant:round with "
                                        "kind one of raise, exit, hang, garbage, merchant m0..m3"),
    ({"fault-injection": "exit@m4:1", "num-merchants": 4}, "entry 'exit@m4:1': expected kind@merchant:round"),
    ({"fault-injection": "hang@m1:0"}, "entry 'hang@m1:0': expected kind@merchant:round"),
    ({"fault-injection": "raise@m1"}, "entry 'raise@m1': expected kind@merchant:round"),
    ({"fault-injection": "exit@m1:2, garbage@m1:2"}, "entry 'garbage@m1:2': m1 already has a fault in round 2 (exit)"),
    ({"min-valid-merchants": 2, "min-merchants": 2}, "'min-valid-merchants' and 'min-merchants' are the same key"),
    ({"new-items": 60, "num-items": 60}, "'new-items' = 60 must be below num-items = 60"),
    ({"new-items": 5, "data-path": "events.csv"}, "(set new-items = 0, or --set new-items=0)"),
    ({"drift": 1.0, "data-path": "events.csv"}, "'drift' shapes the synthetic generator and cannot be combined with "
                                                "data-path: a real log drifts (or not) by itself (set drift = 0"),
    ({"item-ids": "tiger"}, "one of token, semantic"),
    ({"pretrain-task-weights": "intent:3,price:1"}, "entry 'price:1': expected task:weight"),
    ({"pretrain-task-weights": "churn:0"}, "entry 'churn:0': expected task:weight"),
    ({"pretrain-task-weights": "intent=2"}, "entry 'intent=2': expected task:weight"),
    ({"train-tasks": "churn", "tasks": "intent,next-item,price"}, "'train-tasks' = 'churn': every task trained must "
                                                                   "be in tasks"),
    ({"tasks": "churn", "lora-targets": "lm_head"}, "'train-tasks' = 'all' with lora-targets = 'lm_head' and wide "
                                                    "= false: that adapter moves only the items' output rows"),
    ({"train-tasks": "price"}, "comma-separated list of all, intent, next-item, churn"),
])
def test_combinations_that_cannot_work_are_refused(values, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        from_mapping(values)


def test_a_churn_only_output_layer_adapter_is_accepted_with_the_wide_part_that_trains_churn():
    assert from_mapping({"tasks": "churn", "lora-targets": "lm_head", "wide": True}).wide


def test_aggregation_keys_accepted_and_norm_bound_off_at_zero_or_inf():
    config = from_mapping({"aggregation": "ffa", "robust": "trimmed-mean", "trim-fraction": 0.3,
                           "privacy-unit": "event", "max-update-norm": "inf", "min-valid-merchants": 2})
    # min-valid-merchants is min-merchants' former name: still read (a config.toml written before the rename)
    assert (config.aggregation, config.robust, config.trim_fraction, config.min_merchants) == (
        "ffa", "trimmed-mean", 0.3, 2)
    assert config.update_norm_bound is None and config.replace(max_update_norm=0).update_norm_bound is None
    assert FedShopConfig().update_norm_bound == FedShopConfig().max_update_norm == 1e4
    assert from_mapping({"aggregation": "ffa", "privacy-unit": "merchant"}).central  # ffa + central DP works


def test_fault_injection_parses_into_merchant_round_kinds():
    from shared.faults import parse_faults

    config = from_mapping({"fault-injection": " exit@m1:2,hang@m2:3 ,garbage@m0:1,raise@m3:1", "round-timeout": 30})
    assert parse_faults(config.fault_injection, config.num_merchants) == {
        ("m1", 2): "exit", ("m2", 3): "hang", ("m0", 1): "garbage", ("m3", 1): "raise"}
    assert config.round_timeout == 30.0 and parse_faults("", 4) == {}


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match="unknown config key 'target-epsilom'.*did you mean 'target-epsilon'"):
        from_mapping({"target-epsilom": 3})


def test_file_then_overrides_and_errors_name_the_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('num-rounds = 5\nlora-targets = "q,k,v"\n')
    config = load_config(path, ["num-rounds=2", "dp=false"])
    assert (config.num_rounds, config.lora_target_list, config.dp) == (2, ["q", "k", "v"], False)
    path.write_text("num-merchants = -3\n")
    with pytest.raises(ConfigError, match="exp.toml: config key 'num-merchants'"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["num-rounds"])


def test_resolved_config_round_trips_through_toml(tmp_path):
    config = FedShopConfig(num_rounds=4, target_delta=1e-6, lora_targets="q,v,o", dp=False)
    path = tmp_path / "config.toml"
    path.write_text(to_toml(config))
    assert load_config(path) == config


def test_shared_package_never_imports_flower():
    # Prepare: every module of the shared package
    modules = sorted(p.stem for p in (ROOT / "shared").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module('shared.' + name)\n"
            # flwr-datasets' partitioners, imported when used: a library of their own, not the flwr framework
            "import numpy as np\n"
            "from shared.partition import partition_units\n"
            "partition_units(np.arange(20) % 3, 'dirichlet', 2, 0.5, 0)\n"
            "print(sorted(m for m in sys.modules if m == 'flwr' or m.startswith('flwr.')))")
    # Execute
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_pretraining_task_weights_give_each_task_its_share_and_average_one():
    # Prepare: 6 next-item, 3 intent and 1 churn example; churn weighs 2, the others 1
    from shared.pretrain import task_weights
    from shared.tasks import Example
    tasks = ["next-item"] * 6 + ["intent"] * 3 + ["churn"]
    examples = [Example(task=t, source="", target="", split="train", user_id="u", label=0) for t in tasks]
    # Execute
    weights = task_weights(examples, from_mapping({"pretrain-task-weights": "churn:2"}).pretrain_weights)
    # Assert: the weights average 1, and a task's total weight is its share of 1 + 1 + 2
    assert float(weights.mean()) == pytest.approx(1.0)
    share = {t: float(weights[[k for k, u in enumerate(tasks) if u == t]].sum()) / len(tasks) for t in set(tasks)}
    assert share == pytest.approx({"next-item": 0.25, "intent": 0.25, "churn": 0.5})


def test_a_run_config_is_parsed_once_and_still_refuses_a_bad_value():
    # Prepare: what Flower hands a ClientApp with every message (a fresh mapping each time)
    flat = FedShopConfig().to_flat()
    # Execute
    first, again = from_run_config(dict(flat)), from_run_config(dict(reversed(list(flat.items()))))
    # Assert: one parsed (frozen) config per run config, and validation still applies
    assert first is again and first == FedShopConfig()
    with pytest.raises(ConfigError, match="lora-r"):
        from_run_config({**flat, "lora-r": 0})


def test_a_config_file_that_is_not_utf8_or_has_a_scalar_tool_key_is_refused_naming_the_file(tmp_path):
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"num-rounds = 3\n\xff\xfe\n")
    with pytest.raises(ConfigError, match=r"binary\.toml: not UTF-8 text"):
        load_config(binary)
    scalar = tmp_path / "scalar.toml"
    scalar.write_text("tool = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'tool'"):
        load_config(scalar)


def test_device_auto_is_cuda_only_where_torch_sees_one_and_cuda_without_one_is_refused(tmp_path):
    import torch

    from shared.modeling import resolve_device
    from shared.pretrain import pretrain

    has_cuda = torch.cuda.is_available()
    assert resolve_device("auto") == torch.device("cuda" if has_cuda else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") and FedShopConfig().device == "auto"
    if has_cuda:
        assert resolve_device("cuda") == torch.device("cuda")
        return
    with pytest.raises(ConfigError, match="config key 'device' = 'cuda': torch .* sees no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="config key 'device' = 'cuda'"):  # refused before any data or base work
        pretrain(FedShopConfig(device="cuda", base_dir=str(tmp_path / "base")))
    assert not (tmp_path / "base").exists()


def test_a_preset_brought_to_a_real_log_names_the_generator_keys_that_shape_nothing():
    """With data-path the generator's sizes and behaviour keys set away from their defaults are named (the CLI warns
    with them); without data-path, or at their defaults, none are."""
    from helpers import ROOT

    preset = ROOT / "configs/real-shaped.toml"
    assert load_config(preset).idle_generator_keys() == []
    idle = load_config(preset, ["data-path=events.csv", "drift=0", "item-links=0.3"]).idle_generator_keys()
    assert {"num-items", "popularity-exponent", "shoppers-per-merchant", "leave-bias", "item-links"} <= set(idle)
    assert "history-length" not in idle and "num-merchants" not in idle
    assert from_mapping({"data-path": "events.csv"}).idle_generator_keys() == []
