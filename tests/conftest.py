"""Shared fixtures: tiny configs and a tiny pretrained base built in-process (no downloads)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from shared.config import FedShopConfig

TINY = dict(model_size="tiny", num_merchants=3, shoppers_per_merchant=40, public_shoppers=150, num_items=60,
            num_categories=6, history_length=8, pretrain_epochs=2, num_rounds=2, batch_size=16)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items) -> None:
    """Groups for pytest-xdist's `--dist loadgroup` (the README's test command): one worker takes each test file
    whole (its module fixtures are built once), and one takes every test of the session's simulated run
    (`tiny_run`), whatever file holds it. First among the hooks: pytest-xdist's own, which turns these marks into
    the groups it schedules by, must see them (tests/test_suite_groups.py)."""
    for item in items:
        group = "tiny-run" if "tiny_run" in getattr(item, "fixturenames", ()) else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def _threads():
    # one torch thread in the test process, serial or not: a 2-thread torch process next to any other busy process
    # on 2 cores waits on its descheduled thread at every op (measured under load: the tiny run's centralised
    # reference took 155 s with 2 threads, 4.5 s with 1)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_process():
    """The same for the processes the tests start (CLI commands, a simulation's driver with its references, a
    pretraining): OMP_NUM_THREADS=1 through the environment they inherit. Merchants already take torch-threads = 1.
    Set here as well for this process: session fixtures (the tiny base's pretraining) run before `_threads`."""
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(autouse=True, scope="session")
def _world_cache(tmp_path_factory):
    """Real-log worlds go to a folder of this session, never the user's ~/.cache/fedshop/worlds: through the
    environment (FEDSHOP_WORLD_CACHE_DIR, read where world-cache-dir is left at its default), so that the CLI
    commands and simulations the tests start as subprocesses, and their Ray actors, inherit it too."""
    from shared.worldcache import ENVIRONMENT

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ENVIRONMENT, str(tmp_path_factory.mktemp("world-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory) -> FedShopConfig:
    base = tmp_path_factory.mktemp("base") / "tiny"
    return FedShopConfig(**TINY, base_dir=str(base), run_dir=str(tmp_path_factory.mktemp("run")))


@pytest.fixture(scope="session")
def tiny_base(tiny_config) -> FedShopConfig:
    """The tiny config with its base directory pretrained (a few seconds)."""
    from shared.pretrain import pretrain

    pretrain(tiny_config)
    return tiny_config


@dataclass(frozen=True)
class FinishedRun:
    path: Path  # the run directory: tests read it, and copy it before changing anything in it
    stderr: str
    ray_left_running: list[str]  # Ray processes of the run's own session still alive after it exited


@pytest.fixture(scope="session")
def tiny_run(tiny_base, tmp_path_factory) -> FinishedRun:
    """`fedshop simulate --config configs/tiny.toml` once for the session, on the session's base, with the
    local-only and centralised references: 3 merchants x 2 rounds through Flower's simulation engine. The tests of
    a finished run (its files, export, paired comparisons, resume) all read this one."""
    from helpers import ROOT, ray_processes_of, simulate_command

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    process = subprocess.Popen(simulate_command(run, f"base-dir={tiny_base.base_dir}",
                                                "references=local-only,centralised"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = process.communicate(timeout=1200)
    assert process.returncode == 0, stderr[-3000:]
    return FinishedRun(run, stderr, ray_processes_of(process.pid))


@pytest.fixture
def server_identity(monkeypatch):
    """Flower Messages are created inside a task: outside one, this process takes a server identity (run 1, task 1,
    node 0) for the test only; monkeypatch restores Flower's unset identity afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
