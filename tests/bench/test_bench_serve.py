"""`medfusion bench serve`: the load generator is bounded and counts right; the run prints its JSON line."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

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


def _run(rps: float, requests: int = 20) -> dict[str, Any]:
    return {
        "rps": rps,
        "requests": requests,
        "p50_ms": 10.0,
        "p95_ms": 20.0,
        "p99_ms": 30.0,
        "errors": 0,
        "cpu_ms": {"server": 1.0},
    }


def test_the_record_names_its_ratios_and_their_spread():
    from medfusion.bench.serve import ServeBenchConfig, bench_record

    cfg = ServeBenchConfig(concurrency=[1, 4], requests=20, repetitions=3)
    offline = [{"items_per_s": v, "items": 100, "seconds": 10.0, "single_ms": 5.0} for v in (100.0, 120.0, 80.0)]
    per_system = {  # rps of the repetitions at c=4 (c=1 is a tenth)
        "fastapi_unbatched": (20.0, 25.0, 30.0),
        "fastapi_batched": (50.0, 40.0, 60.0),
        "serve": (45.0, 30.0, 50.0),
        "serve_combined": (48.0, 44.0, 47.0),
        "serve_http_floor": (200.0, 210.0, 190.0),
    }
    systems = {name: [{1: _run(v / 10), 4: _run(v)} for v in values] for name, values in per_system.items()}
    record = bench_record(cfg, offline, systems, words=[3, 7, 12])
    figures, ratios = record["figures"], record["ratios"]
    check_ratios(record)
    assert figures["serve_c4_rps"]["value"] == 45.0 and figures["offline_items_per_s"]["value"] == 100.0  # medians
    assert figures["serve_c4_requests"]["value"] == 60 and figures["findings_words_max"]["value"] == 12
    assert ratios["serve_vs_fastapi_batched_c4"] == 0.9  # 45 / 50: a ratio of medians
    assert record["ratio_of"]["serve_vs_fastapi_unbatched_c1"] == ["serve_c1_rps", "fastapi_unbatched_c1_rps"]
    assert record["ratio_of"]["serve_http_floor_vs_offline_c4_rep2"] == [
        "serve_http_floor_c4_rps_rep2",
        "offline_items_per_s_rep2",
    ]
    # per repetition 45/50, 30/40, 50/60: the spread is of the same ratio over the repetitions
    assert record["ratio_spread"]["serve_vs_fastapi_batched_c4"] == {"min": 0.75, "median": 0.833, "max": 0.9}
    assert record["goals"]["serve_vs_fastapi_batched_c4"] == {"target": 0.8, "ratio": 0.9, "applies": True, "met": True}
    assert record["goals"]["serve_vs_offline_c4"]["met"] is False  # 45 / 100
    check_counts(figures, [f"{s}_c4_requests" for s in per_system], 60)


class _CountingRunner:
    """A runner that records the batches it is given and answers each item with its own index."""

    info = {"model_name": "stub", "version": "0"}

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def predict(self, items):
        self.batches.append([item["n"] for item in items])
        await asyncio.sleep(0.01)
        return [{"n": item["n"]} for item in items]


def test_the_batched_plain_backend_batches_as_serve_does():
    from medfusion.bench.serve import BatchedLocalBackend

    async def scenario():
        runner = _CountingRunner()
        backend = BatchedLocalBackend(runner, max_batch_size=4, batch_wait_timeout_s=0.05)
        alone = await backend.predict({"n": -1})  # a lone request runs at once, in a batch of one
        answers = await asyncio.gather(*(backend.predict({"n": n}) for n in range(10)))
        return runner.batches, alone, answers

    batches, alone, answers = asyncio.run(scenario())
    assert alone == {"n": -1} and answers == [{"n": n} for n in range(10)]  # each request gets its own answer
    assert batches[0] == [-1] and sorted(n for b in batches[1:] for n in b) == list(range(10))
    assert max(len(b) for b in batches) == 4 and len(batches) <= 1 + 4  # batched, never above max_batch_size


def test_the_fitted_export_is_cached_per_preset_and_settings(tmp_path, monkeypatch):
    from medfusion.bench import serve

    fits = []

    def fake_fit(uri, settings):
        fits.append(dict(settings))
        serve.write_untrained_export(uri, settings["preset"])
        return uri

    monkeypatch.setattr(serve, "write_trained_export", fake_fit)
    cfg = serve.ServeBenchConfig(cache_dir=str(tmp_path), fit_epochs=2)
    first, again = serve.trained_export(cfg), serve.trained_export(cfg)
    other = serve.trained_export(serve.ServeBenchConfig(cache_dir=str(tmp_path), fit_epochs=3))
    assert first == again != other and len(fits) == 2 and [f["epochs"] for f in fits] == [2, 3]
    assert first.startswith(str(tmp_path / "tiny-")) and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [first.rsplit("/", 1)[1], other.rsplit("/", 1)[1]]
    )  # nothing partial left behind


def test_the_request_pool_varies_and_shares_one_content_type():
    from medfusion.bench.serve import ServeBenchConfig, make_request_pool

    pool = make_request_pool(ServeBenchConfig(request_pool=6, image_size=32))
    assert len({item["image"] for item in pool}) == 6 and len({item["report"] for item in pool}) > 1
    types = {encode_multipart(item["image"], item["report"], "b0undary")[1] for item in pool}
    assert types == {"multipart/form-data; boundary=b0undary"}


class _Echo:
    async def predict(self, item):
        return {"labels": [], "findings": item.get("report"), "model": {"name": "stub", "version": "0"}}

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
    seen = []
    pool = [encode_multipart(_png(), note, "b0undary")[0] for note in ("one", "two", "three")]
    cycled = run_load(
        f"{stub_url}/v1/predict",
        pool,
        "multipart/form-data; boundary=b0undary",
        concurrency=1,
        requests=4,
        max_seconds=30,
        on_response=lambda answer: seen.append(answer.json()["findings"]),
    )
    assert cycled.requests == 4 and seen == ["one", "two", "three", "one"]  # the pool, cycled
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
@pytest.mark.slow  # ~2 min of Ray, Serve and uvicorn start-ups on 2 cores: `make test-slow`
def test_bench_prints_its_json_last(tmp_path):
    code = (
        "import json; from medfusion.bench.serve import ServeBenchConfig, run_serve_bench;"
        "print(json.dumps(run_serve_bench(ServeBenchConfig(requests=16, max_seconds=10, concurrency=[1, 4],"
        " warmup_requests=4, image_size=64, max_batch_size=4, layouts=['split'], repetitions=2,"
        " ceiling_seconds=0.5, request_pool=8, fit_samples=32, fit_epochs=1, cache_dir='cache'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["bench"] == "serve" and result["config"]["concurrency"] == [1, 4]
    assert result["config"]["model"].startswith(str(tmp_path / "cache" / "tiny-"))  # the fitted export, cached
    figures, systems = result["figures"], ("fastapi_unbatched", "fastapi_batched", "serve", "serve_http_floor")
    for system in systems:
        assert figures[f"{system}_c4_errors"]["value"] == 0 and figures[f"{system}_c1_errors"]["value"] == 0
        assert [f"{system}_c4_rps_rep1", f"{system}_c4_rps_rep2"] <= list(figures)
    assert figures["serve_c1_p50_minus_forward_ms"]["unit"] == "ms" and figures["offline_seconds_min"]["value"] >= 0.5
    ratio_of = result["ratio_of"]
    for ratio, terms in {
        "serve_vs_fastapi_batched_c4": ["serve_c4_rps", "fastapi_batched_c4_rps"],
        "serve_vs_fastapi_unbatched_c1": ["serve_c1_rps", "fastapi_unbatched_c1_rps"],
        "serve_vs_offline_c4": ["serve_c4_rps", "offline_items_per_s"],
        "serve_http_floor_vs_offline_c4": ["serve_http_floor_c4_rps", "offline_items_per_s"],
        "fastapi_batched_vs_fastapi_unbatched_c4": ["fastapi_batched_c4_rps", "fastapi_unbatched_c4_rps"],
        "serve_vs_fastapi_batched_c4_rep2": ["serve_c4_rps_rep2", "fastapi_batched_c4_rps_rep2"],
    }.items():
        assert ratio_of[ratio] == terms, ratio
    check_ratios(result)
    for ratio, spread in result["ratio_spread"].items():
        assert spread["min"] <= result["ratios"][f"{ratio}_rep1"] <= spread["max"], ratio
    for c in (1, 4):  # every system answered all 16 requests of each level in both repetitions
        check_counts(figures, [f"{s}_c{c}_requests" for s in systems], 32)
    cpu = {
        name: figures.get(f"{name}_c4_cpu_ms_{role}", {}).get("value", 0)
        for name, role in (
            ("serve", "proxy"),
            ("serve", "ingress"),
            ("serve", "model"),
            ("serve_http_floor", "replica"),
            ("fastapi_unbatched", "server"),
            ("fastapi_batched", "server"),
        )
    }
    assert all(ms > 0 for ms in cpu.values()), cpu  # where each system's CPU went, per request
