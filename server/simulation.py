"""Run the fedshop Flower app in Flower's simulation engine (Ray backend), in this process, with a resolved config.

`flwr.simulation.run_simulation` hands the apps an empty run config, so `fedshop simulate` drives the engine the way
`flwr run` does internally: the ServerApp and ClientApp are loaded by reference from an app directory whose
`pyproject.toml` carries the fully resolved config as `[tool.flwr.app.config]`, which Flower fuses into every
merchant's `context.run_config`. This uses `flwr.simulation.run_simulation._run_simulation`, a private function of
flwr 1.42 (pinned in pyproject.toml) with no public equivalent that takes a run config; this module is the only place
that names it, and tests/test_flower_api.py checks its parameters. `flwr run .` remains the public way and reads the
same keys.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.telemetry import EventType

from shared.config import FedShopConfig, to_toml
from shared.files import write_text_atomic

SERVER_APP = "server.server_app:app"
CLIENT_APP = "client.client_app:app"
ACTOR_RESTARTS = -1  # Ray restarts a dead merchant actor every time


def write_app_dir(config: FedShopConfig, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    body = to_toml(config).split("\n", 2)[2]  # drop the comment header
    write_text_atomic(
        directory / "pyproject.toml",
        "[project]\nname = \"fedshop-run\"\nversion = \"0.1.0\"\n\n"
        "[tool.flwr.app]\npublisher = \"fedshop\"\n\n"
        f"[tool.flwr.app.components]\nserverapp = \"{SERVER_APP}\"\nclientapp = \"{CLIENT_APP}\"\n\n"
        "[tool.flwr.app.config]\n" + body,
    )
    return directory


def run_simulation(config: FedShopConfig, verbose: bool = False) -> None:
    """One federated run; returns when every round is done and the Ray runtime is shut down."""
    run_dir = Path(config.run_dir)
    app_dir = write_app_dir(config, run_dir / ".flwr-app")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # no GPUs asked for: keep Ray's env untouched
    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
    _run_simulation(**simulation_arguments(config, app_dir, verbose))


def gpu_share(config: FedShopConfig) -> float:
    """The GPU share each merchant actor reserves: merchant-gpu-share when the config's device resolves to cuda
    (Ray then gives every actor its GPU and runs 1 / share of them on it at once), else none."""
    from shared.modeling import resolve_device

    return config.merchant_gpu_share if resolve_device(config.device).type == "cuda" else 0.0


def simulation_arguments(config: FedShopConfig, app_dir: Path, verbose: bool = False) -> dict[str, Any]:
    """The keyword arguments of flwr 1.42's private `_run_simulation` (the one private Flower name fedshop uses;
    tests/test_flower_api.py fails loudly when a Flower upgrade changes its parameters)."""
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_flat())
    return {
        "num_supernodes": config.num_merchants,
        "exit_event": EventType.FLWR_SIMULATION_RUN_LEAVE,
        "server_app_attr": SERVER_APP,
        "client_app_attr": CLIENT_APP,
        "server_app_context": context,
        "app_dir": str(app_dir),
        "is_app": True,
        "backend_name": "ray",
        "backend_config": {
            # max_restarts goes through to Ray's actor options: a merchant process that dies (os._exit, a crash, an
            # out-of-memory kill) is started afresh. Without it flwr 1.42 puts the dead actor back in its pool and
            # every later message handed to it fails too, whatever merchant it is for (measured with fault-injection
            # = exit: ActorDiedError for every message to that actor in every later round)
            "client_resources": {"num_cpus": config.torch_threads, "num_gpus": gpu_share(config),
                                 "max_restarts": ACTOR_RESTARTS},
            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False,
                          "logging_level": logging.ERROR if not verbose else logging.INFO},
        },
        "verbose_logging": verbose,
    }
