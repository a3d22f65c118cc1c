"""Several real Ray nodes on this machine, each started by `ray start --block` in its own process group,
the way KubeRay starts one per pod: a head and worker nodes with their own raylet, object store, CPUs,
custom resources and node labels. Losing a node is killing its process group with SIGKILL (a pod
evicted, a spot instance reclaimed): the raylet, its object store and every worker on it go at once.

Contributors: use the `ray_nodes` fixture (tests/cluster/conftest.py) rather than this class directly.

    def test_x(ray_nodes):
        ray_nodes.add_worker("worker-a")        # 2 CPUs, resource worker-a: 1, label medfusion.io/node=worker-a
        env = ray_nodes.driver_env()            # RAY_ADDRESS + token, for a driver process of your own
        driver = ray_nodes.run_driver(["train", "--preset=tiny", ...])   # `medfusion train ...` on it
        driver.wait_line(re.compile(r"epoch 1 step"), "epoch 1 steps", 300)   # its output, as it arrives
        ray_nodes.kill("worker-a")              # SIGKILL to the node's process group
        ray_nodes.wait_for(lambda: ray_nodes.node_state("worker-a") == "DEAD", "worker-a dead", 60)

What fits 2 cores and 24 GiB: the head reserves 0 CPUs (KubeRay's advice for a head that also runs the
GCS and dashboard) and a 100 MiB object store; each worker node 2 logical CPUs and a 200 MiB store.
About 700 MiB of resident memory for a head and two workers, idle. Health checks run every second and
a node is declared dead after 3 missed ones (Ray's defaults are 3 s and 5), so node loss is seen in
seconds; the same settings are in k8s/ (see the README's "Node failures on Kubernetes").

Every node has its own --temp-dir and ports (nothing becomes the machine's default Ray), token
authentication is on as on any local Ray, and stopping the cluster kills exactly the process groups
it started and any process whose command line names one of its temp dirs.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfusion.orchestration.kuberay import GCS_HEALTH_CHECK_ENV
from medfusion.store import free_ports

# Detect a lost node in ~3 s (GCS health checks): the values every head in k8s/ carries.
HEALTH_CHECK_ENV = GCS_HEALTH_CHECK_ENV
NODE_LABEL = "medfusion.io/node"
HEAD_PORT_FLAGS = (
    "--port",
    "--dashboard-port",
    "--ray-client-server-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--metrics-export-port",
    "--runtime-env-agent-port",
    "--node-manager-port",
    "--object-manager-port",
)
WORKER_PORT_FLAGS = HEAD_PORT_FLAGS[3:]


def processes_naming(marker: str) -> list[int]:
    """Pids whose command line names `marker` (one of our nodes' unique temp dirs)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen
    temp_dir: str
    log_path: str
    labels: dict[str, str] = field(default_factory=dict)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the node's process group and every process naming its temp dir (the raylet, its
        object store and workers; the GCS and dashboard too when this is the head)."""
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass
        for pid in processes_naming(self.temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def raylet_log_tail(self, chars: int = 2000) -> str:
        """The end of the node's raylet.out (why a raylet did not register), or "" when it has none."""
        for path in sorted(Path(self.temp_dir).glob("session_*/logs/raylet.out")):
            try:
                return f"raylet.out:\n{path.read_text(errors='replace')[-chars:]}"
            except OSError:
                pass
        return ""


