"""The Serve application end to end on the local Ray: contract, hostile input, overload, auth.

Each runs in both layouts: split (an ingress deployment in front of the model deployment) and
combined (``ingress_replicas=0``: the model replicas answer HTTP). Load, autoscaling, replica failure
and version rollover are in test_operations.py.
"""

from __future__ import annotations

import json

import httpx
import pytest
from serve_cases import (
    LIMITS,
    TOKEN,
    Req,
    as_json,
    assert_close,
    b64,
    dicom,
    hostile_cases,
    jpeg,
    multipart,
    png,
    replica_states,
    send_kwargs,
    strip_meta,
)

from medfusion.predictor import Predictor

pytestmark = pytest.mark.integration

# uvicorn (in Serve's proxy) refuses a malformed Content-Length itself, before any app runs.
SERVE_CASES = [c for c in hostile_cases() if c[0] != "lying-content-length"]


LAYOUTS = {"split": 1, "combined": 0}  # ingress_replicas


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def app_url(deploy_module, tiny_export, token_file, layout):
    """The app with the test limits and a bearer token from a file (as a mounted secret would be)."""
    return deploy_module(
        f"main-{layout}",
        model=tiny_export.uri,
        num_cpus=0.25,
        auth_token_file=token_file,
        limits=vars(LIMITS),
        ingress_replicas=LAYOUTS[layout],
    )


@pytest.fixture(scope="module")
def client(app_url):
    with httpx.Client(base_url=app_url, timeout=60) as c:
        yield c


def _send(client: httpx.Client, req: Req) -> httpx.Response:
    return client.request(req.method, req.path, **send_kwargs(req))


@pytest.mark.parametrize(
    "make, report",
    [
        (png, None),
        (png, "fever and productive cough"),
        (jpeg, None),
        (jpeg, "smoker"),
        (dicom, None),
        (dicom, "haemoptysis"),
    ],
    ids=["png", "png-note", "jpeg", "jpeg-note", "dicom", "dicom-note"],
)
def test_predict_matches_the_predictor(client, tiny_export, make, report):
    image = make()
    (prediction,) = Predictor.from_export(tiny_export.uri).predict([{"image": image, "report": report}])
    expected = json.loads(json.dumps(prediction))
    for request in (multipart(image, report=report), as_json({"image_b64": b64(image), "report": report})):
        response = _send(client, request)
        assert response.status_code == 200, response.text
        assert_close(strip_meta(response.json()), expected)
        assert response.json()["model"] == {"name": "medfusion_tiny", "version": tiny_export.version}


def test_endpoints_and_request_id(client, tiny_export):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    info = client.get("/v1/model", headers={"authorization": f"Bearer {TOKEN}"}).json()
    assert info["version"] == tiny_export.version and info["classes"] and "metrics" in info and "lineage" in info
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz"} <= set(client.get("/openapi.json").json()["paths"])
    response = _send(client, Req({**multipart(png()).kwargs, "headers": {"x-request-id": "trace-7"}}))
    assert response.headers["x-request-id"] == "trace-7" and response.json()["request_id"] == "trace-7"


@pytest.mark.parametrize("name, request_, status, error", SERVE_CASES, ids=[c[0] for c in SERVE_CASES])
def test_hostile_request_through_serve(client, name, request_, status, error):
    response = _send(client, request_)
    assert (response.status_code, response.json()["error"]) == (status, error), response.text
    assert "Traceback" not in response.text and TOKEN not in response.text
    assert _send(client, multipart(png())).status_code == 200  # the service keeps answering


def test_no_replica_died_from_hostile_input(client, layout):
    for _, request_, _, _ in SERVE_CASES:
        assert _send(client, request_).status_code < 500
    assert replica_states(f"main-{layout}") == {"RUNNING": 1}
    assert replica_states(f"main-{layout}", "MedFusionIngress") == ({"RUNNING": 1} if layout == "split" else {})


def test_full_queue_answers_503_with_retry_after(deploy, tiny_export, layout):
    """One replica, batches of 1, 2 queued per caller: a burst of 48 overflows and is told to retry."""
    url = deploy(
        f"tight-{layout}",
        model=tiny_export.uri,
        num_cpus=0.25,
        max_batch_size=1,
        max_ongoing_requests=1,
        max_queued_requests=2,
        autoscaling={"min_replicas": 1, "max_replicas": 1},
        ingress_replicas=LAYOUTS[layout],
    )
    from medfusion.bench.serve import encode_multipart, run_load

    body, content_type = encode_multipart(png(), "cough")
    refused: list[httpx.Response] = []
    result = run_load(
        f"{url}/v1/predict",
        body,
        content_type,
        concurrency=48,
        requests=144,
        max_seconds=60,
        on_response=lambda r: refused.append(r) if r.status_code == 503 else None,
    )
    assert set(result.statuses) <= {200, 503} and result.transport_errors == 0, result.statuses
    assert result.statuses[503] > 0 and result.statuses[200] > 0
    assert {r.headers.get("retry-after") for r in refused} == {"1"}
    if layout == "split":  # the ingress answers in the API's JSON; combined, Serve's proxy answers in its text
        assert {r.text for r in refused if not r.text.startswith("{")} == set()
        assert {r.json()["error"] for r in refused} == {"overloaded"}
    with httpx.Client(timeout=30) as client:  # and it recovers at once
        assert client.post(f"{url}/v1/predict", content=body, headers={"content-type": content_type}).status_code == 200
