"""Serving across nodes: two model replicas on two worker nodes, one node lost under load, then replaced.

The application is deployed through the dashboard's Serve REST API (what `serve deploy` and KubeRay
do) on the `ray_nodes` cluster: Serve's controller, its one HTTP proxy (proxy_location HeadOnly: the
nodes here share 127.0.0.1, so proxies on every node could not all bind the port; on Kubernetes every
pod has its own IP and the manifests use EveryNode) and the ingress on the head, one model replica on
worker-a and one on worker-b (max_replicas_per_node 1). A closed-loop load of 16 clients runs while
worker-a is killed (SIGKILL to its processes: a pod evicted) and a new node, worker-c, joins.

Every wait is on observable state (node state from the State API, replica states from Serve's REST
API, responses counted by the load) with a bounded timeout; the load itself is bounded in requests
and time, and each request in a client timeout, so a hang is a failure rather than a stuck test.

What the test prints (`pytest -s`): how long until the lost node is DEAD and until Serve no longer
counts its replica, requests failed out of requests sent, the longest request latency around the
failure, and how long the replacement replica took to run once the new node joined.

What gets a node loss to no failed request (measured: 0 of about 2,500 in each run):
- the ingress retries a request once on another replica when the model replica under it dies
  (`HandleBackend`: RayActorError, i.e. ActorDiedError or ActorUnavailableError), and answers 503
  ``unavailable`` with Retry-After if that fails too. Without the retry about 9 requests (the lost
  replica's share of those in flight) failed as 503s; Serve's router alone re-routes only requests
  no replica had accepted yet.
- the ingress where the proxy is: an ingress replica lost under a request is a 500 from Serve's proxy
  (measured: 8 of 2,597 with the ingress on the worker nodes instead), which the app cannot turn into
  a 503. Serve's proxy prefers an ingress on its own node (EveryNode on Kubernetes: each pod's proxy).
- max_ongoing_requests (32) above the clients' concurrency (16): one replica holds the whole load
  while the other is gone, so nothing queues into a 503 ``overloaded``.
- health_check_period_s only sets how soon Serve's controller notices the loss and asks for a
  replacement (about 8 s at the manifests' 10 s, about 3 s at 2 s); requests never wait on it, since
  the ingress's router drops a dead replica at its first failed call.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medfusion.bench.serve import encode_multipart, write_untrained_export
from medfusion.data.images import encode_png
from medfusion.orchestration.deploy import serve_config_document
from medfusion.serve.app import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT
from medfusion.store import free_port
from multinode import NODE_LABEL, RayNodes

pytestmark = pytest.mark.integration

APP = "medfusion"
TOKEN = "multinode-serve-token"
CONCURRENCY = 16
CLIENT_TIMEOUT_S = 20.0  # a request still unanswered after this is a hang (the app's own deadline is 15 s)
MAX_REQUESTS = 20_000  # bounds of the load: whichever comes first
MAX_LOAD_S = 300.0  # the test stops the load itself once the replacement answers
FAILED_FRACTION = 0.01  # the goal: at most 1% of requests fail, each a 503 with Retry-After
# Error codes of the app's retryable 503s (medfusion.serving.api) and of Serve's proxy backpressure.
RETRYABLE = {"unavailable", "overloaded", "not_ready"}


# ----------------------------------------------------------------------------------- Serve on the cluster


def dashboard(nodes: RayNodes, path: str, body: dict[str, Any] | None = None, timeout_s: float = 10) -> Any:
    """GET (or PUT `body` as JSON) on the head's dashboard with the cluster's token; the JSON answer."""
    request = urllib.request.Request(
        f"{nodes.dashboard_url}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "PUT",
        headers={"Authorization": f"Bearer {nodes.token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        text = response.read()
    return json.loads(text) if text else None


def serve_document(model_uri: str, token_file: str, port: int) -> dict[str, Any]:
    """The Serve config a pipeline deploy writes (`serve_config_document`: the manifests' health-check and
    shutdown settings), sized for 2-CPU worker nodes, with one proxy and the placement this test needs."""
    args = {
        "model": model_uri,
        "auth_token_file": token_file,
        "require_auth": True,
        "max_batch_size": 8,
        "max_ongoing_requests": 32,  # > the 16 clients: one replica holds them all once the other is gone
        "torch_threads": 1,
        "num_cpus": 1,
        "autoscaling": {"min_replicas": 2, "max_replicas": 2},
        "limits": {"request_timeout_s": 15, "retry_after_s": 1},
    }
    document = serve_config_document(args, app_name=APP)
    # One proxy, on the head: the nodes share 127.0.0.1 here (k8s: EveryNode, a proxy per pod IP).
    document["proxy_location"] = "HeadOnly"
    document["http_options"] = {"host": "127.0.0.1", "port": port, "request_timeout_s": 60}
    placement = {
        # The ingress holds no model: on the head with the proxy, so that a lost worker node loses a model
        # replica only (an ingress replica lost under a request is a 500 from Serve's proxy).
        INGRESS_DEPLOYMENT: {"ray_actor_options": {"num_cpus": 0, "label_selector": {NODE_LABEL: "head"}}},
        # One model replica per node: a lost node takes one replica, never both.
        MODEL_DEPLOYMENT: {"max_replicas_per_node": 1},
    }
    (app,) = document["applications"]
    for deployment in app["deployments"]:
        deployment.update(placement[deployment["name"]])
    return document


def app_status(nodes: RayNodes) -> dict[str, Any]:
    return (dashboard(nodes, "/api/serve/applications/").get("applications") or {}).get(APP) or {}


def model_replicas(nodes: RayNodes) -> list[dict[str, Any]]:
    """Serve's view of the model replicas: replica_id, state, actor_id, node_id, pid."""
    deployment = (app_status(nodes).get("deployments") or {}).get(MODEL_DEPLOYMENT) or {}
    return list(deployment.get("replicas") or [])


