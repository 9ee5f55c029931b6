"""Shared fixtures: tiny configs and a tiny pretrained base built in-process (no downloads)."""

from __future__ import annotations

import pytest
import torch

from shared.config import FedShopConfig

TINY = dict(model_size="tiny", num_merchants=3, shoppers_per_merchant=40, public_shoppers=150, num_items=60,
            num_categories=6, history_length=8, pretrain_epochs=2, num_rounds=2, batch_size=16)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


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


@pytest.fixture
def server_identity(monkeypatch):
    """Flower Messages are created inside a task: outside one, this process takes a server identity (run 1, task 1,
    node 0) for the test only; monkeypatch restores Flower's unset identity afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
