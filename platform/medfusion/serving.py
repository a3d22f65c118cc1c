"""Online inference: the HTTP API, request validation and the model runner behind Ray Serve.

`medfusion.serve.app` wraps this module in two Serve deployments (an ingress and a batched model
deployment); the plain FastAPI/uvicorn baseline of `medfusion bench serve` and the unit tests run the
very same API over a `LocalBackend` without Ray. Everything here is independent of Serve except
`HandleBackend` and `ServeMetrics`, which import Ray lazily.

Endpoints: ``POST /v1/predict`` (multipart ``image`` file + optional ``report`` and ``top_k`` fields,
or JSON ``{"image_b64", "report", "top_k"}``; PNG, JPEG or DICOM), ``GET /v1/model``, ``GET /healthz``
(the process answers), ``GET /readyz`` (a model replica has loaded the model and answers), OpenAPI at
``/openapi.json``. ``/v1/*`` needs ``Authorization: Bearer <token>`` when a token is configured.

Every error is JSON ``{"error": CODE, "detail": TEXT}`` (no stack trace, no secret, no note text):

    status  error                    when
    400     invalid_json             the JSON body is not UTF-8 JSON (NaN and Infinity included)
    400     invalid_multipart        the multipart body is malformed
    400     invalid_base64           image_b64 is not base64
    400     invalid_text             the report is not UTF-8 text (multipart) or holds a lone surrogate
    400     invalid_image            the image bytes cannot be decoded (empty, truncated, corrupt)
    400     invalid_content_length   Content-Length is not a non-negative integer
    401     unauthorized             missing or wrong bearer token (with WWW-Authenticate: Bearer)
    404     not_found / 405 method_not_allowed
    408     request_timeout          the body did not arrive within limits.request_timeout_s
    413     body_too_large           the body exceeds limits.max_body_bytes (declared or streamed)
    415     unsupported_media_type   Content-Type is not application/json or multipart/form-data
    415     unsupported_image_type   the image is not PNG, JPEG or DICOM (by its leading bytes)
    422     invalid_request          a missing, unknown, duplicated or mistyped field; top_k out of
                                     range; a note longer than limits.max_report_chars
    422     image_too_large          more pixels than limits.max_pixels (read from the header, before
                                     any pixel is decoded: the decompression-bomb guard)
    503     overloaded               the model's queue is full (Retry-After)
    503     unavailable / not_ready  no model replica can answer (Retry-After)
    504     timeout                  no prediction within limits.request_timeout_s
    500     internal_error           a bug (never caused by input)

Behind Ray Serve the proxy adds two of its own: 408 past ``http_options.request_timeout_s`` and 503
(with Retry-After from ``backpressure_config``) when the ingress's own queue is full.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request...)
# as objects, and they are imported inside create_api.
import asyncio
import base64
import binascii
import collections
import concurrent.futures
import hmac
import io
import json
import logging
import math
import os
import re
import signal
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from medfusion.config import ConfigError, ServeConfig, ServeLimitsConfig, load_config

ACCESS_LOGGER = "medfusion.serve.access"
JSON_FIELDS = ("image_b64", "report", "top_k")
FORM_FIELDS = ("image", "report", "top_k")
MAX_TOP_K = 1000
PARSE_IN_THREAD_BYTES = 64 * 1024  # smaller bodies parse faster than a thread hop
READY_TIMEOUT_S = 2.0
READY_FRESH_S = 10.0
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Fields of ServeConfig the model replicas read: changing any other field (limits, auth...) does not
# restart them.
MODEL_FIELDS = ("device", "beam_size", "max_decode_len", "max_batch_size", "batch_wait_timeout_s", "torch_threads")

log = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a stable `error` code and a human `detail`."""

    def __init__(self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})


# ------------------------------------------------------------------------------------ config


def serve_config(args: ServeConfig | Mapping[str, Any] | None) -> ServeConfig:
    """The typed config from what a Serve config file's ``args`` hold (a mapping) or a ServeConfig."""
    if isinstance(args, ServeConfig):
        return args
    if args is not None and not isinstance(args, Mapping):
        raise ConfigError(f"args: expected a mapping of ServeConfig fields, got {type(args).__name__}")
    return load_config(ServeConfig, base=dict(args or {}))


