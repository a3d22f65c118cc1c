"""Helpers of the serving tests: request images, the hostile-request table, a tiny export, Serve status.

The hostile table is shared by the in-process API tests (no Ray) and the Serve integration tests, so
the same documented 4xx is checked on both paths.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

from dicom_files import deflate_bomb, dicom_file
from medfusion.config import DataConfig, ServeLimitsConfig, SynthConfig
from medfusion.data import synth
from medfusion.data.tokenizer import Tokenizer
from medfusion.export import export_model
from medfusion.models import create_model
from medfusion.store import free_port  # noqa: F401  (tests/serve import it from here)

DATA = DataConfig(image_size=64, max_report_tokens=24, max_findings_tokens=40)
TOKEN = "s3cr3t-t0ken"
HEADER_TIMEOUT_S = 2.0  # the request-header timeout of Serve's proxy in these tests (conftest sets it)
# Small limits so that the hostile requests stay small; the defaults are checked in test_api.py.
LIMITS = ServeLimitsConfig(
    max_body_bytes=256 * 1024, max_pixels=2_000_000, max_report_chars=2_000, request_timeout_s=20.0
)


# ----------------------------------------------------------------------------- images


def png(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg(width: int = 80, height: int = 60) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (height, width), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def dicom(rows: int = 40, cols: int = 50, transfer_syntax: str | None = None) -> bytes:
    """A 16-bit DX DICOM of random pixels (Explicit VR Little Endian unless `transfer_syntax` says)."""
    pixels = np.random.default_rng(2).integers(0, 4000, (rows, cols)).astype(np.uint16)
    return dicom_file(pixels, **({"transfer_syntax": transfer_syntax} if transfer_syntax else {}))


def dicom_deflated() -> bytes:
    return dicom(transfer_syntax=DeflatedExplicitVRLittleEndian)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int, idat: bytes = b"") -> bytes:
    """A grayscale PNG that claims width x height; `idat` is its (compressed) pixel stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = idat or zlib.compress(b"\0" * 16)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_bomb(side: int) -> bytes:
    """A real, valid, all-black side x side PNG: a few KB that decode to side² bytes."""
    row = b"\0" * (side + 1)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_header(side, side, idat)


# ----------------------------------------------------------------------------- requests


