"""`medfusion bench serve`: the Serve app vs plain FastAPI/uvicorn (batched and not) vs the offline model.

All of them serve the same trained export (a short fit of `preset` on synthetic data, cached; see
`trained_export`) and answer the same pool of varied requests (`request_pool` different synthetic
images and notes, none seen in the fit, cycled by the load generator), so decode lengths vary as the
model ends its findings with <eos>:

(a) The Ray Serve application of `medfusion.serve.app` on an embedded Ray started with the app's
    SERVE_ENVIRONMENT (Serve's throughput mode; RAY_SERVE_THROUGHPUT_OPTIMIZED=0 in the bench's own
    environment measures Serve without it): dynamic batching in the model deployment,
    `model_replicas` fixed replicas (no autoscaling, so the figures are comparable); once per layout:
    ``serve`` (split: an ingress deployment in front) and ``serve_combined`` (the model answers HTTP).
(b) ``fastapi_unbatched``: the same FastAPI app (`medfusion.serving.api.create_api`: same parsing,
    validation and logging) in one uvicorn process, calling the predictor once per request, with
    torch's default threads: a plain server as one would first write it.
(b') ``fastapi_batched``: the same app in one uvicorn process with the Serve model deployment's own
    batching (`BatchedLocalBackend`: the same `BatchPacer`, max_batch_size and batch_wait_timeout_s)
    and its torch threads. (a)/(b') is what Serve itself costs; (a)/(b) mixes that with batching.
(c) The ceiling: `Predictor.predict` on batches of `max_batch_size` of the request pool in this
    process (decode, forward and beam search; no HTTP) for `ceiling_seconds`, with the replica's
    torch threads, times the replicas; and the time of one single-item prediction (what a request at
    concurrency 1 cannot go below).
(d) ``serve_http_floor``: one Serve replica that reads the body and answers a fixed JSON, no model.
    On a few CPU cores this, not the model, can bound (a): (d)/(c) is the best (a)/(c) any Serve app
    could reach on the machine.

The whole sequence (c), (b), (b'), (a), (d) runs `repetitions` times; each repetition starts every
server afresh, so a drift of the machine's load touches every system alike and the spread includes
start-up. A figure without a ``_repN`` suffix is the median over the repetitions (request and error
counts: the sum); each ratio is the quotient of the two figures `ratio_of` names, so the headline
ratios are ratios of medians, and ``ratio_spread`` gives min, median and max of the same ratio over the
repetitions (each in ``ratios`` as ``<ratio>_repN``).

The load generator is closed-loop (each of `concurrency` clients sends its next request when the
previous one is answered), on loopback, bounded by `requests` and `max_seconds` per level. At the
highest level the bench also prints where each system's CPU went, in ms per request: the load
generator, Serve's proxy, the ingress and model replicas, Ray's own processes (psutil).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medfusion.bench.record import ratio_terms, ratios_of
from medfusion.config import PRESETS, ServeConfig, check
from medfusion.loader import load_config

SERVE_LAYOUTS = ("split", "combined")
# Bump when the fit below changes, so that cached exports of an older fit are not reused.
FIT_VERSION = 1
# The served goals (issue 18): what Serve may cost against the same batching without it, and how close
# it comes to the model alone where the HTTP side has cores of its own.
GOAL = 0.8
FIT_BATCH_SIZE, FIT_LR, FIT_SEED = 32, 3e-3, 0
POOL_SEED = 7  # the requests: synthetic samples the fit (seed FIT_SEED) never saw


@dataclass
class ServeBenchConfig:
    """`medfusion bench serve`: the Serve app (batched) vs plain FastAPI/uvicorn vs offline forward."""

    model: str = ""
    """Export to serve (path or s3://); empty serves a short fit of `preset` (cached, see cache_dir)."""
    preset: str = "tiny"
    """Size preset of that fit: tiny (the HTTP path dominates on CPU), small, base or cxr."""
    fit_samples: int = 320
    """Synthetic samples of that fit."""
    fit_epochs: int = 16
    """Epochs of that fit: enough for the findings to end with <eos> (tests/models/test_fit.py)."""
    cache_dir: str = ""
    """Where fitted exports are kept, one folder per preset and fit settings; empty:
    $XDG_CACHE_HOME/medfusion/bench/serve (~/.cache/... without it)."""
    request_pool: int = 64
    """Different requests (synthetic images and notes, none seen in the fit) cycled by every system."""
    repetitions: int = 3
    """Times the whole sequence of systems runs (each server started afresh); figures are medians."""
    ceiling_seconds: float = 10.0
    """Time the offline ceiling is measured for, per repetition."""
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
        check(self.fit_samples >= 32, "fit_samples", f"must be >= 32, got {self.fit_samples}")
        check(self.fit_epochs >= 1, "fit_epochs", f"must be >= 1, got {self.fit_epochs}")
        check(self.request_pool >= 1, "request_pool", f"must be >= 1, got {self.request_pool}")
        check(1 <= self.repetitions <= 20, "repetitions", f"must be in [1, 20], got {self.repetitions}")
        check(0 < self.ceiling_seconds <= 600, "ceiling_seconds", f"must be in (0, 600], got {self.ceiling_seconds}")
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


def encode_multipart(image: bytes, report: str | None, boundary: str = "") -> tuple[bytes, str]:
    """A multipart/form-data body with the `image` file and the optional `report` field, and its type.

    Bodies encoded with the same `boundary` share one content type (a fresh one when empty).
    """
    boundary = boundary or uuid.uuid4().hex
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
    body: bytes | Sequence[bytes],
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

    A sequence of bodies (of one content type) is cycled: request n sends ``body[n % len(body)]``.

    The client is aiohttp: it shares the machine's cores with the servers it measures and costs about
    a third of httpx's CPU per request. `on_response` is called with each `Answer` (e.g. to collect
    model versions or headers).
    """
    import aiohttp

    bodies = [body] if isinstance(body, bytes) else list(body)
    result = LoadResult()
    sent = 0
    deadline = time.monotonic() + max_seconds
    send_headers = {"content-type": content_type, **(headers or {})}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def client_loop(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < requests and time.monotonic() < deadline:
            data = bodies[sent % len(bodies)]
            sent += 1
            start = time.perf_counter()
            try:
                async with session.post(url, data=data, headers=send_headers) as response:
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


def run_load(url: str, body: bytes | Sequence[bytes], content_type: str, **kwargs: Any) -> LoadResult:
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


def _fit_settings(cfg: ServeBenchConfig) -> dict[str, Any]:
    """What the fitted export depends on (its cache key): an export of another format is fitted again."""
    from medfusion.export import FORMAT_VERSION

    return {
        "fit_version": FIT_VERSION,
        "export_format": FORMAT_VERSION,
        "preset": cfg.preset,
        "samples": cfg.fit_samples,
        "epochs": cfg.fit_epochs,
        "batch_size": FIT_BATCH_SIZE,
        "lr": FIT_LR,
        "seed": FIT_SEED,
    }


def write_trained_export(uri: str, settings: Mapping[str, Any]) -> str:
    """A short in-process fit of a size preset on synthetic data (`_fit_settings`), exported to `uri`.

    The loop is the quick fit of the model tests (AdamW, one-cycle schedule, clipping at 1.0) on the
    preset's image size and token limits; enough for the findings to end with <eos>, so that decode
    lengths vary with the request as they do for a trained model.
    """
    import torch

    from medfusion.config import DataConfig, SynthConfig
    from medfusion.data import synth
    from medfusion.data.batches import collate
    from medfusion.data.tokenizer import Tokenizer
    from medfusion.export import export_model
    from medfusion.loader import preset_values
    from medfusion.models import create_model, to_tensors
    from medfusion.models.fitting import train_epochs

    preset, rows, epochs = settings["preset"], int(settings["samples"]), int(settings["epochs"])
    batch_size, lr = int(settings["batch_size"]), float(settings["lr"])
    data = DataConfig(**{k: v for k, v in preset_values(preset, "data").items() if k != "batch_size"})
    synth_cfg = SynthConfig(num_samples=rows, image_size=data.image_size, seed=int(settings["seed"]))
    samples = list(synth.generate(synth_cfg))
    classes = synth.class_names(synth_cfg)
    tokenizer = Tokenizer.build(s.report + " " + s.findings for s in samples)
    columns = {key: [getattr(s, key) for s in samples] for key in ("image", "report", "findings", "labels", "box")}
    train = to_tensors(
        collate(
            columns,
            tokenizer=tokenizer,
            num_classes=len(classes),
            image_size=data.image_size,
            max_report_tokens=data.max_report_tokens,
            max_findings_tokens=data.max_findings_tokens,
        )
    )
    torch.manual_seed(int(settings["seed"]))
    model = create_model(f"medfusion_{preset}", len(tokenizer), len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-rows // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    losses = train_epochs(model, train, epochs=epochs, batch_size=batch_size, optimizer=optimizer, schedule=schedule)
    export_model(
        model.eval(),
        uri,
        tokenizer=tokenizer,
        classes=classes,
        data_settings=data,
        metrics={"first_epoch_loss": losses[0], "last_epoch_loss": losses[-1]},
        lineage={"source": "medfusion bench serve: a short fit on synthetic data", "fit": dict(settings)},
    )
    return uri


def cache_root(cfg: ServeBenchConfig) -> Path:
    """The folder of the bench's fitted exports (`cache_dir`, or the user's cache folder)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medfusion" / "bench" / "serve"