def _is_uri(model: str) -> bool:
    return "://" in model or "/" in model or model.startswith(".") or os.path.exists(model)


def resolve_model_uri(model: str, registry_uri: str = "") -> str:
    """The export folder to load for `model`: itself when it is a path or URI, else a registry lookup.

    Args:
        model: an export folder (local path, ``s3://...``), or ``NAME[:VERSION]`` (VERSION defaults to
            ``latest``) resolved through ``medfusion.registry.resolve_model_uri``.
        registry_uri: the registry root, for NAME[:VERSION].

    Raises:
        ConfigError: naming the field, when the reference cannot be resolved (an unknown name or
            version lists the registered ones).
    """
    from medfusion import registry

    model = model.strip()
    if not model:
        raise ConfigError("model: required: an export folder (path or s3://...) or NAME[:VERSION] from the registry")
    if _is_uri(model):
        return model
    try:
        name, version = registry.parse_ref(model)
    except ConfigError as err:
        raise ConfigError(f"model: {model!r} is neither an existing path, an s3:// URI nor NAME[:VERSION] ({err})") from None
    if not registry_uri:
        raise ConfigError(f"registry_uri: required to resolve the registry reference {model!r}")
    return registry.resolve_model_uri(registry_uri, name, version)


def read_token(env_name: str, token_file: str) -> str | None:
    """The configured bearer token (file first, then the environment), or None when auth is off.

    Raises:
        ConfigError: a configured token file that is missing or empty (never serve open by mistake).
    """
    if token_file:
        try:
            token = open(token_file, encoding="utf-8").read().strip()  # noqa: SIM115 - tiny file
        except OSError as err:
            raise ConfigError(f"auth_token_file: cannot read {token_file} ({type(err).__name__})") from None
        if not token:
            raise ConfigError(f"auth_token_file: {token_file} is empty")
        return token
    token = os.environ.get(env_name, "").strip() if env_name else ""
    return token or None


def model_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options of the model deployment (a Serve config file's `deployments` override them)."""
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        actor["num_gpus"] = cfg.num_gpus
    return {
        "autoscaling_config": asdict(cfg.autoscaling),
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"retry_after_s": cfg.limits.retry_after_s},
        "ray_actor_options": actor,
    }