def running_on(nodes: RayNodes) -> dict[str, dict[str, Any]]:
    """RUNNING model replicas by the name of the node they run on."""
    names = {n["node_id"]: n.get("labels", {}).get(NODE_LABEL, "") for n in nodes.list_nodes()}
    return {names.get(r.get("node_id"), "?"): r for r in model_replicas(nodes) if r["state"] == "RUNNING"}


def replica_calls(nodes: RayNodes, node: str, replica: dict[str, Any]) -> int:
    """Calls of `predict` that the replica's own log (in the node's temp dir) records as answered."""
    suffix = replica["replica_id"].split("#")[-1]
    logs = Path(nodes.nodes[node].temp_dir).glob(f"session_*/logs/serve/replica_{APP}_{MODEL_DEPLOYMENT}_*.log")
    return sum(
        1
        for log in logs
        if suffix in log.name
        for line in log.read_text(errors="replace").splitlines()
        if "predict" in line and " OK " in line
    )


def running_exactly(nodes: RayNodes, *names: str) -> dict[str, dict[str, Any]] | None:
    """The RUNNING model replicas by node name when they run on exactly `names` (one each), else None."""
    replicas = running_on(nodes)
    return replicas if set(replicas) == set(names) else None


# ----------------------------------------------------------------------------------- the load


@dataclass
class Outcome:
    started: float  # time.monotonic()
    latency_s: float
    status: int  # 0: no HTTP answer (connection error or client timeout)
    error: str = ""  # the JSON error code of a non-200 answer, or the exception's type
    retry_after: str | None = None


@dataclass
class Load:
    """`concurrency` closed-loop HTTP clients (a thread each, keep-alive) until stopped or a bound is hit."""

    port: int
    body: bytes
    content_type: str
    concurrency: int = CONCURRENCY
    max_requests: int = MAX_REQUESTS
    max_seconds: float = MAX_LOAD_S
    timeout_s: float = CLIENT_TIMEOUT_S
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._sent = 0
        self._deadline = time.monotonic() + self.max_seconds
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="load")
        self._futures = [self._pool.submit(self._client) for _ in range(self.concurrency)]

    def _next(self) -> bool:
        with self._lock:
            if self._stop.is_set() or self._sent >= self.max_requests or time.monotonic() > self._deadline:
                return False
            self._sent += 1
            return True

    def _client(self) -> None:
        headers = {"Content-Type": self.content_type, "Authorization": f"Bearer {TOKEN}"}
        connection: http.client.HTTPConnection | None = None
        while self._next():
            if connection is None:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout_s)
            started = time.monotonic()
            try:
                connection.request("POST", "/v1/predict", body=self.body, headers=headers)
                response = connection.getresponse()
                content = response.read()
            except (OSError, http.client.HTTPException) as err:  # socket.timeout is an OSError
                self.outcomes.append(Outcome(started, time.monotonic() - started, 0, type(err).__name__))
                connection.close()
                connection = None
                continue
            outcome = Outcome(started, time.monotonic() - started, response.status)
            if response.status != 200:
                try:
                    outcome.error = str(json.loads(content).get("error", ""))
                except (ValueError, AttributeError):
                    outcome.error = content[:80].decode(errors="replace")
                outcome.retry_after = response.getheader("Retry-After")
            self.outcomes.append(outcome)
        if connection is not None:
            connection.close()

    def ok_since(self, since: float) -> int:
        return sum(1 for o in list(self.outcomes) if o.status == 200 and o.started >= since)

    def running(self) -> bool:
        return not all(f.done() for f in self._futures)

    def stop(self, timeout_s: float = CLIENT_TIMEOUT_S + 10) -> list[Outcome]:
        self._stop.set()
        self._pool.shutdown(wait=False)
        deadline = time.monotonic() + timeout_s
        for future in self._futures:
            future.result(timeout=max(deadline - time.monotonic(), 0.1))  # a client error fails the test
        return list(self.outcomes)


def request_body() -> tuple[bytes, str]:
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    return encode_multipart(encode_png(pixels), "fever and productive cough")


# ----------------------------------------------------------------------------------- the cluster