@dataclass
class Req:
    """One HTTP request: httpx keyword arguments for POST /v1/predict (or another method/path)."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "POST"
    path: str = "/v1/predict"
    auth: bool = True  # send the valid token


def multipart(image: bytes | None = None, report: Any = None, **fields: Any) -> Req:
    """multipart/form-data: an `image` file part and plain field parts (bytes are sent as they are)."""
    parts: list[tuple[str, Any]] = []
    if image is not None:
        parts.append(("image", ("image.bin", image, "application/octet-stream")))
    for name, value in {"report": report, **fields}.items():
        if value is not None:
            parts.append((name, (None, value if isinstance(value, bytes) else str(value).encode())))
    return Req({"files": parts})


def as_json(payload: Any) -> Req:
    return Req({"content": json.dumps(payload).encode(), "headers": {"content-type": "application/json"}})


def raw(body: bytes, content_type: str, **headers: str) -> Req:
    return Req({"content": body, "headers": {"content-type": content_type, **headers}})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def hostile_cases() -> list[tuple[str, Req, int, str]]:
    """(id, request, status, error code): at least 20 requests an attacker or a buggy client sends."""
    good = png()
    over = LIMITS.max_body_bytes + 1024

    def with_auth(authorization: str) -> Req:
        return Req({**multipart(good).kwargs, "headers": {"authorization": authorization}}, auth=False)

    return [
        ("garbage-bytes", multipart(b"\x00\x01garbage" * 50), 415, "unsupported_image_type"),
        ("gif-image", multipart(b"GIF89a" + b"\0" * 64), 415, "unsupported_image_type"),
        ("empty-image", multipart(b""), 400, "invalid_image"),
        ("truncated-png", multipart(good[: len(good) // 2]), 400, "invalid_image"),
        ("png-signature-only", multipart(good[:8]), 400, "invalid_image"),
        ("20k-by-20k-png-header", multipart(png_header(20_000, 20_000)), 422, "image_too_large"),
        ("zip-bomb-png", multipart(png_bomb(4096)), 422, "image_too_large"),
        (
            "huge-dicom-header",
            multipart(dicom_file(shape=(8000, 8000), bits=8, pixel_data=bytes(16))),
            422,
            "image_too_large",
        ),
        *dicom_cases(),
        ("zero-size-png", multipart(png_header(0, 0)), 400, "invalid_image"),
        ("wrong-content-type", raw(good, "text/plain"), 415, "unsupported_media_type"),
        ("image-content-type", raw(good, "image/png"), 415, "unsupported_media_type"),
        ("no-content-type", raw(good, ""), 415, "unsupported_media_type"),
        ("multipart-missing-image", multipart(None, report="cough"), 422, "invalid_request"),
        ("multipart-unknown-field", multipart(good, img="x"), 422, "invalid_request"),
        ("multipart-no-boundary", raw(b"--x\r\n", "multipart/form-data"), 400, "invalid_multipart"),
        (
            "multipart-malformed",
            raw(b"--b\r\ngarbage\r\n\r\n", "multipart/form-data; boundary=b"),
            400,
            "invalid_multipart",
        ),
        ("huge-note", multipart(good, report="cough " * 1000), 422, "invalid_request"),
        ("non-utf8-note", multipart(good, report=b"\xff\xfe\xfa cough"), 400, "invalid_text"),
        (
            "json-lone-surrogate-note",
            raw(b'{"image_b64": "%s", "report": "\\ud800 cough"}' % b64(good).encode(), "application/json"),
            400,
            "invalid_text",
        ),
        ("json-missing-image", as_json({"report": "cough"}), 422, "invalid_request"),
        ("json-invalid-base64", as_json({"image_b64": "not base64 !!!"}), 400, "invalid_base64"),
        ("json-not-json", raw(b"{image_b64: ", "application/json"), 400, "invalid_json"),
        ("json-non-utf8", raw(b'{"image_b64": "\xff\xfe"}', "application/json"), 400, "invalid_json"),
        ("json-array", as_json([b64(good)]), 422, "invalid_request"),
        ("json-report-number", as_json({"image_b64": b64(good), "report": 42}), 422, "invalid_request"),
        ("json-deep-nesting", raw(b"[" * 100_000 + b"]" * 100_000, "application/json"), 400, "invalid_json"),
        ("json-top-k-negative", as_json({"image_b64": b64(good), "top_k": -1}), 422, "invalid_request"),
        (
            "json-top-k-nan",
            raw(b'{"image_b64": "%s", "top_k": NaN}' % b64(good).encode(), "application/json"),
            400,
            "invalid_json",
        ),
        ("json-top-k-float", as_json({"image_b64": b64(good), "top_k": 2.5}), 422, "invalid_request"),
        ("json-top-k-bool", as_json({"image_b64": b64(good), "top_k": True}), 422, "invalid_request"),
        ("form-top-k-nan", multipart(good, top_k="nan"), 422, "invalid_request"),
        ("form-top-k-huge", multipart(good, top_k="99999999999999999999"), 422, "invalid_request"),
        ("oversized-body", raw(b"x" * over, "application/json"), 413, "body_too_large"),
        (
            "lying-content-length",
            raw(b"{}", "application/json", **{"content-length": "abc"}),
            400,
            "invalid_content_length",
        ),
        ("no-token", Req(multipart(good).kwargs, auth=False), 401, "unauthorized"),
        ("wrong-token", with_auth("Bearer wrong"), 401, "unauthorized"),
        ("basic-auth", with_auth("Basic dXNlcjpwdw=="), 401, "unauthorized"),
        ("model-info-no-token", Req(method="GET", path="/v1/model", auth=False), 401, "unauthorized"),
        ("get-predict", Req(method="GET"), 405, "method_not_allowed"),
        ("unknown-path", Req(method="GET", path="/v1/../etc/passwd"), 404, "not_found"),
        # No redirect to the slash-less path: its Location would be built from the Host header.
        (
            "trailing-slash-with-forged-host",
            Req({"headers": {"host": "evil.example"}}, method="GET", path="/v1/model/"),
            404,
            "not_found",
        ),
    ]


def dicom_cases() -> list[tuple[str, Req, int, str]]:
    """Compressed, multi-frame and lying DICOM: the header is read within bounds and the limit counts
    rows x columns x frames x samples (each deflate bomb inflates to 200 MB from about 200 KB)."""
    mib = 2**20
    frame = 64 * 64 * 2
    deflated = dicom_deflated()
    return [
        (
            "dicom-deflate-bomb-frames",
            multipart(deflate_bomb(frames=25_600, pixel_bytes=frame * 25_600)),
            422,
            "image_too_large",
        ),
        (
            "dicom-deflate-bomb-header",
            multipart(deflate_bomb(pixel_bytes=frame, private_bytes=200 * mib)),
            422,
            "image_too_large",
        ),
        ("dicom-deflated-truncated", multipart(deflated[: len(deflated) // 2]), 400, "invalid_image"),
        (
            "dicom-frames-over-limit",
            multipart(dicom_file(shape=(1000, 1000), frames=3, pixel_data=bytes(16))),
            422,
            "image_too_large",
        ),
        (
            "dicom-samples-over-limit",
            multipart(dicom_file(shape=(1000, 1000), photometric="RGB", bits=8, pixel_data=bytes(16))),
            422,
            "image_too_large",
        ),
        (
            "dicom-rle",
            multipart(dicom_file(shape=(40, 50), pixel_data=bytes(64), transfer_syntax=RLELossless)),
            415,
            "unsupported_image_type",
        ),
        (
            "dicom-jpeg-larger-than-header",
            multipart(
                dicom_file(np.zeros((400, 500), np.uint8), bits=8, shape=(40, 50), transfer_syntax=JPEGBaseline8Bit)
            ),
            400,
            "invalid_image",
        ),
    ]


def send_kwargs(req: Req, token: str | None = TOKEN) -> dict[str, Any]:
    kwargs = {k: v for k, v in req.kwargs.items() if v is not None}
    headers = dict(kwargs.pop("headers", {}) or {})
    if req.auth and token:
        headers.setdefault("authorization", f"Bearer {token}")
    return {**kwargs, "headers": headers}


def strip_meta(response: dict[str, Any]) -> dict[str, Any]:
    """A /v1/predict answer without what the server adds (model, request id): the predictor's dict."""
    return {k: v for k, v in response.items() if k not in ("model", "request_id")}