def ingress_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options of the HTTP ingress.

    Its proxy-side queue is as deep as one replica's capacity: requests wait there for a moment while
    the router picks a replica even when replicas have room, so the model's (small) queue bound would
    refuse bursts the ingress could take.
    """
    return {
        "num_replicas": cfg.ingress_replicas,
        "max_ongoing_requests": cfg.ingress_max_ongoing_requests,
        "max_queued_requests": cfg.ingress_max_ongoing_requests,
        "backpressure_config": {"retry_after_s": cfg.limits.retry_after_s},
        "ray_actor_options": {"num_cpus": cfg.ingress_num_cpus},
    }


def model_args(cfg: ServeConfig) -> dict[str, Any]:
    """Init args of a model replica: only what it reads, so that other changes do not restart it."""
    return {**{k: getattr(cfg, k) for k in MODEL_FIELDS}, "max_pixels": cfg.limits.max_pixels}


def ingress_args(cfg: ServeConfig) -> dict[str, Any]:
    """Init args of an ingress replica: limits and where to read the token (never the token itself)."""
    return {"limits": asdict(cfg.limits), "auth_token_env": cfg.auth_token_env, "auth_token_file": cfg.auth_token_file}


@dataclass(frozen=True)
class ApiSettings:
    """What `create_api` enforces."""

    limits: ServeLimitsConfig = field(default_factory=ServeLimitsConfig)
    token: str | None = None
    """The bearer token; None disables auth."""
    echo_request_id: bool = True
    """Add X-Request-ID to responses (off behind Serve, whose proxy already does)."""

    @classmethod
    def from_ingress_args(cls, args: Mapping[str, Any], echo_request_id: bool = False) -> "ApiSettings":
        """Settings from `ingress_args`, reading the token where the replica runs (env or mounted file)."""
        limits = load_config(ServeLimitsConfig, base=dict(args.get("limits") or {}))
        token = read_token(str(args.get("auth_token_env", "")), str(args.get("auth_token_file", "")))
        return cls(limits=limits, token=token, echo_request_id=echo_request_id)


# ------------------------------------------------------------------------------------ parsing


@dataclass
class PredictRequest:
    """One parsed and validated prediction request."""

    image: bytes
    report: str | None = None
    top_k: int | None = None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _top_k(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not re.fullmatch(r"[+-]?\d{1,6}", text):
            raise ApiError(422, "invalid_request", f"top_k: expected an integer in [1, {MAX_TOP_K}], got {text[:32]!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int):
        expected = f"top_k: expected an integer in [1, {MAX_TOP_K}]"
        raise ApiError(422, "invalid_request", f"{expected}, got {type(value).__name__}")
    if not 1 <= value <= MAX_TOP_K:
        raise ApiError(422, "invalid_request", f"top_k: expected an integer in [1, {MAX_TOP_K}], got {value}")
    return value


def _report(value: Any, limits: ServeLimitsConfig) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"report: expected a string or null, got {type(value).__name__}")
    if len(value) > limits.max_report_chars:
        raise ApiError(
            422, "invalid_request", f"report: {len(value)} characters exceeds the limit of {limits.max_report_chars}"
        )
    try:
        value.encode("utf-8")  # JSON allows lone surrogates ("\ud800"); the answer echoes note words as UTF-8
    except UnicodeEncodeError:
        raise ApiError(400, "invalid_text", "report: not valid Unicode text (a lone surrogate)") from None
    return value


def _b64(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"image_b64: expected a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value[:256]:  # a data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "invalid_base64", "image_b64: not valid base64") from None


def _parse_json(body: bytes, limits: ServeLimitsConfig) -> PredictRequest:
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "the body is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise ApiError(400, "invalid_json", f"not valid JSON: {err.msg} (line {err.lineno}, column {err.colno})") from None
    except (ValueError, RecursionError) as err:
        reason = str(err) if isinstance(err, ValueError) else "nested too deeply"
        raise ApiError(400, "invalid_json", f"not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_request", f"expected a JSON object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in JSON_FIELDS)
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown field {unknown[0][:64]!r}; fields: {', '.join(JSON_FIELDS)}")
    if "image_b64" not in data:
        raise ApiError(422, "invalid_request", "missing field 'image_b64' (the base64-encoded PNG, JPEG or DICOM)")
    return PredictRequest(
        image=_b64(data["image_b64"]), report=_report(data.get("report"), limits), top_k=_top_k(data.get("top_k"))
    )


@dataclass
class _Part:
    data: bytes
    filename: bytes | None


def _parse_multipart(body: bytes, content_type: str) -> dict[str, _Part]:
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header

    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_multipart", "multipart/form-data without a boundary")
    parts: dict[str, _Part] = {}
    current: dict[str, Any] = {}

    def on_part_begin() -> None:
        current.update(headers={}, field=b"", value=b"", data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        current["value"] += data[start:end]

    def on_header_end() -> None:
        current["headers"][current["field"].lower()] = current["value"]
        current["field"], current["value"] = b"", b""

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"].append(data[start:end])

    def on_part_end() -> None:
        disposition, options = parse_options_header(current["headers"].get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise ApiError(400, "invalid_multipart", "a part without Content-Disposition: form-data; name=...")
        name = options[b"name"].decode("utf-8", "replace")
        if name not in FORM_FIELDS:
            raise ApiError(422, "invalid_request", f"unknown field {name[:64]!r}; fields: {', '.join(FORM_FIELDS)}")
        if name in parts:
            raise ApiError(422, "invalid_request", f"field {name!r} given more than once")
        parts[name] = _Part(b"".join(current["data"]), options.get(b"filename"))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        parser.write(body)
        parser.finalize()
    except FormParserError:
        raise ApiError(400, "invalid_multipart", "malformed multipart/form-data body") from None
    return parts


def _parse_form(body: bytes, content_type: str, limits: ServeLimitsConfig) -> PredictRequest:
    parts = _parse_multipart(body, content_type)
    if "image" not in parts:
        raise ApiError(422, "invalid_request", "missing field 'image' (a PNG, JPEG or DICOM file)")

    def text(name: str) -> str | None:
        if name not in parts:
            return None
        try:
            return parts[name].data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(400, "invalid_text", f"{name}: not UTF-8 text") from None

    return PredictRequest(image=parts["image"].data, report=_report(text("report"), limits), top_k=_top_k(text("top_k")))


def media_type(content_type: str) -> str:
    """The lower-case media type of a Content-Type header, without parameters."""
    return content_type.split(";", 1)[0].strip().lower()


def parse_predict_body(content_type: str, body: bytes, limits: ServeLimitsConfig) -> PredictRequest:
    """Parse and validate a `POST /v1/predict` body (JSON or multipart); raises ApiError (4xx)."""
    kind = media_type(content_type)
    if kind == "application/json":
        request = _parse_json(body, limits)
    elif kind == "multipart/form-data":
        request = _parse_form(body, content_type, limits)
    else:
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
    check_image_header(request.image, limits.max_pixels)
    return request


def check_image_header(data: bytes, max_pixels: int) -> tuple[str, int, int]:
    """Format and size of an encoded image from its header alone (no pixel is decoded).

    Returns:
        (format, width, height).

    Raises:
        ApiError: 415 not PNG/JPEG/DICOM, 422 more than `max_pixels`, 400 an unreadable header.
    """
    from medfusion.data.images import sniff_format

    if not data:
        raise ApiError(400, "invalid_image", "the image is empty")
    kind = sniff_format(data)
    if kind == "unknown":
        raise ApiError(415, "unsupported_image_type", "the image is not PNG, JPEG or DICOM (unrecognized leading bytes)")
    try:
        width, height = _dicom_size(data) if kind == "dicom" else _pil_size(data)
    except ApiError:
        raise
    except Exception as err:  # PIL and pydicom raise many types for bad headers
        raise ApiError(400, "invalid_image", f"cannot read the {kind.upper()} header ({type(err).__name__})") from None
    if width <= 0 or height <= 0:
        raise ApiError(400, "invalid_image", f"the image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ApiError(
            422, "image_too_large", f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
        )
    return kind, width, height


def _pil_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:  # lazy: reads the header only
            return img.size
    except Image.DecompressionBombError:  # PIL's own guard (> ~179 MP) fires in open()
        raise ApiError(422, "image_too_large", "the image header declares a decompression bomb") from None


def _dicom_size(data: bytes) -> tuple[int, int]:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)


# ------------------------------------------------------------------------------------ model side


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
    the whole per-call cost (for `tiny` on one CPU core: 17 ms alone vs 3 ms per item in a batch of
    32), and a long one delays every lone request. With the pacer a batch closes once it holds as
    many requests as the replica held at once in the last `window_s` (at most `max_batch_size`), or
    after `max_wait_s`: at low load a request runs at once; under load batches fill to the load.
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

    Predictions run on one dedicated thread. torch keeps per-thread state, and a call that lands on
    another thread of a pool pays for it again: a lone `tiny` prediction took 20 ms through
    asyncio.to_thread vs 16 ms on one thread.
    """

    def __init__(self, predictor: Any, metrics: ServeMetrics | None = None, registered: str = "") -> None:
        self.predictor = predictor
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="medfusion-model")
        self.metrics = metrics or ServeMetrics(enabled=False)
        self.registered = registered
        info = predictor.info
        self.model = {"name": info["model_name"], "version": info["version"]}
        if registered:  # NAME:VERSION in the model registry, when loaded from there
            self.model["registered"] = registered

    @classmethod
    def load(
        cls, uri: str, args: Mapping[str, Any], metrics: ServeMetrics | None = None, warm_up: bool = True
    ) -> "ModelRunner":
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
        """Predict `items` in this thread (errors per item, as ``{"error", "index"}``)."""
        start = time.perf_counter()
        results = self.predictor.predict(items, errors="return")
        bad = sum(1 for r in results if "error" in r)
        self.metrics.batch(len(items), time.perf_counter() - start, bad)
        return [r if "error" in r else {**r, "model": self.model} for r in results]

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

    async def ready(self) -> bool: ...


