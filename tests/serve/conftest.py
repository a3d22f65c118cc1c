"""Fixtures of the serving tests: a tiny export, a token file, Serve on the session's local Ray."""

from __future__ import annotations

import os
from typing import Any

import pytest
from serve_cases import HEADER_TIMEOUT_S, TOKEN, TinyExport, free_port, make_export, wait_for

from medfusion.serving.header_timeout import HEADER_TIMEOUT_ENV
from medfusion.serving.settings import export_serve_environment

# Serve as `medfusion serve` and the image set it up: header timeout, throughput mode. The session's Ray starts
# after collection, so its processes inherit these; a short timeout lets test_hostile watch it quickly.
export_serve_environment()
os.environ.setdefault(HEADER_TIMEOUT_ENV, str(HEADER_TIMEOUT_S))


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> TinyExport:
    return make_export(str(tmp_path_factory.mktemp("serve-export") / "model"), seed=0)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("serve-secret") / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


# ----------------------------------------------------------------------------- Serve


@pytest.fixture(scope="session")
def serve_url(ray_local):
    """Serve on the session's local Ray, its HTTP proxy on a free loopback port; shut down after."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


class Deployer:
    """deploy(name, **ServeConfig fields) -> base URL of a fresh application at /<name>; close() deletes them."""

    def __init__(self, serve_url: str) -> None:
        self.serve_url = serve_url
        self.names: list[str] = []

    def __call__(self, name: str, **args: Any) -> str:
        from ray import serve

        from medfusion.serve.app import build_app

        serve.run(build_app(args), name=name, route_prefix=f"/{name}", blocking=False)
        self.names.append(name)
        wait_for(lambda: serve.status().applications[name].status == "RUNNING", 120, message=f"app {name} RUNNING")
        return f"{self.serve_url}/{name}"

    def close(self) -> None:
        from ray import serve

        for name in dict.fromkeys(self.names):
            serve.delete(name)


@pytest.fixture
def deploy(serve_url):
    """Applications that live for one test."""
    deployer = Deployer(serve_url)
    yield deployer
    deployer.close()


@pytest.fixture(scope="module")
def deploy_module(serve_url):
    """Applications that live for one test module."""
    deployer = Deployer(serve_url)
    yield deployer
    deployer.close()
