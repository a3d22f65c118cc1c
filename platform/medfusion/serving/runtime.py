"""The model side of serving: the loaded model answering batches, the batch pacing, the metrics, and
the backends the HTTP API calls (a Serve handle to the model deployment, or a local runner).

Ray is imported lazily (by `ServeMetrics` and `HandleBackend` only), so the plain FastAPI baseline of
`medfusion bench serve` and the unit tests run this without Ray.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from medfusion.config import ServeLimitsConfig
from medfusion.serving.parsing import ApiError

READY_TIMEOUT_S = 2.0
READY_FRESH_S = 10.0
EXPIRED = "the request's deadline passed before the model reached it (its client got a 504)"


class ServeMetrics:
    """Prometheus metrics through ray.serve.metrics (tagged with deployment and replica); no-op when off."""

    LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
    BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from ray.serve import metrics

        self._requests = metrics.Counter(
            "medfusion_requests", description="HTTP requests by route and status", tag_keys=("route", "status")
        )
        self._errors = metrics.Counter(
            "medfusion_errors", description="Refused or failed requests by error code", tag_keys=("error",)
        )
        self._latency = metrics.Histogram(
            "medfusion_request_latency_ms",
            description="Request latency in the ingress",
            boundaries=self.LATENCY_MS,
            tag_keys=("route",),
        )
        self._batch_size = metrics.Histogram(
            "medfusion_batch_size", description="Items per model batch", boundaries=self.BATCH_SIZES
        )
        self._batch_latency = metrics.Histogram(
            "medfusion_batch_latency_ms",
            description="Model time per batch (decode, forward, beam search)",
            boundaries=self.LATENCY_MS,
        )
        self._item_errors = metrics.Counter("medfusion_bad_items", description="Batch items the model could not read")

    def request(self, route: str, status: int, error: str | None, seconds: float) -> None:
        if not self.enabled:
            return
        self._requests.inc(tags={"route": route, "status": str(status)})
        self._latency.observe(seconds * 1000.0, tags={"route": route})
        if error:
            self._errors.inc(tags={"error": error})

    def batch(self, size: int, seconds: float, bad_items: int) -> None:
        if not self.enabled:
            return
        self._batch_size.observe(size)
        self._batch_latency.observe(seconds * 1000.0)
        if bad_items:
            self._item_errors.inc(bad_items)


class BatchPacer:
    """Size and wait of the next dynamic batch, from how many requests the replica held at once lately.

    A fixed batch wait serves neither end: a short one makes batches of one under load, each paying
    the whole per-call cost (several times the per-item cost of a full batch), and a long one delays
    every lone request. With the pacer a batch closes once it holds as many requests as the replica
    held at once in the last `window_s` (at most `max_batch_size`), or after `max_wait_s`: at low
    load a request runs at once; under load batches fill to the load.
    """

    def __init__(self, max_batch_size: int, max_wait_s: float, window_s: float = 1.0) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.window_s = window_s
        self.ongoing = 0
        self._peaks: collections.deque[tuple[float, int]] = collections.deque()  # sliding-window maximum

    def arrive(self) -> tuple[int, float]:
        """Count a request in; return (max batch size, wait) for a batch it would start."""
        self.ongoing += 1
        now = time.monotonic()
        while self._peaks and self._peaks[-1][1] <= self.ongoing:
            self._peaks.pop()
        self._peaks.append((now, self.ongoing))
        while self._peaks[0][0] < now - self.window_s:
            self._peaks.popleft()
        size = min(self.max_batch_size, self._peaks[0][1])
        return size, self.max_wait_s if size > 1 else 0.0

    def leave(self) -> None:
        """Count a request out (answered, failed or cancelled)."""
        self.ongoing -= 1


class ModelRunner:
    """A loaded Predictor answering batches off the event loop; each result names the model version.

    Predictions run on one dedicated thread: torch keeps per-thread state, and a call that lands on
    another thread of a pool (asyncio.to_thread) pays for setting it up again.
    """

    def __init__(self, predictor: Any, metrics: ServeMetrics | None = None, registered: str = "") -> None:
        self.predictor = predictor
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medfusion-model")
        self.metrics = metrics or ServeMetrics(enabled=False)
        self.registered = registered
        # The error of the last batch that failed as a whole (bad input fails per item instead): a lost
        # device or memory exhausted; a later batch that succeeds clears it.
        self.failure: BaseException | None = None
        info = predictor.info
        self.model = {"name": info["model_name"], "version": info["version"]}
        if registered:  # NAME:VERSION in the model registry, when loaded from there
            self.model["registered"] = registered

    @classmethod
    def load(
        cls, uri: str, args: Mapping[str, Any], metrics: ServeMetrics | None = None, warm_up: bool = True
    ) -> ModelRunner:
        """Load the export at `uri` with `model_args` settings; optionally run one warm-up prediction."""
        import torch

        from medfusion.predictor import Predictor

        if args.get("torch_threads"):
            torch.set_num_threads(int(args["torch_threads"]))
        predictor = Predictor.from_export(
            uri,
            device=str(args.get("device", "cpu")),
            beam_size=int(args.get("beam_size") or 0) or None,
            max_decode_len=int(args.get("max_decode_len") or 0) or None,
            batch_size=int(args.get("max_batch_size", 16)),
            max_pixels=int(args.get("max_pixels", ServeLimitsConfig.max_pixels)),
        )
        from medfusion.registry import registered_as

        runner = cls(predictor, metrics, registered=registered_as(uri))
        if warm_up:  # the first forward pays lazy initialization (on the model thread); before any traffic
            warm = [{"image": _blank_png(predictor.image_size), "report": "warm up"}]
            runner._thread.submit(runner.predict_now, warm).result()
        return runner

    @property
    def info(self) -> dict[str, Any]:
        """The predictor's info, plus ``registered`` (NAME:VERSION) when it came from the registry."""
        return {**self.predictor.info, **({"registered": self.registered} if self.registered else {})}

    def predict_now(self, items: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Predict `items` in this thread (errors per item, as ``{"error", "index"}``).

        An item may carry a ``deadline`` (wall-clock seconds, `time.time()`): one already past it is
        answered with an error and never decoded, since its client has had its 504.
        """
        start = time.perf_counter()
        now = time.time()
        live = [i for i, item in enumerate(items) if item.get("deadline", math.inf) > now]
        try:
            answers = self.predictor.predict(
                [{k: v for k, v in items[i].items() if k != "deadline"} for i in live], errors="return"
            )
        except Exception as err:
            self.failure = err
            raise
        self.failure = None
        results: list[dict[str, Any]] = [{"error": EXPIRED, "index": i} for i in range(len(items))]
        for i, answer in zip(live, answers):
            results[i] = {**answer, "index": i} if "error" in answer else answer
        bad = sum(1 for r in results if "error" in r)
        self.metrics.batch(len(items), time.perf_counter() - start, bad)
        return [r if "error" in r else {**r, "model": self.model} for r in results]

    def check_health(self) -> None:
        """Raise when this runner cannot answer: its model thread is gone, or its last batch failed as a
        whole. Serve calls it through the deployments' ``check_health`` and replaces a replica that
        keeps failing it; it never runs the model, so a replica busy with a long batch stays healthy.

        Raises:
            RuntimeError: naming what is wrong.
        """
        if getattr(self._thread, "_shutdown", False):
            raise RuntimeError("the model thread has shut down")
        if self.failure is not None:
            raise RuntimeError(f"the last batch failed as a whole: {type(self.failure).__name__}: {self.failure}")

    async def predict(self, items: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """`predict_now` on the model thread, so decoding and the forward never block the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, self.predict_now, items)


