"""Serving hardening without Ray: auth that fails closed, readiness under load, abandoned requests,
redirects, and the header timeout of the HTTP server.

Their end-to-end counterparts on real Serve are in test_hostile.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import httpx
import pytest
from serve_cases import LIMITS, TOKEN, multipart, png, send_kwargs

from medfusion.cli import main
from medfusion.config import ConfigError, ServeConfig
from medfusion.serving import header_timeout
from medfusion.serving.api import create_api
from medfusion.serving.runtime import HandleBackend, ModelRunner
from medfusion.serving.settings import ApiSettings, check_auth, ingress_args, model_args, read_token

ENV = "MEDFUSION_TEST_TOKEN"


# ----------------------------------------------------------------------------- auth fails closed


@pytest.mark.parametrize("value", [None, "", "   "], ids=["unset", "empty", "blank"])
def test_require_auth_refuses_to_start_without_a_token(monkeypatch, value):
    if value is None:
        monkeypatch.delenv(ENV, raising=False)
    else:
        monkeypatch.setenv(ENV, value)
    args = ingress_args(ServeConfig(model="m", auth_token_env=ENV, require_auth=True))
    assert args["require_auth"] is True
    with pytest.raises(ConfigError, match="require_auth"):
        ApiSettings.from_ingress_args(args)  # what each ingress replica runs at start
    with pytest.raises(ConfigError, match=f"require_auth.*{ENV}"):
        read_token(ENV, "", required=True)


def test_require_auth_starts_with_a_token(monkeypatch, token_file):
    monkeypatch.setenv(ENV, "t0k")
    assert (
        ApiSettings.from_ingress_args(ingress_args(ServeConfig(auth_token_env=ENV, require_auth=True))).token == "t0k"
    )
    monkeypatch.delenv(ENV)
    cfg = ServeConfig(auth_token_env=ENV, auth_token_file=token_file, require_auth=True)
    assert ApiSettings.from_ingress_args(ingress_args(cfg)).token == TOKEN


def test_a_set_but_empty_token_variable_is_a_warning(monkeypatch, caplog):
    monkeypatch.setenv(ENV, "")
    (warning,) = check_auth(ServeConfig(auth_token_env=ENV))
    assert ENV in warning and "empty" in warning and "OFF" in warning
    monkeypatch.delenv(ENV)
    assert check_auth(ServeConfig(auth_token_env=ENV)) == []  # unset: auth off by choice, no warning
    monkeypatch.setenv(ENV, "")
    with caplog.at_level(logging.WARNING, logger="medfusion.serving"):
        ApiSettings.from_ingress_args(ingress_args(ServeConfig(auth_token_env=ENV)))
    assert any(r.levelno == logging.WARNING and ENV in r.getMessage() for r in caplog.records)


def test_auth_off_is_logged_as_a_warning(caplog):
    with caplog.at_level(logging.INFO, logger="medfusion.serving"):
        create_api(object(), ApiSettings(limits=LIMITS))  # the backend is not called while the app is built
    (record,) = [r for r in caplog.records if "auth" in r.getMessage()]
    assert record.levelno == logging.WARNING and "OFF" in record.getMessage()


def test_cli_serve_warns_and_fails_closed_before_starting_anything(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "")
    start = time.monotonic()
    assert main(["serve", "--model", "/nonexistent/export", f"auth_token_env={ENV}", "require_auth=true"]) == 2
    err = capsys.readouterr().err
    assert f"warning: {ENV} is set but empty" in err and "require_auth" in err
    assert time.monotonic() - start < 5  # no Ray was started


def test_require_auth_is_on_in_every_checked_in_serve_config():
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    configs = [yaml.safe_load((root / "serve" / "serve_config.yaml").read_text())]
    manifests = [root / "k8s/base/rayservice.medfusion.yaml", *sorted(root.glob("k8s/overlays/*/kustomization.yaml"))]
    for manifest in manifests:
        for document in yaml.safe_load_all(manifest.read_text()):
            configs += _serve_configs(document)
    assert len(configs) >= 3
    for cfg in configs:
        for app in cfg["applications"]:
            assert app["args"].get("require_auth") is True, app["name"]


def _serve_configs(node) -> list[dict]:
    """Every serveConfigV2 in a manifest, including those a kustomize patch replaces."""
    import yaml

    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "serveConfigV2" and isinstance(value, str):
                found.append(yaml.safe_load(value))
            else:
                found += _serve_configs(value)
    elif isinstance(node, list):
        for value in node:
            if isinstance(value, dict) and value.get("path") == "/spec/serveConfigV2":
                found.append(yaml.safe_load(value["value"]))
            else:
                found += _serve_configs(value)
    elif isinstance(node, str) and "serveConfigV2" in node:  # a JSON-patch list kept as a YAML string
        found += _serve_configs(yaml.safe_load(node))
    return found


# ----------------------------------------------------------------------------- readiness


class _Response:
    """A DeploymentResponse double: awaitable, cancellable."""

    def __init__(self, outcome, delay_s: float = 0.0) -> None:
        self.outcome, self.delay_s, self.cancelled = outcome, delay_s, False

    def cancel(self) -> None:
        self.cancelled = True

    def __await__(self):
        return self._answer().__await__()

    async def _answer(self):
        await asyncio.sleep(self.delay_s)
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class _Method:
    def __init__(self, make) -> None:
        self.make, self.responses = make, []

    def remote(self, *args):
        self.responses.append(self.make())
        return self.responses[-1]


class _Handle:
    def __init__(self, predict=None, ready=None) -> None:
        self.predict = _Method(predict or (lambda: _Response({"labels": []})))
        self.ready = _Method(ready or (lambda: _Response(True)))


@pytest.mark.parametrize(
    "probe, running, state",
    [
        (lambda: _Response(True), 1, "ready"),
        (lambda: _Response(True, delay_s=60), 1, "busy"),  # loaded, every replica busy: stays in the load balancer
        (lambda: _Response(True, delay_s=60), 0, "loading"),  # no replica has loaded the model yet
        (lambda: _Response(RuntimeError("replica died")), 1, "unavailable"),
    ],
    ids=["answers", "busy", "loading", "unavailable"],
)
def test_readiness_tells_busy_from_not_loaded(probe, running, state):
    handle = _Handle(ready=probe)
    backend = HandleBackend(handle, probe_timeout_s=0.2, running_replicas=lambda: running)
    assert asyncio.run(backend.readiness()) == state
    if state in ("busy", "loading"):
        assert handle.ready.responses[0].cancelled  # the probe does not stay queued behind the model


@pytest.mark.parametrize("state, status, body", [("busy", 200, "busy"), ("loading", 503, "not_ready")])
def test_readyz_answers_busy_with_200_and_loading_with_503(state, status, body):
    class Backend:
        async def readiness(self):
            return state

    app = create_api(Backend(), ApiSettings(limits=LIMITS))
    response = _get(app, "/readyz")
    assert response.status_code == status
    assert body in (response.json().get("status"), response.json().get("error"))


# ----------------------------------------------------------------------------- abandoned requests


def test_an_abandoned_request_is_cancelled_on_the_model_side():
    handle = _Handle(predict=lambda: _Response({"labels": []}, delay_s=60))
    backend = HandleBackend(handle)

    async def go():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(backend.predict({"image": b""}), 0.1)  # what the API does before its 504

    asyncio.run(go())
    assert handle.predict.responses[0].cancelled


class _CountingPredictor:
    info = {"model_name": "stub", "version": "0"}

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def predict(self, items, errors="return"):
        self.seen += items
        return [{"labels": []} for _ in items]


def test_the_model_skips_items_whose_deadline_passed():
    predictor = _CountingPredictor()
    runner = ModelRunner(predictor)
    now = time.time()
    items = [{"image": b"a", "deadline": now - 1}, {"image": b"b", "deadline": now + 60}, {"image": b"c"}]
    results = runner.predict_now(items)
    assert [item["image"] for item in predictor.seen] == [b"b", b"c"]
    assert all("deadline" not in item for item in predictor.seen)
    assert "deadline" in results[0]["error"] and results[0]["index"] == 0
    assert "error" not in results[1] and "error" not in results[2]


def test_the_api_sends_its_deadline_with_the_item():
    seen = []

    class Backend:
        async def predict(self, item):
            seen.append(item)
            return {"labels": [], "model": {"name": "stub", "version": "0"}}

    app = create_api(Backend(), ApiSettings(limits=LIMITS))
    before = time.time()
    _send(app, multipart(png()))
    (item,) = seen
    assert before + LIMITS.request_timeout_s - 1 < item["deadline"] <= time.time() + LIMITS.request_timeout_s


# ----------------------------------------------------------------------------- redirects


@pytest.mark.parametrize("path", ["/v1/model/", "/v1/predict/", "/readyz/"])
def test_trailing_slash_never_redirects_to_the_host_header(path):
    class Backend:
        async def readiness(self):
            return "ready"

        async def info(self):
            return {}

    app = create_api(Backend(), ApiSettings(limits=LIMITS))
    response = _get(app, path, headers={"host": "evil.example", "authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert "evil.example" not in str(response.headers) and "location" not in response.headers


def _get(app, path: str, **kwargs) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, **kwargs)

    return asyncio.run(go())


def _send(app, req) -> httpx.Response:
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(req.method, req.path, **send_kwargs(req, None))

    return asyncio.run(go())


# ----------------------------------------------------------------------------- header timeout


@pytest.fixture
def uvicorn_server(request):
    """A plain uvicorn server on loopback in a thread (the server Serve's proxy runs), with `http` of the param."""
    import uvicorn

    from medfusion.store import free_port

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=request.param, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield port
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("uvicorn_server", ["h11", "httptools"], indirect=True)
@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\n"], ids=["silent", "slow-headers"])
def test_header_timeout_closes_a_connection_whose_headers_do_not_arrive(uvicorn_server, sent, monkeypatch):
    monkeypatch.setattr(header_timeout, "_timeout_s", None)
    header_timeout.install(1.0)
    try:
        closed_after = _closed_after(uvicorn_server, sent, wait_s=8)
        assert closed_after is not None and 0.8 < closed_after < 3.0, closed_after
        # a request whose headers arrive at once is served, on a fresh connection and on a kept-alive one
        with httpx.Client(base_url=f"http://127.0.0.1:{uvicorn_server}") as client:
            assert client.get("/").text == "ok"
            time.sleep(1.5)  # idle longer than the header timeout between two requests: keep-alive rules apply
            assert client.get("/").text == "ok"
    finally:
        header_timeout.install(None)
    assert _closed_after(uvicorn_server, sent, wait_s=2) is None  # uninstalled: the server waits as before


def _closed_after(port: int, sent: bytes, wait_s: float) -> float | None:
    """Seconds until the server closed a connection that sent only `sent`, or None if it stayed open."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait_s)
        start = time.monotonic()
        if sent:
            sock.sendall(sent)
        try:
            while sock.recv(1024):
                pass  # a 408 answer may come first, then the close
        except socket.timeout:
            return None
        return time.monotonic() - start


# ----------------------------------------------------------------------------- the model replica's args


def test_model_args_are_unchanged_by_auth_settings():
    assert "require_auth" not in model_args(ServeConfig(require_auth=True))


def test_health_check_fails_after_a_whole_batch_failed_and_recovers():
    class FailingOnce(_CountingPredictor):
        fail = True

        def predict(self, items, errors="return"):
            if self.fail:
                self.fail = False
                raise RuntimeError("CUDA error: device lost")
            return super().predict(items, errors)

    runner = ModelRunner(FailingOnce())
    runner.check_health()
    with pytest.raises(RuntimeError, match="device lost"):
        runner.predict_now([{"image": b"a"}])
    with pytest.raises(RuntimeError, match="last batch failed as a whole: RuntimeError: CUDA error"):
        runner.check_health()
    runner.predict_now([{"image": b"b"}])
    runner.check_health()
    runner._thread.shutdown()
    with pytest.raises(RuntimeError, match="model thread has shut down"):
        runner.check_health()
