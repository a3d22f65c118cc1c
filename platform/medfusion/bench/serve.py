"""`medfusion bench serve`: the Serve app (batched) vs a plain FastAPI/uvicorn app vs the offline model.

All of them answer the same request (a synthetic PNG + note, the same export) in one run:

(a) The Ray Serve application of `medfusion.serve.app` on an embedded Ray: dynamic batching in the
    model deployment, `model_replicas` fixed replicas (no autoscaling, so the figures are comparable);
    once per layout: split (an ingress deployment in front) and combined (the model answers HTTP).
(b) The same FastAPI app (`medfusion.serving.api.create_api`: same parsing, validation and logging) in one
    uvicorn process, calling the predictor once per request, without batching.
(c) The ceiling: `Predictor.predict` on batches of `max_batch_size` in this process (decode, forward
    and beam search; no HTTP), with the replica's torch threads, times the replicas; and the time of
    one single-item prediction (what a request at concurrency 1 cannot go below).
(d) Serve's HTTP floor (`http_floor`): one replica that reads the body and answers a fixed JSON, no
    model. On a few CPU cores this, not the model, can bound (a): (d)/(c) is the best (a)/(c) any Serve
    app could reach on the machine.

The load generator is closed-loop (each of `concurrency` clients sends its next request when the
previous one is answered), on loopback, bounded by `requests` and `max_seconds` per level. At the
highest level the bench also prints where each system's CPU went, in ms per request: the load
generator, Serve's proxy, the ingress and model replicas, Ray's own processes (psutil).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from medfusion.bench.record import ratio_terms, ratios_of
from medfusion.config import PRESETS, ServeConfig, check
from medfusion.loader import load_config

SERVE_LAYOUTS = ("split", "combined")


@dataclass
class ServeBenchConfig:
    """`medfusion bench serve`: the Serve app (batched) vs plain FastAPI/uvicorn vs offline forward."""

    model: str = ""
    """Export to serve (path or s3://); empty writes an untrained export of `preset` to a temporary folder."""
    preset: str = "tiny"
    """Size preset of that untrained export: tiny (the HTTP path dominates on CPU), small or base."""
    requests: int = 400
    """Requests per system and concurrency level (bounded; see also max_seconds)."""
    max_seconds: float = 30.0
    """Time limit per system and concurrency level; the level stops at whichever comes first."""
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 32])
    """Closed-loop client concurrency levels."""
    warmup_requests: int = 16
    """Requests sent before each system is measured (not counted)."""
    image_size: int = 128
    """Side of the synthetic request images in pixels (PNG)."""
    with_report: bool = True
    """Send the synthetic clinical note with each request."""
    max_batch_size: int = 32
    """Dynamic batch size of the Serve app, and the offline batch size."""
    batch_wait_timeout_s: float = 0.1
    """Longest batch wait of the Serve app (ServeConfig.batch_wait_timeout_s)."""
    model_replicas: int = 1
    """Model replicas of the Serve app (fixed: autoscaling would blur the comparison)."""
    layouts: list[str] = field(default_factory=lambda: ["split", "combined"])
    """Serve app layouts to measure: split (ingress + model deployments, ingress_replicas=1) and
    combined (the model replicas answer HTTP, ingress_replicas=0)."""
    http_floor: bool = True
    """Also measure Serve's HTTP path alone (a replica that answers a fixed JSON): the bound that the
    machine's cores, not the model, put on the Serve app."""

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        check(self.requests >= 10, "requests", f"must be >= 10, got {self.requests}")
        check(0 < self.max_seconds <= 3_600, "max_seconds", f"must be in (0, 3600], got {self.max_seconds}")
        check(
            bool(self.concurrency) and all(1 <= c <= 1024 for c in self.concurrency),
            "concurrency",
            f"must be a non-empty list of values in [1, 1024], got {self.concurrency}",
        )
        check(self.warmup_requests >= 0, "warmup_requests", "must be >= 0")
        check(16 <= self.image_size <= 4096, "image_size", f"must be in [16, 4096], got {self.image_size}")
        check(1 <= self.max_batch_size <= 1024, "max_batch_size", "must be in [1, 1024]")
        check(0 <= self.batch_wait_timeout_s <= 10, "batch_wait_timeout_s", "must be in [0, 10]")
        check(self.model_replicas >= 1, "model_replicas", "must be >= 1")
        check(
            bool(self.layouts) and set(self.layouts) <= set(SERVE_LAYOUTS),
            "layouts",
            f"must be a non-empty list of {', '.join(SERVE_LAYOUTS)}, got {self.layouts}",
        )


