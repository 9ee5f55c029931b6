"""Secure aggregation (`secure-aggregation = true`): every train round through Flower's SecAgg+ workflow and mod."""

import json
from pathlib import Path

import pytest
from helpers import simulate

from shared.config import ConfigError, FedShopConfig, load_config
from shared.ledger import read_privacy
from shared.model import read_adapter
from shared.rundir import RunDirectory
from shared.secure import CLIPPING_RANGE, QUANTISATION

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("keys", [{"aggregation": "svd"}, {"robust": "median"}, {"central_dp": True},
                                  {"privacy_unit": "merchant"}, {"num_merchants": 1},
                                  {"num_merchants": 10, "fraction_train": 0.1}])
def test_secure_aggregation_is_refused_where_the_server_would_need_each_update(keys):
    with pytest.raises(ConfigError, match="secure-aggregation"):
        FedShopConfig(secure_aggregation=True, **keys)


@pytest.mark.slow
def test_the_secure_mean_is_the_plain_weighted_mean_and_the_server_receives_no_update(tiny_run, tiny_base, tmp_path):
    """The same tiny run as the session's plain one (same seed, data and merchants' training) with SecAgg+: after
    round 1 the global adapter equals the plain run's within SecAgg+'s quantisation error, while the server received
    no tensor from any merchant (only masked bytes), and the ledger is the plain run's."""
    run = tmp_path / "secure"
    done = simulate(run, f"base-dir={tiny_base.base_dir}", "secure-aggregation=true")
    assert done.returncode == 0, done.stderr[-3000:]

    trains = [r for r in RunDirectory(run).read_metrics() if r["scope"] == "train"]
    assert len(trains) == 2
    for record in trains:
        assert record["metrics"]["secure-arrays-received"] == 0  # no merchant's tensor reached the server
        assert record["metrics"]["secure-bytes-received"] > 0  # the masked vectors did
        assert sorted(record["merchants"]) == ["m0", "m1", "m2"] and record["failed"] == [] == record["rejected"]

    # SecAgg+ encodes n_i / max-weight times each update in QUANTISATION levels over +-CLIPPING_RANGE (stochastic
    # rounding: under one level each) and unmasks the weighted mean: one level per merchant over the sum of the
    # weights bounds the error
    weights = [m["num-examples"] / 100_000.0 for m in trains[0]["merchants"].values()]
    step = load_config(run / "config.toml").server_learning_rate  # the server moves step x the mean update
    bound = step * len(weights) * (2 * CLIPPING_RANGE / QUANTISATION) / sum(weights) + 1e-6  # + float32 storage
    plain, secure = read_adapter(tiny_run.path, "checkpoints/round-1"), read_adapter(run, "checkpoints/round-1")
    start = read_adapter(tiny_run.path, "checkpoints/round-0")
    assert plain.keys() == secure.keys()
    error = max(float((secure[k] - plain[k]).abs().max()) for k in plain)
    moved = max(float((plain[k] - start[k]).abs().max()) for k in plain)
    assert error <= bound, (error, bound)
    assert moved > 20 * bound, (moved, bound)  # the round moved the adapter far beyond the tolerance

    def ledger(path):
        rows = read_privacy(path / "privacy.csv")
        return sorted((r["round"], r["merchant"], r["status"], r["epsilon"]) for r in rows)

    assert ledger(run) == ledger(tiny_run.path)
    assert "secure aggregation (SecAgg+" in (run / "report.md").read_text()


@pytest.mark.slow
def test_deployed_merchants_send_their_updates_only_masked(tmp_path, tiny_base):
    """The deployment engine (a SuperLink and 3 SuperNodes on 127.0.0.1): every message a merchant sends in a train
    round carries no tensor, only SecAgg+'s records (the masked vector as bytes) beside its scalar metrics."""
    from test_deploy import _deploy

    run_dir, outbox = tmp_path / "run", tmp_path / "outbox.jsonl"
    log = tmp_path / "deploy.log"
    code = _deploy(["--config", str(ROOT / "configs/tiny.toml"), "--merchants", "3", "--set",
                    f"base-dir={tiny_base.base_dir}", "--set", "secure-aggregation=true", "--run-dir", str(run_dir),
                    # one merchant evaluates per round: evaluation is test_deploy's, and each message here is a process
                    "--set", "fraction-evaluate=0.34", "--node-config", f"message-log={outbox}"], log, timeout_s=600)
    assert code == 0, log.read_text()[-4000:]
    sent = [json.loads(line) for line in outbox.read_text().splitlines()]
    train = [m for m in sent if m["message-type"] == "train"]
    assert len(train) == 4 * 3 * 2  # four SecAgg+ stages x 3 merchants x 2 rounds
    for message in train:
        assert not message["error"]
        assert all(record == {} for record in message["arrays"].values())  # no tensor leaves a merchant
        assert "secaggplus_configs" in message["configs"]
        assert all(kind in ("int", "float") for kind in message["metrics"].get("metrics", {}).values())
    with_metrics = [m for m in train if "metrics" in m["metrics"]]
    assert len(with_metrics) == 3 * 2  # the masked-vector stage, once per merchant and round
    assert all(m["configs"]["secaggplus_configs"]["masked_params"] == "list" for m in with_metrics)
    trains = [r for r in RunDirectory(run_dir).read_metrics() if r["scope"] == "train"]
    assert [r["metrics"]["secure-arrays-received"] for r in trains] == [0, 0]
    assert {r["status"] for r in read_privacy(run_dir / "privacy.csv")} == {"trained"}


@pytest.mark.slow
def test_a_merchant_that_drops_out_mid_protocol_is_unmasked_around(tmp_path, tiny_base):
    """m1 raises in round 1 after training, inside SecAgg+'s masked-vector stage: the others' pairwise masks with it
    are removed from their shares, the round aggregates m0 and m2, m1 is recorded as failed, and round 2 has all."""
    run = tmp_path / "run"
    done = simulate(run, f"base-dir={tiny_base.base_dir}", "secure-aggregation=true", "fault-injection=raise@m1:1")
    assert done.returncode == 0, done.stderr[-3000:]
    trains = [r for r in RunDirectory(run).read_metrics() if r["scope"] == "train"]
    assert [r["metrics"]["merchants-aggregated"] for r in trains] == [2, 3]
    assert [f["merchant"] for f in trains[0]["failed"]] == ["m1"] and trains[1]["failed"] == []
    assert [r["metrics"]["secure-arrays-received"] for r in trains] == [0, 0]
    rows = {(r["merchant"], r["round"]): r["status"] for r in read_privacy(run / "privacy.csv")}
    assert rows[("m1", "1")] == "failed" and rows[("m0", "1")] == rows[("m2", "1")] == "trained"
