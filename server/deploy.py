"""`fedshop deploy`: the same run on Flower's deployment engine, on 127.0.0.1.

One `flower-superlink` and one `flower-supernode` per merchant, each a process of its own on an explicit free port;
each SuperNode is told by `--node-config` which merchant it is, where its privacy state lives (`state-dir`) and,
with `data-path`, where its data is. The run is submitted with Flower's own CLI (`flwr run APP CONNECTION --stream`)
against that SuperLink, from the same kind of app directory `simulate` writes (the resolved config as the app's
`[tool.flwr.app.config]`), so the ServerApp writes the same run directory.

With `tls`, the SuperLink serves TLS with a certificate of a throwaway CA (server/keys.py) that the SuperNodes and
`flwr` trust. With `auth`, the SuperLink admits only SuperNodes whose public key was registered
(`--enable-supernode-auth`, `flwr supernode register`): each merchant's key is registered under its merchant name,
and the node ids the SuperLink answers with are the ledger's merchant identities (`merchant-nodes`, server/identity.py).

Everything deploy-specific lands in RUN_DIR/.deploy/: flwr-home/ (FLWR_HOME, never the user's), logs/, keys/,
state/<merchant>/ (the merchants' own privacy state), timing.json and pids.json (every process seen, all stopped).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from server.keys import make_node_key, make_tls
from server.processes import Processes, free_port, start_time, wait_for_port
from server.simulation import write_app_dir
from shared.config import FedShopConfig
from shared.data import merchant_id_for_partition
from shared.errors import UserError
from shared.files import write_text_atomic
from shared.worldcache import cache_dir

log = logging.getLogger("fedshop")
HOST = "127.0.0.1"
CONNECTION = "fedshop"
ROOT = Path(__file__).resolve().parents[1]  # the fedshop checkout whose code every process must import
BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr of this environment


@dataclass
class Deployment:
    """A SuperLink and its SuperNodes on this machine; `close()` stops every process it started."""

    work: Path
    tls: bool = False
    auth: bool = False
    port: int = 0
    ca: Path | None = None
    nodes: dict[str, int] = field(default_factory=dict)  # merchant -> node id the SuperLink registered
    processes: Processes | None = None

    @property
    def flwr_home(self) -> Path:
        return self.work / "flwr-home"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env["PATH"] = os.pathsep.join((str(BIN), env.get("PATH", "")))  # the SuperNode spawns flower-superexec
        env["FLWR_HOME"] = str(self.flwr_home)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"  # never `uv sync` the app (a CUDA torch)
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.processes = Processes(self.environment(), self.work / "logs")
        self.port = free_port()
        argv = [str(BIN / "flower-superlink"), "--host", HOST, "--port", str(self.port),
                "--disable-runtime-dependency-installation"]
        if self.tls:
            self.ca, cert, key = make_tls(self.work / "tls", HOST)
            argv += ["--ssl-ca-certfile", str(self.ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
        else:
            argv.append("--insecure")
        if self.auth:
            argv.append("--enable-supernode-auth")
        wait_for_port(self.port, self.processes.start("superlink", argv), timeout_s)
        connection = f'address = "{HOST}:{self.port}"\n' + (
            f'root-certificates = "{self.ca}"\n' if self.tls else "insecure = true\n")
        write_text_atomic(self.flwr_home / "config.toml",
                          f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n{connection}')

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """The `flwr` CLI against this SuperLink (its connection is the default in this FLWR_HOME)."""
        return subprocess.run([str(BIN / "flwr"), *args], env=self.environment(), capture_output=True, text=True,
                              timeout=timeout_s, stdin=subprocess.DEVNULL)

    def register(self, merchant: str) -> Path:
        """A key pair for `merchant`, its public half registered with the SuperLink; returns the private key."""
        private, public = make_node_key(self.work / "keys", merchant)
        done = self.flwr("supernode", "register", str(public), CONNECTION, "--name", merchant, "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register {merchant} failed: {done.stdout}{done.stderr}")
        self.nodes[merchant] = int(json.loads(done.stdout)["node-id"])
        return private

    def start_supernode(self, name: str, node_config: dict[str, str | int], private_key: Path | None = None
                        ) -> subprocess.Popen:
        assert self.processes is not None, "start the SuperLink first"
        config = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in node_config.items())
        argv = [str(BIN / "flower-supernode"), "--superlink", f"{HOST}:{self.port}", "--host", HOST,
                "--port", str(free_port()), "--node-config", config]
        argv += ["--root-certificates", str(self.ca)] if self.tls else ["--insecure"]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        return self.processes.start(name, argv)

    def listed_nodes(self) -> list[dict]:
        """Every node the SuperLink lists (`flwr supernode list`: node-id, status, ...); [] when it does not answer."""
        done = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        if done.returncode != 0:
            return []
        return json.loads(done.stdout).get("nodes", [])

    def online_nodes(self) -> list[dict]:
        return [n for n in self.listed_nodes() if n.get("status") == "online"]

    def wait_online(self, count: int, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.online_nodes()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout_s:.0f} s; see "
                                   f"{self.work / 'logs'}")
            time.sleep(1.0)

    def close(self) -> list[int]:
        """Stop every process started (by PID, trees included); returns those still running (none, normally)."""
        if self.processes is None:
            return []
        self.processes.stop_all()
        left = self.processes.left_running()
        write_text_atomic(self.work / "pids.json", json.dumps(
            {"seen": sorted(self.processes.seen), "left-running": left}, indent=1))
        return left


def merchant_node_config(config: FedShopConfig, partition: int, state_root: Path) -> dict[str, str | int]:
    merchant = merchant_id_for_partition(partition)
    node_config: dict[str, str | int] = {"partition-id": partition, "num-partitions": config.num_merchants,
                                         "merchant": merchant, "state-dir": str(state_root / merchant)}
    if config.data_path:
        node_config["data-path"] = config.data_path
    return node_config


def check_options(*, tls: bool, auth: bool) -> None:
    if auth and not tls:  # flower-superlink exits with code 104 otherwise
        raise UserError("--auth needs --tls: Flower's SuperNode authentication runs over TLS only")


def _raise_on_signal(signum: int, _frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_deployment(config: FedShopConfig, merchants: int, *, tls: bool = False, auth: bool = False,
                   state_root: Path | None = None, extra_node_config: dict[str, str] | None = None) -> dict:
    """One federated run on a local deployment; returns the timing. Every process is stopped before it returns,
    also on an exception, Ctrl-C or SIGTERM."""
    check_options(tls=tls, auth=auth)
    run_dir = Path(config.run_dir)
    work = run_dir / ".deploy"
    state_root = state_root or work / "state"
    deployment = Deployment(work, tls=tls, auth=auth)
    # Ctrl-C raises KeyboardInterrupt already; SIGTERM and SIGHUP do the same here, so `finally` stops everything
    main = threading.current_thread() is threading.main_thread()  # handlers can only be set there
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} if main else {}
    for s in previous:
        if s != signal.SIGINT:
            signal.signal(s, _raise_on_signal)
    started = time.perf_counter()
    timing: dict[str, float] = {}
    try:
        deployment.start_superlink()
        keys = {merchant_id_for_partition(i): deployment.register(merchant_id_for_partition(i)) if auth else None
                for i in range(merchants)}
        if auth:
            nodes_file = work / "merchant-nodes.json"
            write_text_atomic(nodes_file, json.dumps({str(n): m for m, n in deployment.nodes.items()}, indent=1))
            config = config.replace(merchant_nodes=str(nodes_file))
        for i, (merchant, key) in enumerate(keys.items()):
            node_config = {**merchant_node_config(config, i, state_root), **(extra_node_config or {})}
            deployment.start_supernode(merchant, node_config, key)
        deployment.wait_online(merchants)
        timing["startup-seconds"] = time.perf_counter() - started
        log.info("SuperLink on %s:%d%s and %d SuperNodes online in %.1f s", HOST, deployment.port,
                 " (TLS, SuperNode authentication)" if tls and auth else " (TLS)" if tls else
                 " (SuperNode authentication)" if auth else "", merchants, timing["startup-seconds"])
        app_dir = write_app_dir(config, run_dir / ".flwr-app")
        submitted = time.perf_counter()
        _stream_run(deployment, app_dir)
        timing["run-seconds"] = time.perf_counter() - submitted
    finally:
        for s in previous:  # a second Ctrl-C must not cut the stopping short and leave processes behind
            signal.signal(s, signal.SIG_IGN)
        left = deployment.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
        timing["total-seconds"] = time.perf_counter() - started
        if work.is_dir():
            write_text_atomic(work / "timing.json", json.dumps(timing, indent=1))
        if left:
            log.error("processes still running after the deployment: %s", left)
    return timing


def _stream_run(deployment: Deployment, app_dir: Path) -> None:
    """`flwr run APP CONNECTION --stream`, its output passed on line by line; returns when the run ends."""
    assert deployment.processes is not None
    argv = [str(BIN / "flwr"), "run", str(app_dir), CONNECTION, "--stream"]
    process = subprocess.Popen(argv, env=deployment.environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    deployment.processes.started["flwr-run"] = process
    deployment.processes.seen[process.pid] = start_time(process.pid)
    with (deployment.work / "logs" / "flwr-run.log").open("a", encoding="utf-8") as copy:
        assert process.stdout is not None
        for line in process.stdout:
            copy.write(line)
            copy.flush()
            sys.stderr.write(line)
    if process.wait() != 0:
        raise RuntimeError(f"flwr run exited with code {process.returncode}; see {deployment.work / 'logs'}")


def absolute_paths(config: FedShopConfig) -> FedShopConfig:
    """The config with every path made absolute: the ServerApp and ClientApps run in other working directories."""
    keys = ("run_dir", "base_dir", "base_model", "data_path", "resume_from", "init_adapter")
    changes = {k: str(Path(getattr(config, k)).resolve()) for k in keys if getattr(config, k)}
    if config.item_properties_path:  # comma-separated files: each made absolute
        changes["item_properties_path"] = ",".join(str(Path(p.strip()).resolve())
                                                   for p in config.item_properties_path.split(",") if p.strip())
    cache = cache_dir(config.world_cache_dir)  # with FEDSHOP_WORLD_CACHE_DIR and ~ resolved here, once
    changes["world_cache_dir"] = os.path.abspath(cache) if cache is not None else ""
    return config.replace(**changes)