def test_losing_a_node_under_load_fails_few_requests_with_retryable_503s(ray_nodes, tmp_path):
    nodes = ray_nodes
    export = write_untrained_export(str(tmp_path / "export"), "tiny")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    port = free_port()
    dashboard(nodes, "/api/serve/applications/", serve_document(export, str(token_file), port), timeout_s=60)

    # Deployed: two model replicas RUNNING, one on each worker node, as Serve and the State API see them.
    placed = nodes.wait_for(
        lambda: running_exactly(nodes, "worker-a", "worker-b"),
        "one model replica RUNNING on each of worker-a and worker-b",
        240,
    )
    nodes.wait_for(lambda: app_status(nodes).get("status") == "RUNNING", "the application RUNNING", 120)
    actors = {a["actor_id"]: a for a in nodes.list_actors()}
    for name, replica in placed.items():
        actor = actors[replica["actor_id"]]
        assert actor["state"] == "ALIVE" and nodes.name_of(actor["node_id"]) == name, (name, actor)
    ingress = app_status(nodes)["deployments"][INGRESS_DEPLOYMENT]["replicas"]
    assert [nodes.name_of(r["node_id"]) for r in ingress] == ["head"], ingress
    proxies = dashboard(nodes, "/api/serve/applications/")["proxies"]
    assert [nodes.name_of(node_id) for node_id in proxies] == ["head"], proxies
    lost, survivor = placed["worker-a"], placed["worker-b"]

    body, content_type = request_body()
    load = Load(port, body, content_type)
    try:
        warm = time.monotonic()
        nodes.wait_for(lambda: load.ok_since(warm) >= 100, "100 answers before the node is lost", 60, poll_s=0.1)

        # Lose worker-a under load, once its replica has answered requests of it.
        nodes.wait_for(lambda: replica_calls(nodes, "worker-a", lost) >= 20, "worker-a's replica answers", 30)
        killed_at = nodes.kill("worker-a")
        nodes.wait_for(lambda: nodes.node_state("worker-a") == "DEAD", "worker-a DEAD", 30, poll_s=0.1)
        node_dead_at = time.monotonic()
        nodes.wait_for(
            lambda: all(
                r["replica_id"] != lost["replica_id"] or r["state"] != "RUNNING" for r in model_replicas(nodes)
            ),
            "Serve stops counting the lost replica as RUNNING",
            60,
            poll_s=0.1,
        )
        serve_detect_at = time.monotonic()
        # The survivor carries the whole load: more answers after Serve's detection.
        nodes.wait_for(lambda: load.ok_since(serve_detect_at) >= 200, "200 answers on one replica", 60, poll_s=0.1)
        assert set(running_on(nodes)) == {"worker-b"}, model_replicas(nodes)  # no room for a second replica yet

        # Capacity returns: a new node; Serve places the replacement replica there.
        nodes.add_worker("worker-c")
        capacity_at = time.monotonic()
        replacement = nodes.wait_for(
            lambda: running_exactly(nodes, "worker-b", "worker-c"),
            "the replacement replica RUNNING on worker-c",
            180,
            poll_s=0.2,
        )["worker-c"]
        replaced_at = time.monotonic()
        nodes.wait_for(
            lambda: replica_calls(nodes, "worker-c", replacement) >= 20, "the replacement takes requests", 60
        )
        assert load.running(), "the load hit its bound before the test was done"
    finally:
        outcomes = load.stop()

    sent = len(outcomes)
    failed = [o for o in outcomes if o.status != 200]
    in_flight = sum(1 for o in outcomes if o.started < killed_at < o.started + o.latency_s)
    # The failure: requests still open at the kill or sent before Serve stopped counting the lost replica.
    window = [o for o in outcomes if o.started + o.latency_s >= killed_at and o.started <= serve_detect_at]
    after = running_on(nodes)
    print(
        "\nserve across nodes, one of 2 model replicas' node lost under 16 clients:"
        f"\n  node DEAD (State API) {node_dead_at - killed_at:.1f} s after the kill; the replica out of "
        f"Serve's RUNNING {serve_detect_at - killed_at:.1f} s after it"
        f"\n  failed {len(failed)}/{sent} requests {dict(Counter((o.status, o.error) for o in failed))}; "
        f"{in_flight} in flight at the kill"
        f"\n  longest latency {max(o.latency_s for o in window):.2f} s from the kill to Serve's detection "
        f"({len(window)} requests), {max(o.latency_s for o in outcomes):.2f} s over the whole run"
        f"\n  replacement replica RUNNING on worker-c {replaced_at - capacity_at:.1f} s after the node joined"
    )

    assert sent >= 400, sent
    assert len(failed) <= FAILED_FRACTION * sent, Counter((o.status, o.error) for o in failed)
    for o in failed:  # a clean, retryable refusal: never a dropped connection, a hang or a 500
        assert o.status == 503 and o.error in RETRYABLE and o.retry_after, o
    assert max(o.latency_s for o in outcomes) < CLIENT_TIMEOUT_S
    assert after["worker-b"]["replica_id"] == survivor["replica_id"], "the surviving replica was left alone"