@dataclass
class LoadResult:
    """What one closed-loop run measured."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    transport_errors: int = 0
    seconds: float = 0.0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + self.transport_errors

    @property
    def errors(self) -> int:
        """Requests not answered 2xx (transport failures included)."""
        return self.transport_errors + sum(n for status, n in self.statuses.items() if not 200 <= status < 300)

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(round(q / 100.0 * (len(ordered) - 1))))] * 1000.0

    def summary(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "rps": self.requests / self.seconds if self.seconds else 0.0,
            "p50_ms": self.percentile_ms(50),
            "p95_ms": self.percentile_ms(95),
            "p99_ms": self.percentile_ms(99),
            "errors": self.errors,
        }


def encode_multipart(image: bytes, report: str | None) -> tuple[bytes, str]:
    """A multipart/form-data body with the `image` file and the optional `report` field, and its type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + image
        + b"\r\n"
    ]
    if report is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="report"\r\n\r\n{report}\r\n'.encode())
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@dataclass
class Answer:
    """One response as the load generator read it (what `on_response` callbacks get)."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


async def closed_loop(
    url: str,
    body: bytes,
    content_type: str,
    *,
    concurrency: int,
    requests: int,
    max_seconds: float,
    headers: dict[str, str] | None = None,
    on_response: Callable[[Answer], None] | None = None,
    timeout_s: float = 60.0,
) -> LoadResult:
    """POST `body` to `url` from `concurrency` clients until `requests` were sent or `max_seconds` passed.

    The client is aiohttp: it shares the machine's cores with the servers it measures and costs about
    a third of httpx's CPU per request. `on_response` is called with each `Answer` (e.g. to collect
    model versions or headers).
    """
    import aiohttp

    result = LoadResult()
    sent = 0
    deadline = time.monotonic() + max_seconds
    send_headers = {"content-type": content_type, **(headers or {})}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def client_loop(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            sent += 1
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=send_headers) as response:
                    content = await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError):
                result.transport_errors += 1
                continue
            result.latencies_s.append(time.perf_counter() - start)
            result.statuses[response.status] += 1
            if on_response is not None:
                on_response(Answer(response.status, response.headers, content))

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(session) for _ in range(concurrency)))
        result.seconds = time.perf_counter() - start
    return result


def run_load(url: str, body: bytes, content_type: str, **kwargs: Any) -> LoadResult:
    """`closed_loop` from synchronous code."""
    return asyncio.run(closed_loop(url, body, content_type, **kwargs))


# ------------------------------------------------------------------------------------ the systems


def write_untrained_export(uri: str, preset: str = "tiny", seed: int = 0) -> str:
    """An untrained export of a size preset (synthetic vocabulary and classes): what the bench serves by
    default. Untrained weights cost what trained ones do; only the answers differ."""
    import torch

    from medfusion.config import DataConfig, SynthConfig
    from medfusion.data import synth
    from medfusion.data.tokenizer import Tokenizer
    from medfusion.export import export_model
    from medfusion.loader import preset_values
    from medfusion.models import create_model

    synth_cfg = SynthConfig(num_samples=64, image_size=64, seed=seed)
    samples = list(synth.generate(synth_cfg))
    tokenizer = Tokenizer.build(s.report + " " + s.findings for s in samples)
    torch.manual_seed(seed)
    model = create_model(f"medfusion_{preset}", len(tokenizer), len(synth.class_names(synth_cfg))).eval()
    data = DataConfig(**{k: v for k, v in preset_values(preset, "data").items() if k != "batch_size"})
    export_model(model, uri, tokenizer=tokenizer, classes=synth.class_names(synth_cfg), data_settings=data)
    return uri


def _request_sample(cfg: ServeBenchConfig) -> tuple[bytes, str | None]:
    from medfusion.config import SynthConfig
    from medfusion.data import synth

    sample = next(iter(synth.generate(SynthConfig(num_samples=4, image_size=cfg.image_size, seed=7))))
    return sample.image, sample.report if cfg.with_report else None


def _serve_config(cfg: ServeBenchConfig, uri: str, layout: str = "split") -> ServeConfig:
    return load_config(
        ServeConfig,
        base={
            "model": uri,
            "max_batch_size": cfg.max_batch_size,
            "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            "max_ongoing_requests": 2 * cfg.max_batch_size,
            "max_queued_requests": -1,  # a closed loop never exceeds its concurrency
            "torch_threads": 1,
            "num_cpus": 1.0,
            "ingress_replicas": 0 if layout == "combined" else 1,
            "autoscaling": {"min_replicas": cfg.model_replicas, "max_replicas": cfg.model_replicas},
        },
    )


def _offline(uri: str, image: bytes, report: str | None, cfg: ServeBenchConfig) -> dict[str, float]:
    import torch

    from medfusion.predictor import Predictor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one model replica gets (ServeConfig.torch_threads=1 above)
    try:
        predictor = Predictor.from_export(uri, batch_size=cfg.max_batch_size)
        batch = [{"image": image, "report": report}] * cfg.max_batch_size
        predictor.predict(batch)  # warm up
        rounds = max(3, min(20, cfg.requests // cfg.max_batch_size))
        start = time.perf_counter()
        for _ in range(rounds):
            predictor.predict(batch)
        batched = rounds * cfg.max_batch_size / (time.perf_counter() - start)
        single = []
        for _ in range(max(10, min(50, cfg.requests // 8))):
            t0 = time.perf_counter()
            predictor.predict(batch[:1])
            single.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {"items_per_s": batched * cfg.model_replicas, "single_ms": statistics.median(single) * 1000.0}


def _plain_server(uri: str, port: int, model_args: dict[str, Any]) -> None:
    """(b): the same API, one uvicorn process, one predictor call per request (spawned process)."""
    import sys

    import uvicorn

    from medfusion.serving.api import create_api
    from medfusion.serving.runtime import LocalBackend, ModelRunner

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - its access log would flood the terminal
    runner = ModelRunner.load(uri, model_args)
    app = create_api(LocalBackend(runner))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(base_url: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{base_url} did not become ready within {timeout_s} s")


def _role(cmdline: str) -> str:
    """Which part of the Serve app (or of Ray) a process of this bench's local cluster is."""
    for marker, role in (
        ("ProxyActor", "proxy"),
        ("MedFusionIngress", "ingress"),
        ("MedFusionDeployment", "model"),
        ("ServeFloor", "replica"),
    ):
        if marker in cmdline:
            return role
    return "ray"  # controller, raylet, GCS, agents