def _blank_png(size: int) -> bytes:
    import numpy as np

    from medfusion.data.images import encode_png

    return encode_png(np.full((size, size), 128, dtype=np.uint8))


class Backend(Protocol):
    """What the API calls for predictions: a Serve handle to the batched model, or a local runner."""

    async def predict(self, item: dict[str, Any]) -> dict[str, Any]: ...

    async def info(self) -> dict[str, Any]: ...

    async def readiness(self) -> str:
        """``ready``; ``busy`` (loaded, but no replica answered in time); ``loading`` (no replica has
        loaded the model yet); or ``unavailable`` (no replica can answer)."""
        ...


class LocalBackend:
    """One prediction per request in a worker thread, no batching: the plain baseline and tests."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    async def predict(self, item: dict[str, Any]) -> dict[str, Any]:
        return (await self.runner.predict([item]))[0]

    async def info(self) -> dict[str, Any]:
        return self.runner.info

    async def readiness(self) -> str:
        return "ready"


class HandleBackend:
    """Calls the model deployment through a Serve DeploymentHandle (batched on the replica side).

    Args:
        handle: the model deployment's handle.
        retry_after_s: Retry-After of its 503 answers.
        probe_timeout_s: how long the readiness probe waits for a replica.
        running_replicas: how many replicas of the model deployment are RUNNING (have loaded the
            model); by default asked of Serve's controller, only when a probe times out.
    """

    def __init__(
        self,
        handle: Any,
        retry_after_s: float = 1.0,
        probe_timeout_s: float = READY_TIMEOUT_S,
        running_replicas: Callable[[], int] | None = None,
    ) -> None:
        self.handle = handle
        self.retry_headers = {"Retry-After": str(math.ceil(retry_after_s))}
        self.probe_timeout_s = probe_timeout_s
        self.running_replicas = running_replicas or self._running_replicas
        self._answered_at = -math.inf  # when a model replica last answered

    async def predict(self, item: dict[str, Any]) -> dict[str, Any]:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        for attempt in range(2):
            response = self.handle.predict.remote(item)
            try:
                result = await response
                self._answered_at = time.monotonic()
                return result
            except asyncio.CancelledError:
                # The API gave up (504) or the client left: awaiting a Serve response does not cancel
                # it, and the model would decode the request for no one.
                response.cancel()
                raise
            except BackPressureError:
                detail = "the model's request queue is full; retry later"
                raise ApiError(503, "overloaded", detail, self.retry_headers) from None
            except (RayActorError, DeploymentUnavailableError):
                # A replica died under this request (it is idempotent): one retry goes to another.
                if attempt:
                    detail = "no model replica could answer; retry later"
                    raise ApiError(503, "unavailable", detail, self.retry_headers) from None
        raise AssertionError("unreachable")

    async def info(self) -> dict[str, Any]:
        return await self.handle.info.remote()

    async def readiness(self) -> str:
        # A replica that answered recently proves readiness; a probe queues behind the model, so one
        # that times out means busy when a replica has loaded the model, and only then: taking a busy
        # (healthy) server out of its load balancer would move its load onto the others.
        if time.monotonic() - self._answered_at < READY_FRESH_S:
            return "ready"
        probe = self.handle.ready.remote()
        try:
            ready = bool(await asyncio.wait_for(_awaited(probe), self.probe_timeout_s))
        except asyncio.TimeoutError:
            probe.cancel()  # not left in the model's queue
            try:
                running = await asyncio.wait_for(asyncio.to_thread(self.running_replicas), self.probe_timeout_s)
            except Exception:  # noqa: BLE001 - the controller did not say: assume nothing is loaded
                running = 0
            return "busy" if running else "loading"
        except Exception:  # noqa: BLE001 - the probe failed: no replica can answer
            return "unavailable"
        if ready:
            self._answered_at = time.monotonic()
        return "ready" if ready else "loading"

    def _running_replicas(self) -> int:
        from ray import serve

        app = serve.status().applications.get(self.handle.app_name)
        deployment = app.deployments.get(self.handle.deployment_name) if app else None
        if deployment is None:
            return 0
        return int(deployment.replica_states.get("RUNNING", 0))


async def _awaited(response: Any) -> Any:
    """`await response` as a coroutine (wait_for wraps it in a task; the response itself stays cancellable)."""
    return await response
