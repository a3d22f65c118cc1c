"""The request side of `POST /v1/predict`: the JSON or multipart body parsed into a `PredictRequest`,
every field validated, and the image's format and size read from its header before any pixel is decoded.

Every refusal is an `ApiError` carrying its HTTP status and stable error code (the table is in the
docstring of `medfusion.serving.api`). Nothing here imports Ray or FastAPI.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from medfusion.config import ServeLimitsConfig

JSON_FIELDS = ("image_b64", "report", "top_k")
FORM_FIELDS = ("image", "report", "top_k")
MAX_TOP_K = 1000


class ApiError(Exception):
    """A request the API refuses: HTTP `status`, a stable `error` code and a human `detail`."""

    def __init__(self, status: int, error: str, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = dict(headers or {})


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
        where = f"line {err.lineno}, column {err.colno}"
        raise ApiError(400, "invalid_json", f"not valid JSON: {err.msg} ({where})") from None
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

    return PredictRequest(
        image=parts["image"].data, report=_report(text("report"), limits), top_k=_top_k(text("top_k"))
    )


# Words of the decoder's refusals that are about size (medfusion.data.images.ImageTooLargeError) or
# about the format (UnsupportedImageError): the model side returns its errors as text.
_TOO_LARGE = ("exceeds the limit", "inflates past", "decompression bomb")
_UNSUPPORTED = ("is not supported", "not a PNG, JPEG or DICOM")


def image_error(reason: str) -> ApiError:
    """The ApiError for a decoder's refusal of an image the header check let through: 422, 415 or 400."""
    if any(words in reason for words in _TOO_LARGE):
        return ApiError(422, "image_too_large", reason)
    if any(words in reason for words in _UNSUPPORTED):
        return ApiError(415, "unsupported_image_type", reason)
    return ApiError(400, "invalid_image", reason)


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

    A DICOM file is read by the decoder's own header reader (`medfusion.data.images.read_dicom_header`):
    the file meta first, a deflated data set inflated only up to its pixel data, and the limit counted
    over rows x columns x frames x samples, so this check and the model refuse the same files.

    Returns:
        (format, width, height).

    Raises:
        ApiError: 415 not PNG/JPEG/DICOM or a DICOM transfer syntax the decoder refuses, 422 more than
            `max_pixels`, 400 an unreadable header.
    """
    from medfusion.data.images import ImageDecodeError, ImageTooLargeError, UnsupportedImageError, sniff_format

    if not data:
        raise ApiError(400, "invalid_image", "the image is empty")
    kind = sniff_format(data)
    if kind == "unknown":
        detail = "the image is not PNG, JPEG or DICOM (unrecognized leading bytes)"
        raise ApiError(415, "unsupported_image_type", detail)
    try:
        width, height = _dicom_size(data, max_pixels) if kind == "dicom" else _pil_size(data)
    except ApiError:
        raise
    except UnsupportedImageError as err:
        raise ApiError(415, "unsupported_image_type", str(err)) from None
    except ImageTooLargeError as err:
        raise ApiError(422, "image_too_large", str(err)) from None
    except ImageDecodeError as err:
        raise ApiError(400, "invalid_image", str(err)) from None
    except Exception as err:  # PIL raises many types for bad headers
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


def _dicom_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    from medfusion.data.images import read_dicom_header

    header = read_dicom_header(data, max_pixels)
    return header.columns, header.rows
