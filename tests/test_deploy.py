"""fedshop on Flower's deployment engine (`fedshop deploy`): a SuperLink and one SuperNode per merchant on 127.0.0.1.

The slow tests start real Flower processes; each stops every process it started by PID, also when it fails.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from client.state import load_own_state
from server.processes import Processes, alive, descendants, start_time
from shared.privacy import epsilon_of
from shared.wide import WIDE_KEY

ROOT = Path(__file__).resolve().parents[1]
TRAIN_METRICS = {"num-examples", "train-loss", "epsilon", "delta", "noise-multiplier", "sample-rate", "steps",
                 "declined", "partition-id", "train-seconds", "message-seconds"}
# a killed SuperNode can rejoin under its key once the SuperLink marked it offline: two heartbeat intervals of 30 s
# after its last heartbeat (flwr's HEARTBEAT_PATIENCE x HEARTBEAT_DEFAULT_INTERVAL), so within 60 s of the kill
OFFLINE_BY_S = 120
EVALUATE_METRIC = re.compile(r"^(num-examples|partition-id|(intent|next|churn|price)-[a-z0-9@.\-]+)$")


def _node_status(run_dir: Path, merchant: str) -> str | None:
    """The SuperLink's status of `merchant`'s node, asked through the running deployment's own FLWR_HOME."""
    from server.deploy import Deployment

    deploy = run_dir / ".deploy"
    node = next(int(n) for n, name in json.loads((deploy / "merchant-nodes.json").read_text()).items()
                if name == merchant)
    return next((n.get("status") for n in Deployment(deploy).listed_nodes() if int(n["node-id"]) == node), None)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _deploy(args: list[str], log: Path, timeout_s: float, interrupt=None) -> int:
    """`fedshop deploy ARGS` as a user runs it; returns its exit code (-1: still running after `timeout_s`).

    `interrupt(process)` is called every second while it runs; when it returns a signal, that signal is sent once
    (a user's Ctrl-C). On a timeout or a failing test, SIGTERM (which the command turns into stopping everything it
    started), then SIGKILL by PID whatever of its tree is still running."""
    with log.open("w") as out:
        # SIGINT back to its default first: a suite started in the background (`make test &`) ignores it, the
        # ignoring is inherited, and Python then leaves it ignored, so the Ctrl-C test's signal would do nothing
        process = subprocess.Popen([sys.executable, "-m", "server.cli", "deploy", *args], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tree: dict[int, int | None] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline:
            tree.update({pid: start_time(pid) for pid in descendants(process.pid)})
            sent = interrupt(process) if interrupt is not None else None
            if sent is not None:
                process.send_signal(sent)
                interrupt = None
            time.sleep(1.0)
        return process.returncode if process.poll() is not None else -1
    finally:
        if process.poll() is None:
            tree.update({pid: start_time(pid) for pid in descendants(process.pid)})
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid, started in tree.items():
            if alive(pid, started):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# --- fast: the parts, without Flower processes --------------------------------------------------------------------
def test_identity_comes_from_the_authenticated_node_not_the_reported_partition(tmp_path, server_identity, caplog):
    from flwr.app import Message, MetricRecord, RecordDict

    from server.identity import merchant_names, merchant_of
    from shared.config import FedShopConfig

    nodes = tmp_path / "merchant-nodes.json"
    nodes.write_text(json.dumps({"11": "m2", "12": "m0"}))
    names = merchant_names(FedShopConfig(merchant_nodes=str(nodes)))
    request = Message(content=RecordDict(), dst_node_id=11, message_type="train")
    reply = Message(content=RecordDict({"metrics": MetricRecord({"partition-id": 0})}), reply_to=request)

    assert merchant_of(reply, names) == "m2"  # node 11 was registered as m2, whatever it reports
    assert "registered as m2 but reports partition m0" in caplog.text
    assert merchant_of(reply, None) == "m0"  # simulation: the reported partition
    assert merchant_names(FedShopConfig()) is None


def test_a_merchant_keeps_its_own_state_and_budget(tmp_path, tiny_config):
    from client.merchant import within_own_budget
    from client.state import load_own_state, save_own_state
    from shared.dptrain import PrivacyState
    from shared.errors import UserError

    path = tmp_path / "m1" / "privacy-state.json"
    assert load_own_state(path, "m1", "rdp").history == []  # a new merchant starts from nothing
    save_own_state(path, "m1", PrivacyState(0.55, [(0.55, 0.02, 49)]), "rdp")
    assert load_own_state(path, "m1", "rdp") == PrivacyState(0.55, [(0.55, 0.02, 49)])
    with pytest.raises(UserError, match="privacy state of m1"):
        load_own_state(path, "m2", "rdp")
    path.write_text('{"merchant": "m1", "noise-multiplier": 0.5', encoding="utf-8")  # cut short by a crash
    with pytest.raises(UserError, match="unreadable or corrupted .*expected a merchant privacy state"):
        load_own_state(path, "m1", "rdp")

    generous = tiny_config.replace(target_epsilon=50.0)
    assert within_own_budget(generous, {"target-epsilon": 4}).target_epsilon == 4.0  # the merchant's cap wins
    assert within_own_budget(tiny_config.replace(target_epsilon=2.0), {"target-epsilon": 4}).target_epsilon == 2.0
    assert within_own_budget(generous, {}).target_epsilon == 50.0
    with pytest.raises(UserError, match="only with DP-SGD"):
        within_own_budget(tiny_config.replace(dp=False), {"target-epsilon": 4})


def test_authentication_without_tls_is_refused_before_any_work(tmp_path):
    from server.cli import main

    assert main(["deploy", "--merchants", "3", "--auth", "--run-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()


def test_processes_stop_a_whole_tree_by_pid(tmp_path):
    processes = Processes({"PATH": "/usr/bin:/bin"}, tmp_path)
    try:
        # a child in a session of its own that outlives its parent's group, as Flower's superexec does
        processes.start("tree", ["bash", "-c", "setsid sleep 300 & sleep 300"])
        time.sleep(0.5)
        processes.stop_all(grace_s=2.0)
    finally:
        left = processes.left_running()
    assert len(processes.seen) >= 3 and left == []


# --- slow: real SuperLink and SuperNodes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def deployed(tmp_path_factory, tiny_base):
    """configs/tiny.toml (3 merchants x 2 rounds) deployed with TLS and SuperNode authentication."""
    run_dir = tmp_path_factory.mktemp("deploy") / "run"
    log = run_dir.parent / "deploy.log"
    started = time.perf_counter()
    code = _deploy(["--config", str(ROOT / "configs/tiny.toml"), "--merchants", "3", "--tls", "--auth",
                    "--set", f"base-dir={tiny_base.base_dir}", "--run-dir", str(run_dir),
                    "--node-config", f"message-log={run_dir.parent / 'outbox.jsonl'}"], log, timeout_s=420)
    return run_dir, code, log.read_text(), time.perf_counter() - started


@pytest.mark.slow
def test_deploy_writes_the_run_directory_of_a_simulation_and_composes_epsilon(deployed):
    run_dir, code, output, _ = deployed
    assert code == 0, output[-4000:]
    shown = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    assert shown == ["adapter", "checkpoints", "config.toml", "metrics.jsonl", "metrics.png", "plan.json",
                     "price_curve.png", "privacy.csv", "report.md"]  # what `simulate` writes (test_end_to_end)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["scope"]) for r in records] == [
        (0, "evaluate"), (1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]
    assert re.search(r"fedshop round 2/2 \| train loss .* \| eps max", output)  # the ServerApp's progress, streamed

    # the ledger names merchants by the node id the SuperLink authenticated (their registered keys)
    nodes = json.loads((run_dir / ".deploy" / "merchant-nodes.json").read_text())
    assert sorted(nodes.values()) == ["m0", "m1", "m2"]
    rows = list(csv.DictReader((run_dir / "privacy.csv").open()))
    assert len(rows) == 6 and {r["status"] for r in rows} == {"trained"}
    for merchant in ("m0", "m1", "m2"):
        epsilons = [float(r["epsilon"]) for r in rows if r["merchant"] == merchant]
        assert 0 < epsilons[0] < epsilons[1] <= 8.0  # composed although every message ran in a fresh process
        # the merchant's own record holds both rounds' steps (Opacus merges runs of equal noise and rate)
        own = load_own_state(run_dir / ".deploy" / "state" / merchant / "privacy-state.json", merchant, "rdp")
        assert sum(s for _, _, s in own.history) == sum(int(r["steps"]) for r in rows if r["merchant"] == merchant)
        assert math.isclose(epsilon_of(own.history, 1e-5, "rdp"), epsilons[1], rel_tol=1e-9)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    pids = json.loads((run_dir / ".deploy" / "pids.json").read_text())
    assert len(pids["seen"]) >= 8 and pids["left-running"] == []  # SuperLink, 3 SuperNodes, their superexecs, ...
    assert not any(alive(pid) for pid in pids["seen"])
    timing = json.loads((run_dir / ".deploy" / "timing.json").read_text())
    print(f"\ndeploy timing: {timing}")


@pytest.mark.slow
def test_every_message_a_merchant_sends_carries_only_adapter_tensors_and_scalar_metrics(deployed):
    run_dir, code, output, _ = deployed
    assert code == 0, output[-4000:]
    sent = [json.loads(line) for line in (run_dir.parent / "outbox.jsonl").read_text().splitlines()]
    assert {m["merchant"] for m in sent} == {"m0", "m1", "m2"}
    assert sorted(m["message-type"] for m in sent).count("train") == 6  # 3 merchants x 2 rounds
    assert len(sent) == 6 + 9  # and 3 evaluations each (before training and after each round)
    for message in sent:
        # a train reply names what its epsilon is about (unit, accountant: strings of the config, not of data)
        named = {"privacy": {"accountant": "str", "unit": "str"}} if message["message-type"] == "train" else {}
        assert not message["error"] and message["configs"] == named, message["configs"]
        assert set(message["metrics"]) == {"metrics"}
        metrics = message["metrics"]["metrics"]
        assert set(metrics.values()) <= {"int", "float"}  # scalars only: no list, string or bytes
        if message["message-type"] == "train":
            assert set(metrics) == TRAIN_METRICS
            assert set(message["arrays"]) == {"arrays"}
            # with aggregation = ffa only the LoRA B matrices travel, with the adapter's shapes, and (configs/tiny.toml
            # has wide = true) the wide part's per-token weights
            arrays = dict(message["arrays"]["arrays"])
            assert arrays.pop(WIDE_KEY)["dtype"] == "float32"
            assert arrays and all(re.fullmatch(r"base_model\.model\..+\.lora_B\.weight", k) and
                                  v["dtype"] == "float32" for k, v in arrays.items())
        else:
            assert message["arrays"] == {} and all(EVALUATE_METRIC.match(k) for k in metrics), metrics


@pytest.mark.slow
def test_a_restarted_merchant_keeps_its_spent_budget_whatever_the_server_says(deployed, tiny_base):
    """Every SuperNode is stopped after round 2 and started afresh; the server then continues the run from a ledger
    that forgot every row, and asks for a budget of 50. Each merchant composes on its own state and declines."""
    run_dir, code, output, _ = deployed
    assert code == 0, output[-4000:]
    forged = run_dir.parent / "forgetful-server"
    subprocess.run(["cp", "-r", str(run_dir), str(forged)], check=True)
    ledger = (forged / "privacy.csv").read_text().splitlines()
    (forged / "privacy.csv").write_text(ledger[0] + "\n")  # a server that lost (or hides) what merchants spent
    again = run_dir.parent / "continued"
    log = run_dir.parent / "continued.log"
    code = _deploy(["--config", str(ROOT / "configs/tiny.toml"), "--merchants", "3", "--set",
                    f"base-dir={tiny_base.base_dir}", "--set", f"resume-from={forged}", "--set", "num-rounds=1",
                    "--set", "target-epsilon=50", "--node-config", "target-epsilon=8",
                    "--set", "fraction-evaluate=0.34",  # one merchant evaluates per round: the ledger is what counts
                    "--state-dir", str(run_dir / ".deploy" / "state"), "--run-dir", str(again), "--no-progress"],
                   log, timeout_s=300)
    assert code == 0, log.read_text()[-4000:]

    before = {r["merchant"]: float(r["epsilon"]) for r in csv.DictReader((run_dir / "privacy.csv").open())
              if r["round"] == "2"}
    rows = list(csv.DictReader((again / "privacy.csv").open()))
    print("\nledger after the restart:\n" + (again / "privacy.csv").read_text())
    assert {r["merchant"] for r in rows} == {"m0", "m1", "m2"}
    for row in rows:
        assert row["status"] == "declined" and int(row["steps"]) == 0
        assert math.isclose(float(row["epsilon"]), before[row["merchant"]], rel_tol=1e-9)  # spent, kept
    assert json.loads((again / ".deploy" / "pids.json").read_text())["left-running"] == []


@pytest.mark.slow
def test_only_registered_supernodes_join_a_tls_superlink(tmp_path):
    from server.deploy import Deployment
    from server.keys import make_node_key

    deployment = Deployment(tmp_path / ".deploy", tls=True, auth=True)
    try:
        deployment.start_superlink()
        registered = deployment.register("m0")
        stranger, _ = make_node_key(tmp_path / "stranger-keys", "stranger")  # never registered
        deployment.start_supernode("m0", {"partition-id": 0, "merchant": "m0"}, registered)
        deployment.start_supernode("stranger", {"partition-id": 1, "merchant": "m1"}, stranger)
        deployment.wait_online(1, timeout_s=90)
        superlink_log = tmp_path / ".deploy" / "logs" / "superlink.log"
        deadline = time.monotonic() + 60
        while "No SuperNode found with the given public key" not in superlink_log.read_text():
            assert time.monotonic() < deadline, "the stranger's attempt never reached the SuperLink"
            time.sleep(1.0)
        online = deployment.online_nodes()
    finally:
        left = deployment.close()
    assert [int(n["node-id"]) for n in online] == [deployment.nodes["m0"]]  # the registered merchant only
    refusal = next(line for line in superlink_log.read_text().splitlines() if "No SuperNode found" in line)
    print(f"\nrefusal: {refusal}")
    assert "https://127.0.0.1" in superlink_log.read_text()  # served over TLS
    assert left == []


@pytest.mark.slow
def test_ctrl_c_during_the_run_stops_every_process_it_started(tmp_path, tiny_base):
    run_dir = tmp_path / "run"
    seen: dict[int, int | None] = {}

    def ctrl_c_once_merchants_work(process):
        tree = descendants(process.pid)
        seen.update({pid: start_time(pid) for pid in tree})
        # the first messages are out: ClientApp processes run under the SuperNodes
        return signal.SIGINT if any("flwr-clientapp" in _cmdline(pid) for pid in tree) else None

    code = _deploy(["--config", str(ROOT / "configs/tiny.toml"), "--merchants", "3", "--set",
                    f"base-dir={tiny_base.base_dir}", "--run-dir", str(run_dir), "--no-progress"],
                   tmp_path / "deploy.log", timeout_s=240, interrupt=ctrl_c_once_merchants_work)

    output = (tmp_path / "deploy.log").read_text()
    assert code == 130 and "interrupted" in output, output[-3000:]
    pids = json.loads((run_dir / ".deploy" / "pids.json").read_text())
    assert pids["left-running"] == [] and len(pids["seen"]) >= 8
    assert [pid for pid, started in seen.items() if alive(pid, started)] == []  # nothing of its tree outlived it


def test_absolute_paths_resolves_each_of_several_item_property_files(tmp_path, monkeypatch):
    """item-properties-path is comma-separated: each file is made absolute, not the whole string as one path."""
    from server.deploy import absolute_paths
    from shared.config import FedShopConfig

    monkeypatch.chdir(tmp_path)
    config = absolute_paths(FedShopConfig(data_path="events.csv", data_format="retailrocket",
                                          item_properties_path="props1.csv, data/props2.csv"))
    assert config.item_properties_path == f"{tmp_path / 'props1.csv'},{tmp_path / 'data' / 'props2.csv'}"
    assert config.data_path == str(tmp_path / "events.csv") and config.run_dir == str(tmp_path / "runs" / "latest")


def test_absolute_paths_resolves_the_world_cache_folder_with_its_environment_override(tmp_path, monkeypatch):
    """ClientApps run in other working directories: world-cache-dir arrives absolute, FEDSHOP_WORLD_CACHE_DIR (which
    replaces the default only) and ~ already resolved."""
    from server.deploy import absolute_paths
    from shared.config import FedShopConfig

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FEDSHOP_WORLD_CACHE_DIR", "from-environment")
    assert absolute_paths(FedShopConfig()).world_cache_dir == str(tmp_path / "from-environment")
    assert absolute_paths(FedShopConfig(world_cache_dir="worlds")).world_cache_dir == str(tmp_path / "worlds")
    assert absolute_paths(FedShopConfig(world_cache_dir="")).world_cache_dir == ""
    monkeypatch.setenv("FEDSHOP_WORLD_CACHE_DIR", "")
    assert absolute_paths(FedShopConfig()).world_cache_dir == ""
    monkeypatch.delenv("FEDSHOP_WORLD_CACHE_DIR")
    assert absolute_paths(FedShopConfig()).world_cache_dir == str(Path.home() / ".cache" / "fedshop" / "worlds")


@pytest.mark.slow
def test_a_supernode_killed_and_restarted_mid_run_keeps_its_spent_budget(tmp_path, tiny_base):
    """3 merchants x 3 rounds with TLS and authentication. Once round 1 is aggregated, m1's SuperNode is killed (its
    whole process tree, SIGKILL), and started again with the same command (its key, its state directory) once the
    SuperLink lists it offline (asked every few seconds, not a fixed wait: it saves the test up to a minute). m1 trains
    again later in the run, and its epsilon there composes on what it spent before the kill: its own state holds
    every trained round's steps."""
    run_dir = tmp_path / "run"
    restarted: dict = {}

    def kill_then_restart_m1(process):
        if "killed" not in restarted:
            metrics = run_dir / "metrics.jsonl"
            if not metrics.is_file() or '"scope": "train"' not in metrics.read_text():
                return None
            node = next((pid for pid in descendants(process.pid) if "flower-supernode" in _cmdline(pid)
                         and 'merchant="m1"' in _cmdline(pid)), None)
            if node is None:
                return None
            restarted["argv"] = Path(f"/proc/{node}/cmdline").read_bytes().decode().split("\0")[:-1]
            environ = Path(f"/proc/{node}/environ").read_bytes().decode(errors="replace").split("\0")
            restarted["env"] = dict(e.split("=", 1) for e in environ if "=" in e)
            tree = [node, *descendants(node)]
            for pid in tree:
                os.kill(pid, signal.SIGKILL)
            restarted.update(killed=time.monotonic(), old=tree)
        elif "process" not in restarted and time.monotonic() > restarted.get("asked", 0.0) + 3.0:
            restarted["asked"] = time.monotonic()
            if _node_status(run_dir, "m1") != "offline":
                assert time.monotonic() - restarted["killed"] < OFFLINE_BY_S, "m1 was never listed offline"
                return None
            restarted["offline-after"] = time.monotonic() - restarted["killed"]
            with (tmp_path / "m1-again.log").open("w") as out:
                restarted["process"] = subprocess.Popen(restarted["argv"], env=restarted["env"], stdout=out,
                                                        stderr=subprocess.STDOUT, start_new_session=True)
        return None

    try:
        code = _deploy(["--config", str(ROOT / "configs/tiny.toml"), "--merchants", "3", "--tls", "--auth",
                        "--set", f"base-dir={tiny_base.base_dir}", "--set", "num-rounds=3", "--run-dir",
                        str(run_dir), "--no-progress"], tmp_path / "deploy.log", timeout_s=600,
                       interrupt=kill_then_restart_m1)
    finally:
        again = restarted.get("process")
        if again is not None:
            for pid in [again.pid, *descendants(again.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            again.wait()
    assert code == 0, (tmp_path / "deploy.log").read_text()[-4000:]
    assert "process" in restarted and not any(alive(pid) for pid in restarted["old"])
    print(f"\nm1 listed offline {restarted['offline-after']:.0f} s after the kill")

    rows = [r for r in csv.DictReader((run_dir / "privacy.csv").open()) if r["merchant"] == "m1"]
    print("\nm1's ledger rows:\n" + "\n".join(str(r) for r in rows))
    trained = [r for r in rows if r["status"] == "trained"]
    assert trained[0]["round"] == "1" and int(trained[-1]["round"]) >= 2  # trained again after the restart
    own = load_own_state(run_dir / ".deploy" / "state" / "m1" / "privacy-state.json", "m1", "rdp")
    assert sum(s for _, _, s in own.history) == sum(int(r["steps"]) for r in trained)  # every trained round, kept
    assert math.isclose(float(trained[-1]["epsilon"]), epsilon_of(own.history, 1e-5, "rdp"), rel_tol=1e-9)
    assert float(trained[-1]["epsilon"]) > float(trained[0]["epsilon"])  # composed on, not a fresh budget