def assert_close(actual: Any, expected: Any, path: str = "") -> None:
    """Equal up to float rounding (a batch of 1 and a batch of n may differ in the last bits)."""
    if isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-5), path
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_close(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, f"{path}[{i}]")
    else:
        assert actual == expected, path


# ----------------------------------------------------------------------------- model


@dataclass
class TinyExport:
    uri: str
    samples: list
    version: str


def make_export(path: str, seed: int) -> TinyExport:
    from medfusion.export import load_export

    cfg = SynthConfig(num_samples=24, image_size=64)
    samples = list(synth.generate(cfg))
    classes = synth.class_names(cfg)
    tokenizer = Tokenizer.build(s.report + " " + s.findings for s in samples)
    torch.manual_seed(seed)
    model = create_model("medfusion_tiny", len(tokenizer), len(classes)).eval()
    export_model(
        model,
        path,
        tokenizer=tokenizer,
        classes=classes,
        data_settings=DATA,
        metrics={"accuracy": 0.5},
        lineage={"dataset_version": "synthetic-test", "trial_id": None},
    )
    return TinyExport(uri=path, samples=samples, version=load_export(path).version)


def wait_for(condition, timeout_s: float, interval_s: float = 0.2, message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {message}")


def replica_states(app: str, deployment: str = "MedFusionDeployment") -> dict[str, int]:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(getattr(k, "value", k)): v for k, v in status.deployments[deployment].replica_states.items()}
