"""The server's FedAvg over adapters, on real Flower messages: weights, declined merchants, ledger rows."""

import csv
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from server.fedavg import LedgerFedAvg
from shared.config import FedShopConfig
from shared.privacy import PRIVACY_RECORD, PrivacyBudget
from shared.rundir import RunDirectory


@pytest.fixture(autouse=True)
def _server_identity(server_identity):
    """Every test here builds Flower Messages (the identity is restored after each test)."""


def _reply(partition: int, tensors: dict[str, torch.Tensor], examples: int, declined: bool = False) -> Message:
    request = Message(content=RecordDict(), dst_node_id=partition + 1, message_type="train")
    metrics = MetricRecord({"num-examples": examples, "train-loss": 1.0, "epsilon": 2.0 + partition,
                            "delta": 1e-5, "noise-multiplier": 0.9, "sample-rate": 0.01, "steps": 10,
                            "declined": int(declined), "partition-id": partition})
    privacy = ConfigRecord(PrivacyBudget.for_merchants(FedShopConfig()).reply_fields())
    return Message(content=RecordDict({"arrays": ArrayRecord(tensors), "metrics": metrics, PRIVACY_RECORD: privacy}),
                   reply_to=request)


def test_weighted_fedavg_equals_the_hand_computed_mean_and_skips_declined(tmp_path):
    config = FedShopConfig(run_dir=str(tmp_path))
    run_dir = RunDirectory(tmp_path)
    run_dir.start(config)
    strategy = LedgerFedAvg(run_dir, config)
    a = {"lora_A": torch.tensor([[1.0, 2.0]]), "lora_B": torch.tensor([[0.0], [4.0]])}
    b = {"lora_A": torch.tensor([[3.0, -2.0]]), "lora_B": torch.tensor([[2.0], [0.0]])}
    c = {"lora_A": torch.tensor([[100.0, 100.0]]), "lora_B": torch.tensor([[100.0], [100.0]])}
    replies = [_reply(0, a, 100), _reply(1, b, 300), _reply(2, c, 0, declined=True)]

    arrays, metrics = strategy.aggregate_train(1, replies)

    result = arrays.to_torch_state_dict()
    for key in a:  # (100 a + 300 b) / 400; the declined merchant's tensors do not count
        expected = (100 * a[key].numpy() + 300 * b[key].numpy()) / 400
        assert np.allclose(result[key].numpy(), expected)
    rows = list(csv.DictReader(open(tmp_path / "privacy.csv")))
    assert [(r["merchant"], r["status"]) for r in rows] == [("m0", "trained"), ("m1", "trained"),
                                                            ("m2", "declined")]
    assert all(r["unit"] == "event" and r["accountant"] == "rdp" and float(r["delta"]) == 1e-5 for r in rows)
    record = run_dir.read_metrics()[-1]
    assert record["scope"] == "train" and record["metrics"]["merchants-trained"] == 2
    assert math.isclose(record["metrics"]["epsilon-max"], 4.0)