def _cpu_seconds(role_of: Callable[[str], str]) -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) of this process's descendants, by pid, with their role."""
    import psutil

    seconds: dict[int, tuple[str, float]] = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            seconds[child.pid] = (role_of(" ".join(child.cmdline())), times.user + times.system)
        except psutil.Error:  # ended meanwhile
            continue
    return seconds


def _measure(
    base_url: str, body: bytes, content_type: str, cfg: ServeBenchConfig, role_of: Callable[[str], str] = _role
) -> dict[int, dict[str, Any]]:
    """Each concurrency level's summary, with the CPU milliseconds per request of each part (``cpu_ms``:
    the client is this process, the servers its descendants, named by `role_of`)."""
    url = f"{base_url}/v1/predict"
    if cfg.warmup_requests:  # at the first level's concurrency: the batch pacer sizes batches to recent load
        warmup = min(min(cfg.concurrency), cfg.warmup_requests)
        run_load(url, body, content_type, concurrency=warmup, requests=cfg.warmup_requests, max_seconds=cfg.max_seconds)
    results: dict[int, dict[str, Any]] = {}
    for c in cfg.concurrency:
        before, client_before = _cpu_seconds(role_of), time.process_time()
        load = run_load(url, body, content_type, concurrency=c, requests=cfg.requests, max_seconds=cfg.max_seconds)
        after, client_after = _cpu_seconds(role_of), time.process_time()
        cpu_ms: Counter = Counter({"client": client_after - client_before})
        for pid, (role, seconds) in after.items():
            cpu_ms[role] += seconds - before.get(pid, (role, 0.0))[1]
        results[c] = {**load.summary(), "cpu_ms": {k: v * 1000.0 / max(load.requests, 1) for k, v in cpu_ms.items()}}
    return results