class LocalBackend:
    """One prediction per request in a worker thread, no batching: the plain baseline and tests."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    async def predict(self, item: dict[str, Any]) -> dict[str, Any]:
        return (await self.runner.predict([item]))[0]

    async def info(self) -> dict[str, Any]:
        return self.runner.info

    async def ready(self) -> bool:
        return True


class HandleBackend:
    """Calls the model deployment through a Serve DeploymentHandle (batched on the replica side)."""

    def __init__(self, handle: Any, retry_after_s: float = 1.0) -> None:
        self.handle = handle
        self.retry_headers = {"Retry-After": str(math.ceil(retry_after_s))}
        self._answered_at = -math.inf  # when a model replica last answered

    async def predict(self, item: dict[str, Any]) -> dict[str, Any]:
        from ray.exceptions import RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        for attempt in range(2):
            try:
                result = await self.handle.predict.remote(item)
                self._answered_at = time.monotonic()
                return result
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

    async def ready(self) -> bool:
        # A replica that answered recently proves readiness; probing through the queue instead would
        # time out under load and take a busy (healthy) server out of its load balancer.
        if time.monotonic() - self._answered_at < READY_FRESH_S:
            return True
        try:
            ready = bool(await asyncio.wait_for(self.handle.ready.remote(), READY_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - any failure means not ready
            return False
        if ready:
            self._answered_at = time.monotonic()
        return ready


# ------------------------------------------------------------------------------------ the API


def _access_logger() -> logging.Logger:
    logger = logging.getLogger(ACCESS_LOGGER)
    if not logger.handlers:  # one JSON object per line on stderr (Serve's replica log); no traceback
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class _AccessLog:
    """ASGI middleware: request id, one JSON access-log line and metrics per request, no 500 trace."""

    def __init__(self, app: Any, metrics: ServeMetrics, echo_request_id: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.echo_request_id = echo_request_id
        self.logger = _access_logger()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = given if REQUEST_ID.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        response = {"status": 500, "started": False}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                response.update(status=message["status"], started=True)
                if self.echo_request_id:
                    message.setdefault("headers", [])
                    message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as err:  # a bug: answer 500 without a trace, log the type only
            state["error"] = "internal_error"
            state["exception"] = type(err).__name__
            if not response["started"]:
                body = json.dumps({"error": "internal_error", "detail": f"unexpected error (request id {request_id})"})
                await send_with_id(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"application/json")]}
                )
                await send({"type": "http.response.body", "body": body.encode()})
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            declared = headers.get(b"content-length", b"")
            self.metrics.request(route, int(response["status"]), state.get("error"), seconds)
            line = {
                "event": "access",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "request_id": request_id,
                "method": scope.get("method"),
                "path": scope.get("path", "")[:256],
                "status": response["status"],
                "latency_ms": round(seconds * 1000.0, 2),
                "bytes_in": int(declared) if declared.isdigit() else None,
                "error": state.get("error"),
                "model_version": state.get("model_version"),
            }
            if "exception" in state:
                line["exception"] = state["exception"]
            self.logger.info(json.dumps(line))


async def _read_body(request: Any, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "invalid_content_length", "Content-Length must be a non-negative integer")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"the body of {int(declared)} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _request_schema() -> dict[str, Any]:
    report = {"type": "string", "nullable": True, "description": "the clinical note (optional; absent, empty = none)"}
    top_k = {"type": "integer", "minimum": 1, "maximum": MAX_TOP_K, "description": "return only the top k labels"}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["image"],
                        "properties": {
                            "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or DICOM"},
                            "report": report,
                            "top_k": top_k,
                        },
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["image_b64"],
                        "additionalProperties": False,
                        "properties": {
                            "image_b64": {"type": "string", "format": "byte", "description": "base64 PNG, JPEG or DICOM"},
                            "report": report,
                            "top_k": top_k,
                        },
                    }
                },
            },
        }
    }


def create_api(backend: Backend, settings: ApiSettings | None = None, metrics: ServeMetrics | None = None) -> Any:
    """The FastAPI app of the serving contract over `backend` (see the module docstring)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
    from pydantic import BaseModel
    from starlette.exceptions import HTTPException

    settings = settings or ApiSettings()
    limits = settings.limits
    metrics = metrics or ServeMetrics(enabled=False)
    log.info("medfusion API: bearer-token auth %s", "required" if settings.token else "off (no token configured)")
    bearer = HTTPBearer(auto_error=False, description="required when the server has a token configured")

    class ErrorBody(BaseModel):
        error: str
        detail: str

    errors = {code: {"model": ErrorBody} for code in (400, 401, 408, 413, 415, 422, 503, 504)}
    app = FastAPI(
        title="medfusion",
        version="1",
        summary="Disease labels, lesion box and findings text from a medical image and an optional clinical note.",
    )

    retry_after = {"Retry-After": str(math.ceil(limits.retry_after_s))}

    def error_response(
        request: Request, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
    ) -> JSONResponse:
        request.state.error = error
        return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=dict(headers or {}))

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(request, err.status, err.error, err.detail, err.headers)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, err: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(request, err.status_code, code, str(err.detail), err.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(request, 422, "invalid_request", f"{where}: {first.get('msg', 'invalid')}")

    async def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)", challenge)
        if not hmac.compare_digest(credentials.credentials.encode(), settings.token.encode()):
            raise ApiError(401, "unauthorized", "invalid bearer token", challenge)

    @app.get("/healthz", summary="Liveness: the server process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model replica has loaded the model", responses={503: {"model": ErrorBody}})
    async def readyz(request: Request) -> Any:
        if await backend.ready():
            return {"status": "ready"}
        return error_response(request, 503, "not_ready", "the model is not loaded yet", retry_after)

    @app.get(
        "/v1/model",
        summary="Name, version, classes, metrics and lineage of the served model",
        dependencies=[Depends(authorize)],
        responses=errors,
    )
    async def model_info() -> dict[str, Any]:
        try:
            return await asyncio.wait_for(backend.info(), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", "the model did not answer in time") from None

    @app.post(
        "/v1/predict",
        summary="Predict labels, lesion box and findings for one image (+ optional note)",
        dependencies=[Depends(authorize)],
        responses=errors,
        openapi_extra=_request_schema(),
    )
    async def predict(request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        if media_type(content_type) not in ("application/json", "multipart/form-data"):
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data or application/json")
        deadline = time.monotonic() + limits.request_timeout_s
        try:
            body = await asyncio.wait_for(_read_body(request, limits.max_body_bytes), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, "request_timeout", "the request body did not arrive in time") from None
        if len(body) > PARSE_IN_THREAD_BYTES:
            parsed = await asyncio.to_thread(parse_predict_body, content_type, body, limits)
        else:
            parsed = parse_predict_body(content_type, body, limits)
        del body
        try:
            result = await asyncio.wait_for(
                backend.predict({"image": parsed.image, "report": parsed.report}), max(deadline - time.monotonic(), 0.001)
            )
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no prediction within {limits.request_timeout_s} s") from None
        if "error" in result:  # the header passed but decoding failed (truncated, corrupt pixel data...)
            reason = str(result["error"]).removeprefix("image: ")
            # The decoder's own pixel guard (a header check above normally fires first).
            status, code = (422, "image_too_large") if "exceeds the limit" in reason else (400, "invalid_image")
            raise ApiError(status, code, reason)
        request.state.model_version = result.get("model", {}).get("version")
        if parsed.top_k is not None:
            result["labels"] = result["labels"][: parsed.top_k]
        return JSONResponse({**result, "request_id": request.state.request_id})

    app.add_middleware(_AccessLog, metrics=metrics, echo_request_id=settings.echo_request_id)
    return app


# ------------------------------------------------------------------------------------ running


def serve_forever(
    cfg: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    app_name: str = "medfusion",
    route_prefix: str = "/",
    request_timeout_s: float | None = None,
    block: bool = True,
) -> str:
    """Run the application on Ray (embedded unless RAY_ADDRESS points at a cluster); return its URL.

    With `block`, print the URL and wait until Ctrl-C, then shut Serve (and a Ray it started) down.
    """
    import ray
    from ray import serve

    from medfusion.serve.app import build_app

    started_ray = not ray.is_initialized()
    if started_ray:
        # address="local": the embedded Ray, never a cluster some `ray start` left on this machine.
        ray.init(address="local", include_dashboard=False, configure_logging=False)
    http_options: dict[str, Any] = {"host": host, "port": port}
    if request_timeout_s:
        http_options["request_timeout_s"] = request_timeout_s
    serve.start(http_options=http_options)
    serve.run(build_app(cfg), name=app_name, route_prefix=route_prefix, blocking=False)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    if not block:
        return url
    print(f"medfusion serving {cfg.model} at {url}  (POST {url}/v1/predict, docs {url}/docs); Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop shuts down as cleanly as Ctrl-C
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    return url


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