@dataclass
class Driver:
    """A `medfusion` command in a subprocess; its output lines, each with the time.monotonic() it
    arrived, also written to `log_path` as they arrive (to follow a long test with tail -f)."""

    process: subprocess.Popen
    log_path: str = ""
    lines: list[tuple[float, str]] = field(default_factory=list)
    _new: queue.Queue = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        log = open(self.log_path, "a") if self.log_path else None  # noqa: SIM115 - closed below
        for line in self.process.stdout:
            entry = (time.monotonic(), line.rstrip("\n"))
            self.lines.append(entry)
            self._new.put(entry)
            if log is not None:
                log.write(line)
                log.flush()
        self._new.put(None)
        if log is not None:
            log.close()

    def wait_line(self, pattern: re.Pattern, what: str, timeout_s: float, after: float = 0.0) -> tuple[float, re.Match]:
        """The first line (arrived after `after`) matching `pattern`, or fail naming `what` with the output tail."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while True:
            for stamp, line in self.lines[seen:]:
                seen += 1
                match = pattern.search(line)
                if match and stamp > after:
                    return stamp, match
            if self.process.poll() is not None and self._drained():
                raise AssertionError(f"{what}: the driver exited ({self.process.returncode}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout_s:.0f} s:\n{self.tail()}")
            try:
                self._new.get(timeout=0.5)
            except queue.Empty:
                pass

    def _drained(self) -> bool:
        time.sleep(0.5)
        return self._new.empty()

    def tail(self, n: int = 60) -> str:
        return "\n".join(line for _, line in self.lines[-n:])

    def finish(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"the driver did not end within {timeout_s:.0f} s (a hang):\n{self.tail()}") from None


class RayNodes:
    """A head and worker nodes on loopback; see the module docstring."""

    def __init__(
        self,
        *,
        head_env: dict[str, str] | None = None,
        head_cpus: int = 0,
        head_resources: dict[str, float] | None = None,
    ) -> None:
        self.token = uuid.uuid4().hex
        self.nodes: dict[str, RayNode] = {}
        self.ports = dict(zip(HEAD_PORT_FLAGS, free_ports(len(HEAD_PORT_FLAGS))))
        self.head_env = dict(head_env or {})
        self.head_cpus = head_cpus
        self.head_resources = dict(head_resources or {})

    # ----------------------------------------------------------------------------------- addresses

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.ports['--port']}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['--dashboard-port']}"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a node or a driver: token auth, this venv's bin on PATH, CPU DeepSpeed."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            DS_ACCELERATOR="cpu",
            RAY_DEDUP_LOGS="0",
            RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            **HEALTH_CHECK_ENV,
        )
        env.update(extra or {})
        return env

    def driver_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a driver process (e.g. `medfusion train`) attached to this cluster."""
        return self.env({"RAY_ADDRESS": self.gcs_address, **(extra or {})})

    # ------------------------------------------------------------------------------------ lifecycle

    def _start(self, name: str, args: list[str], env: dict[str, str], labels: dict[str, str]) -> RayNode:
        temp_dir = tempfile.mkdtemp(prefix=f"mf{name[:6]}", dir="/tmp")  # short: socket path length limit
        log_path = os.path.join(temp_dir, "node.log")
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            f"--labels={json.dumps(labels)}",
            *args,
        ]
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        node = RayNode(name=name, process=process, temp_dir=temp_dir, log_path=log_path, labels=labels)
        self.nodes[name] = node
        return node

    def start_head(self, timeout_s: float = 120) -> RayNode:
        """The head: GCS, dashboard (the State API), 0 CPUs and a 100 MiB object store."""
        node = self._start(
            "head",
            [
                "--head",
                f"--num-cpus={self.head_cpus}",
                *([f"--resources={json.dumps(self.head_resources)}"] if self.head_resources else []),
                f"--object-store-memory={100 * 2**20}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                *[f"{flag}={port}" for flag, port in self.ports.items()],
            ],
            self.env(self.head_env),
            {NODE_LABEL: "head"},
        )
        self.wait_for(lambda: self._dashboard_up(node), "the head's dashboard answers", timeout_s, node)
        return node

    def add_worker(
        self,
        name: str,
        *,
        cpus: int = 2,
        resources: dict[str, float] | None = None,
        timeout_s: float = 90,
        attempts: int = 3,
    ) -> RayNode:
        """A worker node with `cpus` CPUs, a resource named after it (1) and the label medfusion.io/node=name.

        `ray start` gives its raylet a fixed 30 s to register with the GCS and exits when it has not
        ("The current node timed out during startup"), which happens on a loaded 2-core machine. The
        worker is then started again, as the kubelet restarts a KubeRay worker pod's container
        (restartPolicy Always), up to `attempts` times; each failed attempt's logs are kept in the
        error if the last one fails too."""
        failures: list[str] = []
        for attempt in range(1, attempts + 1):
            ports = dict(zip(WORKER_PORT_FLAGS, free_ports(len(WORKER_PORT_FLAGS))))
            node = self._start(
                name,
                [
                    f"--address={self.gcs_address}",
                    f"--num-cpus={cpus}",
                    f"--object-store-memory={200 * 2**20}",
                    f"--resources={json.dumps({name: 1, **(resources or {})})}",
                    *[f"{flag}={port}" for flag, port in ports.items()],
                ],
                self.env(),
                {NODE_LABEL: name},
            )
            try:
                self.wait_for(lambda: self.node_state(name) == "ALIVE", f"node {name} joins", timeout_s, node)
                return node
            except RuntimeError as exc:  # the node's `ray start` exited before it joined
                failures.append(f"attempt {attempt}: {exc}\n{node.raylet_log_tail()}")
                node.kill(signal.SIGKILL)
                shutil.rmtree(node.temp_dir, ignore_errors=True)
                print(f"[multinode] {name} did not join (attempt {attempt} of {attempts}); starting it again")
        raise RuntimeError(f"node {name} did not join in {attempts} attempts:\n" + "\n".join(failures))

    def run_driver(self, args: list[str]) -> Driver:
        """`medfusion ARGS` in a subprocess attached to this cluster (a driver on the head's machine);
        its output is read line by line as it arrives."""
        process = subprocess.Popen(
            [sys.executable, "-m", "medfusion.cli", *args],
            env=self.driver_env({"PYTHONUNBUFFERED": "1"}),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        log_path = os.path.join(self.nodes["head"].temp_dir, f"driver-{args[0]}-{process.pid}.log")
        print(f"[multinode] `medfusion {args[0]}` output: {log_path}", flush=True)
        return Driver(process, log_path)

    def kill(self, name: str) -> float:
        """Lose node `name` at once (SIGKILL to its processes); returns the time.monotonic() of the kill."""
        node = self.nodes[name]
        killed_at = time.monotonic()
        node.kill(signal.SIGKILL)
        try:
            node.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return killed_at

    def stop(self) -> None:
        """Stop every node this harness started (workers first), then remove their temp dirs."""
        order = [n for n in self.nodes.values() if n.name != "head"] + [
            n for n in self.nodes.values() if n.name == "head"
        ]
        # SIGTERM lets `ray start --block` stop its children; what is left after 3 s is killed.
        for sig, wait_s in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
            for node in order:
                node.kill(sig)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and any(processes_naming(n.temp_dir) for n in order):
                time.sleep(0.2)
        for node in order:
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    # -------------------------------------------------------------------------------------- state

    def _get(self, path: str, timeout_s: float = 5) -> Any:
        request = urllib.request.Request(
            f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def _dashboard_up(self, head: RayNode) -> bool:
        try:
            self._get("/api/v0/nodes?limit=1")
            return True
        except OSError:
            return False

    def list_nodes(self) -> list[dict[str, Any]]:
        """The State API's nodes (node_id, state ALIVE|DEAD, labels, resources_total, ...)."""
        return self._get("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]

    def list_actors(self, class_name: str = "") -> list[dict[str, Any]]:
        """The State API's actors (class_name, state, node_id, pid), optionally of one class."""
        query = f"&filter_keys=class_name&filter_predicates=%3D&filter_values={class_name}" if class_name else ""
        return self._get(f"/api/v0/actors?limit=1000&detail=true{query}")["data"]["result"]["result"]

    def node_state(self, name: str) -> str:
        """ALIVE or DEAD for the newest node labelled `name`; "" when the cluster has none."""
        found = [n for n in self.list_nodes() if n.get("labels", {}).get(NODE_LABEL) == name]
        if not found:
            return ""
        alive = [n for n in found if n["state"] == "ALIVE"]
        return "ALIVE" if alive else found[-1]["state"]

    def node_ids(self, name: str) -> set[str]:
        """Node ids the cluster has known labelled `name` (a replacement node gets a new one)."""
        return {n["node_id"] for n in self.list_nodes() if n.get("labels", {}).get(NODE_LABEL) == name}

    def name_of(self, node_id: str) -> str:
        """The harness name (label) of a node id."""
        for n in self.list_nodes():
            if n["node_id"] == node_id:
                return n.get("labels", {}).get(NODE_LABEL, "")
        return ""

    def wait_for(
        self,
        predicate: Callable[[], Any],
        what: str,
        timeout_s: float,
        node: RayNode | None = None,
        poll_s: float = 0.5,
    ) -> Any:
        """Poll `predicate` until it returns a truthy value (returned) or fail after timeout_s, with
        the node's log tail when a node is named and its process ended."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                value = predicate()
            except OSError:
                value = None
            if value:
                return value
            if node is not None and node.process.poll() is not None:
                raise RuntimeError(f"{what}: node {node.name} exited ({node.process.returncode}):\n{node.log_tail()}")
            if time.monotonic() > deadline:
                tail = f"\n{node.log_tail()}" if node is not None else ""
                raise TimeoutError(f"{what}: not within {timeout_s:.0f} s{tail}")
            time.sleep(poll_s)