def trained_export(cfg: ServeBenchConfig) -> str:
    """The fitted export of `cfg.preset` (`write_trained_export`), fitted once per preset and fit settings
    and kept under `cache_root`, named ``<preset>-<hash of the settings>``; later runs reuse it."""
    settings = _fit_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root(cfg) / f"{cfg.preset}-{digest}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return str(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write_trained_export(str(partial / "export"), settings)
        try:
            os.replace(partial / "export", folder)  # whole or absent, also with a concurrent run
        except OSError:
            if not (folder / "config.json").is_file():  # another run's fit landed first: use that one
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return str(folder)


def make_request_pool(cfg: ServeBenchConfig) -> list[dict[str, Any]]:
    """`cfg.request_pool` different requests ``{"image": PNG bytes, "report": note or None}``: synthetic
    samples of another seed than the fit's, at `cfg.image_size`."""
    from medfusion.config import SynthConfig
    from medfusion.data import synth

    samples = synth.generate(SynthConfig(num_samples=cfg.request_pool, image_size=cfg.image_size, seed=POOL_SEED))
    return [{"image": s.image, "report": s.report if cfg.with_report else None} for s in samples]


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


def _offline(uri: str, pool: Sequence[Mapping[str, Any]], cfg: ServeBenchConfig) -> dict[str, float]:
    """(c): batches of the pool, cycled, for `cfg.ceiling_seconds`; and single items (median)."""
    import torch

    from medfusion.predictor import Predictor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what one model replica gets (ServeConfig.torch_threads=1 above)
    try:
        predictor = Predictor.from_export(uri, batch_size=cfg.max_batch_size)
        size = cfg.max_batch_size
        batches = [[pool[(start + i) % len(pool)] for i in range(size)] for start in range(0, len(pool), size)]
        answers = predictor.predict(batches[0])  # warm up
        items, start = 0, time.perf_counter()
        while time.perf_counter() - start < cfg.ceiling_seconds:
            answers = predictor.predict(batches[items // size % len(batches)])
            items += len(answers)
        seconds = time.perf_counter() - start
        single = []
        for item in pool[: max(10, min(len(pool), cfg.requests // 8))]:
            t0 = time.perf_counter()
            predictor.predict([item])
            single.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return {
        "items_per_s": items / seconds * cfg.model_replicas,
        "items": items,
        "seconds": seconds,
        "single_ms": statistics.median(single) * 1000.0,
    }


def findings_words(uri: str, pool: Sequence[Mapping[str, Any]]) -> list[int]:
    """Words of the findings the export writes for each request of the pool (varied: it ends with <eos>)."""
    from medfusion.predictor import Predictor

    return [len((a.get("findings") or "").split()) for a in Predictor.from_export(uri).predict(list(pool))]


class BatchedLocalBackend:
    """(b'): the Serve model deployment's batching without Serve, for the plain FastAPI app.

    As `medfusion.serve.app`'s ``@serve.batch`` over `BatchPacer`: a batch takes the size and wait the
    pacer gave its first request, closes when full or when that wait has passed, and is handed to the
    runner while the next batch gathers; the runner's one model thread runs batches one at a time.
    """

    def __init__(self, runner: Any, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        from medfusion.serving.runtime import BatchPacer

        self.runner = runner
        self.pacer = BatchPacer(max_batch_size, batch_wait_timeout_s)
        self.batch_sizes: Counter = Counter()
        self._queue: asyncio.Queue | None = None
        self._gather: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    async def predict(self, item: dict[str, Any]) -> dict[str, Any]:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._gather = asyncio.create_task(self._gather_batches())
        size, wait_s = self.pacer.arrive()
        answer: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, answer, size, wait_s))
            return await answer
        finally:
            self.pacer.leave()

    async def _gather_batches(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            item, answer, size, wait_s = await self._queue.get()
            batch, deadline = [(item, answer)], loop.time() + wait_s
            while len(batch) < size:
                if self._queue.empty():
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        queued = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                else:
                    queued = self._queue.get_nowait()
                batch.append(queued[:2])
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[tuple[dict[str, Any], asyncio.Future]]) -> None:
        live = [(item, answer) for item, answer in batch if not answer.done()]  # a 504 cancelled the rest
        if not live:
            return
        self.batch_sizes[len(live)] += 1
        try:
            results = await self.runner.predict([item for item, _ in live])
        except Exception as err:
            for _, answer in live:
                if not answer.done():
                    answer.set_exception(err)
            return
        for (_, answer), result in zip(live, results):
            if not answer.done():
                answer.set_result(result)

    async def info(self) -> dict[str, Any]:
        return self.runner.info

    async def readiness(self) -> str:
        return "ready"


def _plain_server(uri: str, port: int, model_args: dict[str, Any], batched: bool) -> None:
    """(b) or, `batched`, (b'): the same API in one uvicorn process (spawned process)."""
    import sys

    import uvicorn

    from medfusion.serving.api import create_api
    from medfusion.serving.runtime import LocalBackend, ModelRunner

    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - its access log would flood the terminal
    runner = ModelRunner.load(uri, model_args)
    backend: Any = LocalBackend(runner)
    if batched:
        backend = BatchedLocalBackend(
            runner, int(model_args["max_batch_size"]), float(model_args["batch_wait_timeout_s"])
        )
    uvicorn.run(create_api(backend), host="127.0.0.1", port=port, log_level="warning", access_log=False)


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
    base_url: str,
    body: bytes | Sequence[bytes],
    content_type: str,
    cfg: ServeBenchConfig,
    role_of: Callable[[str], str] = _role,
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
    uri: str, body: bytes | Sequence[bytes], content_type: str, cfg: ServeBenchConfig, layout: str
) -> dict[int, dict[str, Any]]:
    """(a) in `layout` (split or combined), or (d) for ``layout="floor"``."""
    from medfusion.serving.settings import export_serve_environment

    export_serve_environment()  # as `medfusion serve` and the image run Serve, before Ray starts here
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


def _plain_app(
    uri: str, body: Sequence[bytes], content_type: str, cfg: ServeBenchConfig, batched: bool
) -> dict[int, dict[str, Any]]:
    """(b), or (b') with `batched`: the Serve model replica's settings (batching, torch threads)."""
    import multiprocessing

    from medfusion.serving.settings import model_args

    port = _free_port()
    args = model_args(_serve_config(cfg, uri))
    if not batched:
        args["torch_threads"] = 0  # the unbatched app keeps torch's default, as a first plain server would
    process = multiprocessing.get_context("spawn").Process(
        target=_plain_server, args=(uri, port, args, batched), daemon=True
    )
    process.start()
    try:
        _wait_ready(f"http://127.0.0.1:{port}")
        return _measure(f"http://127.0.0.1:{port}", body, content_type, cfg, role_of=lambda _: "server")
    finally:
        process.terminate()
        process.join(timeout=10)


SYSTEM_NAMES = {"split": "serve", "combined": "serve_combined", "floor": "serve_http_floor"}
PLAIN_SYSTEMS = ("fastapi_unbatched", "fastapi_batched")


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def bench_record(
    cfg: ServeBenchConfig,
    offline: Sequence[Mapping[str, float]],
    systems: Mapping[str, Sequence[Mapping[int, Mapping[str, Any]]]],
    words: Sequence[int] = (),
) -> dict[str, Any]:
    """The benchmark JSON object (DESIGN.md) from each repetition's measurements.

    Args:
        offline: `_offline` of each repetition.
        systems: for each system, `_measure` of each repetition (same number of repetitions as offline).
        words: findings words of each request of the pool (`findings_words`).
    """
    reps = len(offline)
    top = max(cfg.concurrency)
    figures: dict[str, dict[str, Any]] = {}

    def put(name: str, value: float | None, unit: str, digits: int = 1) -> None:
        figures[name] = {"value": None if value is None else round(value, digits), "unit": unit}

    for r, run in enumerate(offline, 1):
        put(f"offline_items_per_s_rep{r}", run["items_per_s"], "items/s")
    put(
        "offline_items_per_s",
        _median([figures[f"offline_items_per_s_rep{r}"]["value"] for r in range(1, reps + 1)]),
        "items/s",
    )
    put("offline_items", sum(run["items"] for run in offline), "items", 0)
    put("offline_seconds_min", min(run["seconds"] for run in offline), "s", 2)
    put("offline_single_item_ms", _median([run["single_ms"] for run in offline]), "ms", 2)
    if words:
        for stat, value in (("min", min(words)), ("median", _median(words)), ("max", max(words))):
            put(f"findings_words_{stat}", value, "words", 1)
    for name, runs in systems.items():
        for c in cfg.concurrency:
            for r, run in enumerate(runs, 1):
                put(f"{name}_c{c}_rps_rep{r}", run[c]["rps"], "req/s")
            put(
                f"{name}_c{c}_rps",
                _median([figures[f"{name}_c{c}_rps_rep{r}"]["value"] for r in range(1, reps + 1)]),
                "req/s",
            )
            put(f"{name}_c{c}_requests", sum(run[c]["requests"] for run in runs), "requests", 0)
            for q in ("p50", "p95", "p99"):
                put(f"{name}_c{c}_{q}_ms", _median([run[c][f"{q}_ms"] for run in runs]), "ms", 2)
            put(f"{name}_c{c}_errors", sum(run[c]["errors"] for run in runs), "requests", 0)
        cpu: Counter = Counter()
        for run in runs:
            cpu.update(run[top]["cpu_ms"])
        for role, ms in cpu.items():
            if ms / reps >= 0.005:
                put(f"{name}_c{top}_cpu_ms_{role}", ms / reps, "CPU ms/request", 3)

    served = [SYSTEM_NAMES[layout] for layout in cfg.layouts]
    headline: dict[str, tuple[str, str]] = {}  # each also per repetition
    for name in served:
        headline[f"{name}_vs_fastapi_batched_c{top}"] = (f"{name}_c{top}_rps", f"fastapi_batched_c{top}_rps")
        headline[f"{name}_vs_offline_c{top}"] = (f"{name}_c{top}_rps", "offline_items_per_s")
    headline[f"fastapi_batched_vs_fastapi_unbatched_c{top}"] = (
        f"fastapi_batched_c{top}_rps",
        f"fastapi_unbatched_c{top}_rps",
    )
    headline[f"fastapi_batched_vs_offline_c{top}"] = (f"fastapi_batched_c{top}_rps", "offline_items_per_s")
    if cfg.http_floor:
        headline[f"serve_http_floor_vs_offline_c{top}"] = (f"serve_http_floor_c{top}_rps", "offline_items_per_s")
    terms: dict[str, tuple[str, str]] = {}
    for name in served:
        for c in cfg.concurrency:
            terms[f"{name}_vs_fastapi_batched_c{c}"] = (f"{name}_c{c}_rps", f"fastapi_batched_c{c}_rps")
            terms[f"{name}_vs_fastapi_unbatched_c{c}"] = (f"{name}_c{c}_rps", f"fastapi_unbatched_c{c}_rps")
    terms.update(headline)
    for ratio, (numerator, denominator) in headline.items():
        for r in range(1, reps + 1):
            terms[f"{ratio}_rep{r}"] = (f"{numerator}_rep{r}", f"{denominator}_rep{r}")
    for name in served:
        low = min(cfg.concurrency)
        put(
            f"{name}_c{low}_p50_minus_forward_ms",
            figures[f"{name}_c{low}_p50_ms"]["value"] - figures["offline_single_item_ms"]["value"],
            "ms",
            2,
        )
    ratios = ratios_of(figures, terms)
    spread = {}
    for ratio in headline:
        values = [ratios[f"{ratio}_rep{r}"] for r in range(1, reps + 1)]
        known = [v for v in values if v is not None]
        spread[ratio] = {
            "min": min(known) if known else None,
            "median": round(_median(known), 3) if known else None,
            "max": max(known) if known else None,
        }
    goals = {
        f"serve_vs_fastapi_batched_c{top}": {
            "target": GOAL,
            "ratio": ratios.get(f"serve_vs_fastapi_batched_c{top}"),
            "applies": True,
        },
        f"serve_vs_offline_c{top}": {
            "target": GOAL,
            "ratio": ratios.get(f"serve_vs_offline_c{top}"),
            # The proxy, the ingress and the load generator each want a core besides the model's.
            "applies": (os.cpu_count() or 1) >= cfg.model_replicas + 3,
        },
    }
    for goal in goals.values():
        goal["met"] = goal["ratio"] is not None and goal["ratio"] >= GOAL
    return {
        "bench": "serve",
        "config": {**asdict(cfg), "cores": os.cpu_count(), "load_average": list(os.getloadavg())},
        "figures": figures,
        "ratios": ratios,
        "ratio_of": ratio_terms(terms),
        "ratio_spread": spread,
        "goals": goals,
    }


def _print_tables(cfg: ServeBenchConfig, record: Mapping[str, Any], systems: Sequence[str]) -> None:
    figures, top = record["figures"], max(cfg.concurrency)
    print(f"{'system':<20}{'conc':>6}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'errors':>8}   (medians)")
    for name in systems:
        for c in cfg.concurrency:
            row = "".join(f"{figures[f'{name}_c{c}_{q}']['value']:>10}" for q in ("rps", "p50_ms", "p95_ms", "p99_ms"))
            print(f"{name:<20}{c:>6}{row}{figures[f'{name}_c{c}_errors']['value']:>8}")
    print(f"CPU ms per request at concurrency {top} (client: the load generator; ray: controller, raylet, GCS):")
    for name in systems:
        prefix = f"{name}_c{top}_cpu_ms_"
        cpu = {k[len(prefix) :]: f["value"] for k, f in figures.items() if k.startswith(prefix)}
        parts = ", ".join(f"{role} {ms:.2f}" for role, ms in sorted(cpu.items(), key=lambda kv: -kv[1]))
        print(f"  {name:<20}{parts} (total {sum(cpu.values()):.2f})")
    print(
        f"offline ceiling {figures['offline_items_per_s']['value']} items/s (median of {cfg.repetitions} x"
        f" >= {cfg.ceiling_seconds:g} s); one item {figures['offline_single_item_ms']['value']} ms"
    )
    for ratio, spread in record["ratio_spread"].items():
        print(f"{ratio:<44}{record['ratios'][ratio]!s:>8}  (per repetition {spread['min']} .. {spread['max']})")


def run_serve_bench(cfg: ServeBenchConfig) -> dict[str, Any]:
    """Run (c), (b), (b'), (a) and (d) `cfg.repetitions` times; print tables, return the JSON object.

    (a) runs once per layout in `cfg.layouts`: ``serve`` (split: ingress + model deployments) and
    ``serve_combined`` (the model replicas answer HTTP); (d), ``serve_http_floor``, with `cfg.http_floor`.
    """
    uri = cfg.model or trained_export(cfg)
    pool = make_request_pool(cfg)
    boundary = uuid.uuid4().hex
    encoded = [encode_multipart(item["image"], item["report"], boundary) for item in pool]
    bodies, content_type = [body for body, _ in encoded], encoded[0][1]
    names = [*PLAIN_SYSTEMS, *(SYSTEM_NAMES[layout] for layout in cfg.layouts)]
    names += [SYSTEM_NAMES["floor"]] if cfg.http_floor else []
    offline: list[dict[str, float]] = []
    systems: dict[str, list[dict[int, dict[str, Any]]]] = {name: [] for name in names}
    for _ in range(cfg.repetitions):
        offline.append(_offline(uri, pool, cfg))
        for batched, name in enumerate(PLAIN_SYSTEMS):
            systems[name].append(_plain_app(uri, bodies, content_type, cfg, batched=bool(batched)))
        for layout in [*cfg.layouts, *(["floor"] if cfg.http_floor else [])]:
            systems[SYSTEM_NAMES[layout]].append(_serve_app(uri, bodies, content_type, cfg, layout))
    record = bench_record(cfg, offline, systems, findings_words(uri, pool))
    record["config"]["model"] = uri
    _print_tables(cfg, record, names)
    return record


if __name__ == "__main__":  # pragma: no cover - `python -m medfusion.bench.serve` before the CLI has the command
    print(json.dumps(run_serve_bench(ServeBenchConfig())))
