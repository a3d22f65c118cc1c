"""`medfusion bench serve`: the load generator is bounded and counts right; the run prints its JSON line."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
from bench_invariants import check_counts, check_ratios

from medfusion.bench.serve import LoadResult, encode_multipart, run_load
from medfusion.config import ServeLimitsConfig
from medfusion.serving import parsing
from medfusion.serving.api import create_api


def test_percentiles_and_errors():
    result = LoadResult(latencies_s=[i / 1000 for i in range(1, 101)], seconds=2.0)
    result.statuses.update({200: 97, 503: 3})
    result.transport_errors = 1
    summary = result.summary()
    assert summary["requests"] == 101 and summary["errors"] == 4 and summary["rps"] == pytest.approx(50.5)
    assert (summary["p50_ms"], summary["p99_ms"]) == (pytest.approx(51.0), pytest.approx(99.0))


def test_the_bench_request_is_a_valid_predict_request():
    image = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
    body, content_type = encode_multipart(image, "cough")
    with pytest.raises(parsing.ApiError, match="cannot read the PNG header"):  # parsed as far as the image
        parsing.parse_predict_body(content_type, body, ServeLimitsConfig())
    assert parsing._parse_form(body, content_type, ServeLimitsConfig()).report == "cough"


def test_the_bench_serves_an_untrained_export_of_its_preset(tmp_path):
    from medfusion.bench.serve import ServeBenchConfig, write_untrained_export
    from medfusion.config import ConfigError
    from medfusion.predictor import Predictor

    uri = write_untrained_export(str(tmp_path / "export"), ServeBenchConfig(preset="small").preset)
    loaded = json.loads((tmp_path / "export" / "config.json").read_text())
    assert loaded["model_name"] == "medfusion_small" and loaded["data"]["image_size"] == 128
    assert len(Predictor.from_export(uri).predict([{"image": _png(), "report": "cough"}])) == 1
    with pytest.raises(ConfigError, match="preset: must be one of tiny, small, base, cxr, got 'huge'"):
        ServeBenchConfig(preset="huge")


class _Echo:
    async def predict(self, item):
        return {"labels": [], "model": {"name": "stub", "version": "0"}}

    async def info(self):
        return {}

    async def ready(self):
        return True


@pytest.fixture(scope="module")
def stub_url():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_api(_Echo())
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_closed_loop_is_bounded_by_requests_and_time(stub_url):
    body, content_type = encode_multipart(_png(), None)
    counted = run_load(f"{stub_url}/v1/predict", body, content_type, concurrency=4, requests=40, max_seconds=30)
    assert counted.requests == 40 and dict(counted.statuses) == {200: 40}
    timed = run_load(f"{stub_url}/v1/predict", body, content_type, concurrency=2, requests=10**9, max_seconds=0.5)
    assert 0 < timed.requests < 10**9 and timed.seconds < 5


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.integration
@pytest.mark.slow  # ~50 s of Ray, Serve and uvicorn start-up on 2 cores: `make test-slow`
def test_bench_prints_its_json_last(tmp_path):
    code = (
        "import json; from medfusion.bench.serve import ServeBenchConfig, run_serve_bench;"
        "print(json.dumps(run_serve_bench(ServeBenchConfig(requests=16, max_seconds=10, concurrency=[1, 4],"
        " warmup_requests=4, image_size=64, max_batch_size=4))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "serve" and result["config"]["concurrency"] == [1, 4]
    figures, served = result["figures"], ("serve", "serve_combined")
    for system in served:
        for name in ("c4_rps", "c1_p50_ms", "c1_p50_minus_forward_ms"):
            assert figures[f"{system}_{name}"]["unit"]
        assert figures[f"{system}_c4_errors"]["value"] == 0
    assert figures["plain_c4_errors"]["value"] == 0 and figures["serve_floor_c4_errors"]["value"] == 0
    ratio_of = {f"{s}_vs_plain_c{c}": [f"{s}_c{c}_rps", f"plain_c{c}_rps"] for s in served for c in (1, 4)}
    ratio_of |= {f"{s}_vs_offline_c4": [f"{s}_c4_rps", "offline_items_per_s"] for s in (*served, "serve_floor")}
    assert result["ratio_of"] == ratio_of
    check_ratios(result)
    for c in (1, 4):  # every system answered all 16 requests of each level (none cut by max_seconds)
        check_counts(figures, [f"{s}_c{c}_requests" for s in ("plain", *served, "serve_floor")], 16)
    cpu = {
        name: figures.get(f"{name}_c4_cpu_ms_{role}", {}).get("value", 0)
        for name, role in (
            ("serve", "proxy"),
            ("serve", "ingress"),
            ("serve", "model"),
            ("serve_floor", "replica"),
            ("plain", "server"),
        )
    }
    assert all(ms > 0 for ms in cpu.values()), cpu  # where each system's CPU went, per request
