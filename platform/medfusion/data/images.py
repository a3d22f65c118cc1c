"""Decoding and preprocessing of images: one place for PNG, JPEG and DICOM.

Ingest, the Ray Data reader, the predictor and the server all go through `decode_image` and
`preprocess`, so training and inference see the same pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# Guards against decompression bombs: a 20k x 20k PNG header is a few bytes but 400 MP decoded.
DEFAULT_MAX_PIXELS = 40_000_000
MEAN, STD = 0.5, 0.25  # after scaling to [0, 1]; chest films are roughly centred grey

DICOM_MAGIC_OFFSET = 128


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read, or the image is outside the limits."""


def sniff_format(data: bytes) -> str:
    """'png', 'jpeg', 'dicom', or 'unknown' from the leading bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) > DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    return "unknown"


def _decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        return _dicom_pixels(data, max_pixels)
    except ImageDecodeError:
        raise
    except Exception as err:  # pydicom parses elements lazily: a corrupt header raises, of any type, on first access
        raise ImageDecodeError(f"not a readable DICOM file ({type(err).__name__}: {err})") from None


def _dicom_pixels(data: bytes, max_pixels: int) -> np.ndarray:
    import pydicom  # optional at import time: only DICOM input needs it

    ds = pydicom.dcmread(io.BytesIO(data))
    if "PixelData" not in ds:
        raise ImageDecodeError("DICOM file has no pixel data")
    rows, cols = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
    if rows * cols > max_pixels:
        raise ImageDecodeError(f"image of {cols}x{rows} pixels exceeds the limit of {max_pixels} pixels")
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as err:
        raise ImageDecodeError(f"DICOM pixel data cannot be decoded ({type(err).__name__}: {err})") from None
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[0]  # multi-frame: the first frame
    if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
        pixels = pixels[..., :3].mean(-1)  # colour: mean over channels
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = max(float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width), 1.0)
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = float(np.percentile(pixels, 0.5)), float(np.percentile(pixels, 99.5))
        hi = max(hi, lo + 1.0)
    scaled = np.clip((pixels - lo) / (hi - lo), 0.0, 1.0) * 255.0
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        scaled = 255.0 - scaled  # MONOCHROME1 stores bright as low values
    return scaled.astype(np.uint8)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes to a grayscale uint8 array (H, W).

    DICOM is windowed to 8 bits (the file's window, else the 0.5-99.5 percentile range).

    Raises:
        ImageDecodeError: empty, unknown, truncated or oversized input, with the reason.
    """
    if not data:
        raise ImageDecodeError("empty image")
    kind = sniff_format(data)
    if kind == "dicom":
        return _decode_dicom(data, max_pixels)
    if kind == "unknown":
        raise ImageDecodeError("not a PNG, JPEG or DICOM image (unrecognized leading bytes)")
    try:
        # No warnings.catch_warnings() here: it swaps process-global state and is not thread-safe.
        # PIL only warns above Image.MAX_IMAGE_PIXELS (~89 MP) and raises above twice that; the
        # explicit check below is what enforces max_pixels before any pixel is decoded.
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"image has zero size ({width}x{height})")
            if width * height > max_pixels:
                raise ImageDecodeError(f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")
            img.load()
            gray = img.convert("L") if img.mode not in ("L", "I;16", "I") else img
            array = np.asarray(gray)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb guard: {err}") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise ImageDecodeError(f"cannot decode {kind.upper()} ({type(err).__name__}: {err})") from None
    if array.dtype != np.uint8:  # 16-bit PNGs: stretch to 8 bits
        array = array.astype(np.float32)
        lo, hi = float(array.min()), float(array.max())
        array = ((array - lo) / max(hi - lo, 1.0) * 255.0).astype(np.uint8)
    return array


def resize(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize a uint8 (H, W) image to (size, size) with bilinear filtering (no aspect padding)."""
    if gray.shape == (size, size):
        return gray
    return np.asarray(Image.fromarray(gray).resize((size, size), Image.BILINEAR))


def normalize(gray: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> float32 (1, H, W), zero-centred."""
    return ((gray.astype(np.float32) / 255.0 - MEAN) / STD)[None]


def preprocess(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> the model's float32 (1, size, size) input."""
    return normalize(resize(decode_image(data, max_pixels), size))


def encode_png(gray: np.ndarray) -> bytes:
    """uint8 (H, W) -> PNG bytes (fast, lossless: what shards store)."""
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
