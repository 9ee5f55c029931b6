"""The Flower names fedshop relies on beyond `flwr.app`, `flwr.serverapp` and `flwr.clientapp` still exist with the
parameters fedshop passes: a Flower upgrade that changes them fails here, loudly, instead of inside a run."""

import inspect
from pathlib import Path

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.simulation import run_simulation
from flwr.simulation.run_simulation import _run_simulation

from server.simulation import simulation_arguments
from shared.config import FedShopConfig


def test_the_private_simulation_entry_point_takes_every_argument_fedshop_passes(tmp_path: Path):
    # Prepare
    accepted = inspect.signature(_run_simulation).parameters
    # Execute
    passed = simulation_arguments(FedShopConfig(), tmp_path)
    # Assert: flwr 1.42's `_run_simulation` (server/simulation.py) still takes each of them by name
    assert set(passed) <= set(accepted), f"no longer accepted: {sorted(set(passed) - set(accepted))}"
    assert "run_config" not in inspect.signature(run_simulation).parameters, \
        "flwr.simulation.run_simulation now takes a run config: use it instead of the private _run_simulation"


def test_the_flower_helpers_the_strategies_use_keep_their_parameters():
    # Prepare / Execute
    replies = inspect.signature(validate_replies).parameters
    nodes = inspect.signature(sample_nodes).parameters
    wrapper = inspect.signature(DifferentialPrivacyServerSideFixedClipping.__init__).parameters
    # Assert
    assert list(replies)[:3] == ["replies", "num_sampled_clients", "strict"]
    assert list(nodes)[:3] == ["grid", "min_available_nodes", "sample_size"]
    assert {"strategy", "noise_multiplier", "clipping_norm", "num_sampled_clients", "accountant"} <= set(wrapper)


def test_merchant_actors_reserve_a_gpu_share_only_when_the_device_is_cuda(tmp_path: Path, monkeypatch):
    def share(config: FedShopConfig) -> float:
        return simulation_arguments(config, tmp_path)["backend_config"]["client_resources"]["num_gpus"]

    # Execute / Assert: device cpu never reserves a GPU
    assert share(FedShopConfig(device="cpu", merchant_gpu_share=0.5)) == 0.0
    # torch reports a CUDA device (only the detection is replaced: no tensor is placed)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert share(FedShopConfig(device="auto", merchant_gpu_share=0.5)) == 0.5
    assert share(FedShopConfig(device="cuda")) == 0.25
    assert share(FedShopConfig(device="cpu")) == 0.0
