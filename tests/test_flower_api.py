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
