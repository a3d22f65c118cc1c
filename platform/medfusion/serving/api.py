"""The HTTP API of online inference: `create_api(backend)`, the FastAPI app with auth, limits and the access log.

`medfusion.serve.app` runs this app in its ingress deployment over a `HandleBackend` (or in the model
replicas themselves); the plain FastAPI/uvicorn baseline of `medfusion bench serve` and the unit tests
run the very same app over a `LocalBackend` without Ray. FastAPI is imported inside `create_api`.

Endpoints: ``POST /v1/predict`` (multipart ``image`` file + optional ``report`` and ``top_k`` fields,
or JSON ``{"image_b64", "report", "top_k"}``; PNG, JPEG or DICOM), ``GET /v1/model``, ``GET /healthz``
(the process answers), ``GET /readyz`` (200 ``ready``, or ``busy`` when the model is loaded but every
replica is busy; 503 before a replica has loaded it), OpenAPI at ``/openapi.json``. ``/v1/*`` needs
``Authorization: Bearer <token>`` when a token is configured (and the schema then declares it). Paths
are exact: a trailing slash is a 404, never a redirect (whose Location would echo the Host header).

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
    415     unsupported_image_type   the image is not PNG, JPEG or DICOM (by its leading bytes), or a
                                     DICOM whose transfer syntax the decoder cannot bound (RLE, JPEG
                                     Lossless, JPEG-LS...: the detail names it)
    422     invalid_request          a missing, unknown, duplicated or mistyped field; top_k out of
                                     range; a note longer than limits.max_report_chars
    422     image_too_large          more than limits.max_pixels (read from the header, before any
                                     pixel is decoded: the decompression-bomb guard; a DICOM counts
                                     rows x columns x frames x samples), or a deflated DICOM header
                                     that inflates past its allowance
    503     overloaded               the model's queue is full (Retry-After)
    503     unavailable / not_ready  no model replica can answer (Retry-After)
    504     timeout                  no prediction within limits.request_timeout_s; the model drops
                                     the request (cancelled, and never decoded past its deadline)
    500     internal_error           a bug (never caused by input)

Behind Ray Serve the proxy adds two of its own: 408 past ``http_options.request_timeout_s`` and 503
(with Retry-After from ``backpressure_config``) when the ingress's own queue is full; it closes a
connection whose request headers do not arrive within the header timeout
(`medfusion.serving.header_timeout`).
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request...)
# as objects, and they are imported inside create_api.
import asyncio
import hmac
import json
import logging
import math
import re
import sys
import time
import uuid
from collections.abc import Mapping
from typing import Any

from medfusion.serving.parsing import MAX_TOP_K, ApiError, image_error, media_type, parse_predict_body
from medfusion.serving.runtime import Backend, ServeMetrics
from medfusion.serving.settings import ApiSettings

ACCESS_LOGGER = "medfusion.serve.access"
# /readyz details of the states a backend's readiness() may return besides ready and busy.
NOT_READY = {
    "loading": "the model is not loaded yet",
    "unavailable": "no model replica answers",
}
PARSE_IN_THREAD_BYTES = 64 * 1024  # smaller bodies parse faster than a thread hop
REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

log = logging.getLogger(__name__)


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
            detail = f"the body of {int(declared)} bytes exceeds the limit of {limit} bytes"
            raise ApiError(413, "body_too_large", detail)
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
                            "image_b64": {
                                "type": "string",
                                "format": "byte",
                                "description": "base64 PNG, JPEG or DICOM",
                            },
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
    if settings.token:
        log.info("medfusion API: bearer-token auth required on /v1")
    else:  # a WARNING: at INFO an open API went unnoticed (serve.require_auth makes it a start failure)
        log.warning("medfusion API: bearer-token auth is OFF (no token configured): /v1 answers anyone")
    bearer = HTTPBearer(auto_error=False, description="the token the server is configured with")

    class ErrorBody(BaseModel):
        error: str
        detail: str

    errors = {code: {"model": ErrorBody} for code in (400, 401, 408, 413, 415, 422, 503, 504)}
    app = FastAPI(
        title="medfusion",
        version="1",
        summary="Disease labels, lesion box and findings text from a medical image and an optional clinical note.",
        # A redirect to the slash-less path builds its Location from the Host header: exact paths only.
        redirect_slashes=False,
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

    async def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise ApiError(401, "unauthorized", "missing bearer token (Authorization: Bearer <token>)", challenge)
        if not hmac.compare_digest(credentials.credentials.encode(), str(settings.token).encode()):
            raise ApiError(401, "unauthorized", "invalid bearer token", challenge)

    async def open_access() -> None:
        return None

    # The schema declares the bearer scheme only when the server enforces it: clients and fuzzers
    # read what it says.
    authorize = require_token if settings.token else open_access

    @app.get("/healthz", summary="Liveness: the server process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness: a model replica has loaded the model (status ready, or busy when all are busy)",
        responses={503: {"model": ErrorBody}},
    )
    async def readyz(request: Request) -> Any:
        state = await backend.readiness()
        if state in ("ready", "busy"):  # busy is still ready: a loaded model behind a full queue
            return {"status": state}
        detail = NOT_READY.get(state, f"the model is not ready ({state})")
        return error_response(request, 503, "not_ready", detail, retry_after)

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
        # The same deadline in wall-clock time travels with the item: the model drops an item whose
        # client already got its 504 instead of decoding it.
        wall_deadline = time.time() + limits.request_timeout_s
        try:
            body = await asyncio.wait_for(_read_body(request, limits.max_body_bytes), limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, "request_timeout", "the request body did not arrive in time") from None
        if len(body) > PARSE_IN_THREAD_BYTES:
            parsed = await asyncio.to_thread(parse_predict_body, content_type, body, limits)
        else:
            parsed = parse_predict_body(content_type, body, limits)
        del body
        item = {"image": parsed.image, "report": parsed.report, "deadline": wall_deadline}
        try:
            result = await asyncio.wait_for(backend.predict(item), max(deadline - time.monotonic(), 0.001))
        except asyncio.TimeoutError:
            raise ApiError(504, "timeout", f"no prediction within {limits.request_timeout_s} s") from None
        if "error" in result:  # the header passed but decoding failed (truncated, corrupt pixel data...)
            raise image_error(str(result["error"]).removeprefix("image: "))
        request.state.model_version = result.get("model", {}).get("version")
        if parsed.top_k is not None:
            result["labels"] = result["labels"][: parsed.top_k]
        return JSONResponse({**result, "request_id": request.state.request_id})

    app.add_middleware(_AccessLog, metrics=metrics, echo_request_id=settings.echo_request_id)
    return app