def _floor_app(cfg: ServeBenchConfig) -> Any:
    """(d): a Serve deployment that reads the request body and answers a fixed JSON: what Serve's HTTP
    path alone allows on this machine, one replica (as the model's), no model and no parsing."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import Response

    answer = json.dumps({"labels": [], "box": None, "findings": "", "model": {"name": "floor"}}).encode()

    @serve.deployment(name="ServeFloor", num_replicas=cfg.model_replicas, max_ongoing_requests=2 * cfg.max_batch_size)
    class ServeFloor:
        async def __call__(self, request: Request) -> Response:
            await request.body()
            return Response(answer, media_type="application/json")

    return ServeFloor.bind()


def _serve_app(
    uri: str, body: bytes, content_type: str, cfg: ServeBenchConfig, layout: str
) -> dict[int, dict[str, Any]]:
    """(a) in `layout` (split or combined), or (d) for ``layout="floor"``."""
    import ray
    from ray import serve

    from medfusion.serve.app import build_app

    port = _free_port()
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = _floor_app(cfg) if layout == "floor" else build_app(_serve_config(cfg, uri, layout))
        serve.run(app, name="bench", route_prefix="/", blocking=False)
        _wait_ready(f"http://127.0.0.1:{port}")
        return _measure(f"http://127.0.0.1:{port}", body, content_type, cfg)
    finally:
        # ray.shutdown() ends this local cluster's Serve with it; serve.shutdown() first would only add
        # "Task ServeController.graceful_shutdown failed" lines to the table's output.
        ray.shutdown()


def _plain_app(uri: str, body: bytes, content_type: str, cfg: ServeBenchConfig) -> dict[int, dict[str, Any]]:
    import multiprocessing

    from medfusion.serving.settings import model_args

    port = _free_port()
    args = {**model_args(_serve_config(cfg, uri)), "torch_threads": 0}  # a plain app keeps torch's default
    process = multiprocessing.get_context("spawn").Process(target=_plain_server, args=(uri, port, args), daemon=True)
    process.start()
    try:
        _wait_ready(f"http://127.0.0.1:{port}")
        return _measure(f"http://127.0.0.1:{port}", body, content_type, cfg, role_of=lambda _: "server")
    finally:
        process.terminate()
        process.join(timeout=10)


SYSTEM_NAMES = {"split": "serve", "combined": "serve_combined", "floor": "serve_floor"}


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Run (c), (b), (a) and (d) and return the benchmark JSON object (DESIGN.md); prints a table first.

    (a) runs once per layout in `cfg.layouts`: ``serve`` (split: ingress + model deployments) and
    ``serve_combined`` (the model replicas answer HTTP); (d), ``serve_floor``, with `cfg.http_floor`.
    """
    with tempfile.TemporaryDirectory(prefix="medfusion-bench-serve-") as tmp:
        uri = cfg.model or write_untrained_export(os.path.join(tmp, "export"), cfg.preset)
        image, report = _request_sample(cfg)
        body, content_type = encode_multipart(image, report)
        offline = _offline(uri, image, report, cfg)
        systems = {"plain": _plain_app(uri, body, content_type, cfg)}
        for layout in [*cfg.layouts, *(["floor"] if cfg.http_floor else [])]:
            systems[SYSTEM_NAMES[layout]] = _serve_app(uri, body, content_type, cfg, layout)

    figures: dict[str, dict[str, Any]] = {
        "offline_items_per_s": {"value": round(offline["items_per_s"], 1), "unit": "items/s"},
        "offline_single_item_ms": {"value": round(offline["single_ms"], 2), "unit": "ms"},
    }
    print(f"{'system':<16}{'conc':>6}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, results in systems.items():
        for c, s in results.items():
            latencies = "".join(f"{s[f'{q}_ms']:>10.1f}" for q in ("p50", "p95", "p99"))
            print(f"{name:<16}{c:>6}{s['rps']:>10.1f}{latencies}{s['errors']:>8}")
            figures[f"{name}_c{c}_rps"] = {"value": round(s["rps"], 1), "unit": "req/s"}
            figures[f"{name}_c{c}_requests"] = {"value": s["requests"], "unit": "requests"}
            for q in ("p50", "p95", "p99"):
                figures[f"{name}_c{c}_{q}_ms"] = {"value": round(s[f"{q}_ms"], 2), "unit": "ms"}
            figures[f"{name}_c{c}_errors"] = {"value": s["errors"], "unit": "requests"}
    top, low = max(cfg.concurrency), min(cfg.concurrency)
    print(f"CPU ms per request at concurrency {top} (client: the load generator; ray: controller, raylet, GCS):")
    for name, results in systems.items():
        cpu_ms = {role: ms for role, ms in sorted(results[top]["cpu_ms"].items(), key=lambda kv: -kv[1]) if ms >= 0.005}
        total = sum(cpu_ms.values())
        print(f"  {name:<16}" + ", ".join(f"{role} {ms:.2f}" for role, ms in cpu_ms.items()) + f" (total {total:.2f})")
        for role, ms in cpu_ms.items():
            figures[f"{name}_c{top}_cpu_ms_{role}"] = {"value": round(ms, 3), "unit": "CPU ms/request"}
    print(f"offline ceiling {offline['items_per_s']:.1f} items/s; one item {offline['single_ms']:.2f} ms")
    terms: dict[str, tuple[str, str]] = {}
    for name in (SYSTEM_NAMES[layout] for layout in cfg.layouts):
        for c in cfg.concurrency:
            terms[f"{name}_vs_plain_c{c}"] = (f"{name}_c{c}_rps", f"plain_c{c}_rps")
        terms[f"{name}_vs_offline_c{top}"] = (f"{name}_c{top}_rps", "offline_items_per_s")
        figures[f"{name}_c{low}_p50_minus_forward_ms"] = {
            "value": round(systems[name][low]["p50_ms"] - offline["single_ms"], 2),
            "unit": "ms",
        }
    if cfg.http_floor:
        terms[f"serve_floor_vs_offline_c{top}"] = (f"serve_floor_c{top}_rps", "offline_items_per_s")
    ratios = ratios_of(figures, terms)
    print("ratios: " + ", ".join(f"{k} {v}" for k, v in ratios.items()))
    return {
        "bench": "serve",
        "config": {**asdict(cfg), "cores": os.cpu_count()},
        "figures": figures,
        "ratios": ratios,
        "ratio_of": ratio_terms(terms),
    }


if __name__ == "__main__":  # pragma: no cover - `python -m medfusion.bench.serve` before the CLI has the command
    print(json.dumps(run_serve_bench(ServeBenchConfig())))
