"""Decoding and preprocessing of images: one place for PNG, JPEG and DICOM.

Ingest, the Ray Data reader, the predictor and the server all go through `decode_image` and
`resize` (`pixels`), and every model input through `normalize`'s arithmetic (done on the device by
`medfusion.models.to_tensors`), so training and inference see the same pixels.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# Guards against decompression bombs: a 20k x 20k PNG header is a few bytes but 400 MP decoded.
DEFAULT_MAX_PIXELS = 40_000_000
MEAN, STD = 0.5, 0.25  # after scaling to [0, 1]; chest films are roughly centred grey

DICOM_MAGIC_OFFSET = 128
# Deflated data sets are inflated only as far as they are read. Before the pixel data that is the
# header, and a header that inflates past this is refused (real ones are a few kilobytes to a few
# hundred). The pixel data then costs at most the first frame, whose size the header bounds.
DICOM_MAX_HEADER_BYTES = 4 * 2**20

DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"
# Uncompressed pixel data: (implicit VR, little endian) of each transfer syntax.
_NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": (True, True),  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": (False, True),  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": (False, False),  # Explicit VR Big Endian
    DEFLATED_EXPLICIT_VR_LE: (False, True),
}
# Encapsulated pixel data Pillow decodes; its codestream header is checked against Rows and Columns
# before a pixel is decoded.
_PILLOW_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": "JPEG",  # JPEG Extended (Process 2 and 4), 8-bit only
    "1.2.840.10008.1.2.4.90": "JPEG2000",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91": "JPEG2000",  # JPEG 2000
}
_SUPPORTED = "uncompressed, deflated, JPEG Baseline/Extended or JPEG 2000"
_PIXEL_DATA = 0x7FE00010
_PIXEL_TAGS = (_PIXEL_DATA, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float and Double Float Pixel Data
_UNDEFINED_LENGTH = 0xFFFFFFFF


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read, or the image is outside the limits."""


class ImageTooLargeError(ImageDecodeError):
    """The image declares (or would inflate to) more than the limits allow."""


class UnsupportedImageError(ImageDecodeError):
    """A format or encoding the decoder refuses, e.g. a DICOM transfer syntax it cannot bound."""


def sniff_format(data: bytes) -> str:
    """'png', 'jpeg', 'dicom', or 'unknown' from the leading bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if len(data) > DICOM_MAGIC_OFFSET + 4 and data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    return "unknown"


def _too_large(width: int, height: int, max_pixels: int, frames: int = 1, samples: int = 1) -> ImageTooLargeError:
    layers = f" x {frames} frames" * (frames > 1) + f" x {samples} samples" * (samples > 1)
    total = f" ({width * height * frames * samples} values)" if layers else ""
    return ImageTooLargeError(
        f"image of {width}x{height} pixels{layers}{total} exceeds the limit of {max_pixels} pixels"
    )


@dataclass(frozen=True)
class DicomHeader:
    """What a DICOM file declares about its pixels, read before any pixel is."""

    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    samples: int
    """Samples per pixel: 1 (grey) or 3 (colour)."""
    bits_allocated: int

    @property
    def values(self) -> int:
        """Every value the pixel data declares: rows x columns x frames x samples (what max_pixels bounds)."""
        return self.rows * self.columns * self.frames * self.samples


class _Inflater:
    """A seekable, read-only file over a raw deflate stream, inflated only as far as it is read.

    pydicom inflates a deflated data set whole, in one call, before it reads the first element, so a
    few megabytes can become gigabytes. This holds what was read so far (what pydicom's reader seeks
    back into) and refuses to hold more than `limit` bytes.
    """

    CHUNK = 64 * 1024

    def __init__(self, compressed: memoryview, limit: int) -> None:
        self._compressed = compressed
        self._consumed = 0
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._inflated = bytearray()
        self._position = 0
        self.limit = limit

    def _fill(self, end: int) -> None:
        while len(self._inflated) < end and not self._inflate.eof:
            room = self.limit - len(self._inflated)
            if room <= 0:
                raise ImageTooLargeError(
                    f"the deflated DICOM data set inflates past {self.limit} bytes before the end of what is read "
                    f"(the header may take at most {DICOM_MAX_HEADER_BYTES} bytes, the pixel data one frame)"
                )
            pending = self._inflate.unconsumed_tail
            if not pending:
                if self._consumed >= len(self._compressed):
                    raise ImageDecodeError("the deflated DICOM data set is truncated (its deflate stream has no end)")
                pending = self._compressed[self._consumed : self._consumed + self.CHUNK]
                self._consumed += len(pending)
            self._inflated += self._inflate.decompress(pending, min(room, self.CHUNK))

    def read(self, size: int = -1) -> bytes:
        end = self.limit + 1 if size is None or size < 0 else self._position + size
        self._fill(end)
        with memoryview(self._inflated) as view:  # released at once: a live view would pin the bytearray
            chunk = bytes(view[self._position : end])
        self._position += len(chunk)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(self.limit + 1)
            offset += len(self._inflated)
        elif whence == 1:
            offset += self._position
        self._position = max(offset, 0)
        return self._position

    def tell(self) -> int:
        return self._position


def _int(ds: Any, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    return default if value is None or value == "" else int(value)


def _is_file_meta(tag: Any, vr: Any, length: int) -> bool:
    return tag.group != 0x0002


def _is_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return int(tag) in _PIXEL_TAGS


def _open_dicom(data: bytes) -> tuple[str, Any, Any, bool, bool]:
    """The transfer syntax, the data set up to its pixel data, and the stream positioned there.

    The file meta is read first: it names the transfer syntax, which says how the rest is encoded and
    whether it can be read within bounds at all.
    """
    from pydicom.filereader import read_dataset

    file = io.BytesIO(data)
    file.seek(DICOM_MAGIC_OFFSET + 4)
    meta = read_dataset(file, is_implicit_VR=False, is_little_endian=True, stop_when=_is_file_meta)
    syntax = str(meta.get("TransferSyntaxUID", "") or "").strip("\0 ")
    if not syntax:
        raise ImageDecodeError("the DICOM file meta has no Transfer Syntax UID (0002,0010)")
    if syntax not in _NATIVE_SYNTAXES and syntax not in _PILLOW_SYNTAXES:
        raise UnsupportedImageError(f"DICOM transfer syntax {_syntax_name(syntax)} is not supported{_why(syntax)}")
    implicit_vr, little_endian = _NATIVE_SYNTAXES.get(syntax, (False, True))
    stream: Any = file
    if syntax == DEFLATED_EXPLICIT_VR_LE:
        stream = _Inflater(memoryview(data)[file.tell() :], DICOM_MAX_HEADER_BYTES)
    ds = read_dataset(stream, implicit_vr, little_endian, stop_when=_is_pixel_data)
    return syntax, ds, stream, implicit_vr, little_endian


def _syntax_name(syntax: str) -> str:
    from pydicom.uid import UID

    name = UID(syntax).name
    return name if name != syntax else syntax


def _why(syntax: str) -> str:
    if syntax == "1.2.840.10008.1.2.5":  # RLE Lossless: pydicom expands a segment whole before checking its size
        return f" (its decoder expands each segment without a bound); send {_SUPPORTED} DICOM"
    return f": send {_SUPPORTED} DICOM"


def _header(syntax: str, ds: Any, max_pixels: int) -> DicomHeader:
    header = DicomHeader(
        transfer_syntax=syntax,
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        frames=_int(ds, "NumberOfFrames", 1),
        samples=_int(ds, "SamplesPerPixel", 1),
        bits_allocated=_int(ds, "BitsAllocated", 0),
    )
    if header.rows <= 0 or header.columns <= 0:
        raise ImageDecodeError(f"DICOM image has zero size ({header.columns}x{header.rows}: Rows or Columns missing)")
    if header.frames < 1:
        raise ImageDecodeError(f"DICOM Number of Frames must be at least 1, got {header.frames}")
    if header.samples not in (1, 3):
        raise UnsupportedImageError(f"DICOM with {header.samples} samples per pixel is not supported (1 or 3)")
    if header.values > max_pixels:
        raise _too_large(header.columns, header.rows, max_pixels, header.frames, header.samples)
    if syntax in _NATIVE_SYNTAXES and header.bits_allocated not in (8, 16, 32):
        raise UnsupportedImageError(f"DICOM with {header.bits_allocated} bits allocated is not supported (8, 16, 32)")
    return header


def _pixel_element(stream: Any, implicit_vr: bool, little_endian: bool) -> int:
    """Read the pixel data element's header at the stream's position; return its value's length."""
    order = "<" if little_endian else ">"
    head = stream.read(8)
    if len(head) < 8:
        raise ImageDecodeError("DICOM file has no pixel data")
    group, element = struct.unpack(f"{order}HH", head[:4])
    if (group << 16 | element) != _PIXEL_DATA:
        raise UnsupportedImageError("DICOM float pixel data is not supported")
    if implicit_vr:
        return struct.unpack(f"{order}I", head[4:8])[0]
    if head[4:6] in (b"OB", b"OW", b"UN", b"OV", b"OF", b"OD"):  # the 32-bit length follows 2 reserved bytes
        return struct.unpack(f"{order}I", stream.read(4))[0]
    return struct.unpack(f"{order}H", head[6:8])[0]


def read_dicom_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> DicomHeader:
    """What a DICOM file declares about its pixels, read without reading a pixel.

    The file meta comes first (it names the transfer syntax); a deflated data set is inflated only up
    to its pixel data, within DICOM_MAX_HEADER_BYTES.

    Raises:
        UnsupportedImageError: a transfer syntax or pixel layout the decoder refuses.
        ImageTooLargeError: rows x columns x frames x samples over `max_pixels`, or a deflated header
            that inflates past its allowance.
        ImageDecodeError: an unreadable header, or no pixel data.
    """
    try:
        syntax, ds, stream, implicit_vr, little_endian = _open_dicom(data)
        header = _header(syntax, ds, max_pixels)
        _pixel_element(stream, implicit_vr, little_endian)
        return header
    except ImageDecodeError:
        raise
    except Exception as err:  # pydicom parses elements lazily: a corrupt header raises, of any type, on first access
        raise ImageDecodeError(f"not a readable DICOM file ({type(err).__name__}: {err})") from None


def _decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    try:
        syntax, ds, stream, implicit_vr, little_endian = _open_dicom(data)
        header = _header(syntax, ds, max_pixels)
        length = _pixel_element(stream, implicit_vr, little_endian)
    except ImageDecodeError:
        raise
    except Exception as err:  # pydicom parses elements lazily: a corrupt header raises, of any type, on first access
        raise ImageDecodeError(f"not a readable DICOM file ({type(err).__name__}: {err})") from None
    try:
        if syntax in _PILLOW_SYNTAXES:
            pixels, native = _encapsulated_frame(stream, header, length), False
        else:
            pixels, native = _native_frame(data, stream, header, length, ds, little_endian), True
        return _window(ds, pixels, native)
    except ImageDecodeError:
        raise
    except Exception as err:
        raise ImageDecodeError(f"DICOM pixel data cannot be decoded ({type(err).__name__}: {err})") from None


def _native_frame(
    data: bytes, stream: Any, header: DicomHeader, length: int, ds: Any, little_endian: bool
) -> np.ndarray:
    """The first frame of uncompressed pixel data as float32 (H, W) or (H, W, samples); the others stay unread."""
    size = header.bits_allocated // 8
    frame_bytes = header.rows * header.columns * header.samples * size
    if length == _UNDEFINED_LENGTH or length < frame_bytes * header.frames:
        raise ImageDecodeError(
            f"DICOM pixel data cannot be decoded: the element holds {length} bytes, {header.frames} frame(s) of "
            f"{header.columns}x{header.rows}x{header.samples} at {header.bits_allocated} bits need "
            f"{frame_bytes * header.frames}"
        )
    if isinstance(stream, _Inflater):
        stream.limit = stream.tell() + frame_bytes  # inflate the first frame and nothing after it
        raw: Any = stream.read(frame_bytes)
    else:  # the request's own bytes, read in place (BytesIO.getbuffer would copy them)
        start = stream.tell()
        raw = memoryview(data)[start : start + frame_bytes]
    if len(raw) < frame_bytes:
        raise ImageDecodeError(f"DICOM pixel data cannot be decoded: truncated ({len(raw)} of {frame_bytes} bytes)")
    signed = _int(ds, "PixelRepresentation", 0) == 1
    dtype = np.dtype(f"{'<' if little_endian else '>'}{'i' if signed else 'u'}{size}")
    values = np.frombuffer(raw, dtype=dtype, count=header.rows * header.columns * header.samples)
    stored = _int(ds, "BitsStored", header.bits_allocated)
    if 0 < stored < header.bits_allocated:  # the bits above BitsStored are not part of the value
        if signed:
            shift = header.bits_allocated - stored
            values = (values << shift) >> shift
        else:
            values = values & np.array((1 << stored) - 1, dtype=dtype)
    if header.samples == 1:
        return values.reshape(header.rows, header.columns).astype(np.float32)
    if _int(ds, "PlanarConfiguration", 0) == 1:  # colour by plane: RRR...GGG...BBB...
        return np.moveaxis(values.reshape(header.samples, header.rows, header.columns), 0, -1).astype(np.float32)
    return values.reshape(header.rows, header.columns, header.samples).astype(np.float32)


def _encapsulated_frame(stream: Any, header: DicomHeader, length: int) -> np.ndarray:
    """The first frame of JPEG or JPEG 2000 pixel data, decoded by Pillow once its own header matches the file's."""
    from pydicom.encaps import get_frame

    if length != _UNDEFINED_LENGTH:
        raise ImageDecodeError("DICOM pixel data cannot be decoded: encapsulated pixel data must have undefined length")
    frame = get_frame(stream, 0, number_of_frames=header.frames)
    with Image.open(io.BytesIO(frame), formats=[_PILLOW_SYNTAXES[header.transfer_syntax]]) as img:
        bands = len(img.getbands())
        if img.size != (header.columns, header.rows) or bands > header.samples:
            width, height = img.size
            raise ImageDecodeError(
                f"DICOM pixel data cannot be decoded: its first frame is {width}x{height} with {bands} components, "
                f"the DICOM header says {header.columns}x{header.rows} with {header.samples}"
            )
        img.load()
        return np.asarray(img).astype(np.float32)


def _window(ds: Any, pixels: np.ndarray, native: bool) -> np.ndarray:
    """Float pixels of one frame -> grey uint8: rescale, the file's window (else percentiles), MONOCHROME1 inverted."""
    from pydicom.multival import MultiValue

    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if pixels.ndim == 3:
        # Colour: the luma plane when the values are stored as YBR, else the mean over channels.
        pixels = pixels[..., 0] if native and photometric.startswith("YBR") else pixels[..., :3].mean(-1)
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    pixels = pixels * slope + intercept
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = max(float(width[0] if isinstance(width, MultiValue) else width), 1.0)
        lo, hi = center - width / 2, center + width / 2
    else:
        lo, hi = float(np.percentile(pixels, 0.5)), float(np.percentile(pixels, 99.5))
        hi = max(hi, lo + 1.0)
    scaled = np.clip((pixels - lo) / (hi - lo), 0.0, 1.0) * 255.0
    if photometric == "MONOCHROME1":
        scaled = 255.0 - scaled  # MONOCHROME1 stores bright as low values
    return scaled.astype(np.uint8)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes to a grayscale uint8 array (H, W).

    DICOM is windowed to 8 bits (the file's window, else the 0.5-99.5 percentile range). Its first
    frame is the image; `max_pixels` bounds every value the file declares (rows x columns x frames x
    samples), checked on the header, and only the first frame is inflated (deflated files), decoded
    and converted.

    Raises:
        ImageDecodeError: empty, truncated or corrupt input, with the reason; its subclasses
            ImageTooLargeError (over `max_pixels`) and UnsupportedImageError (a format or DICOM
            transfer syntax the decoder refuses).
    """
    if not data:
        raise ImageDecodeError("empty image")
    kind = sniff_format(data)
    if kind == "dicom":
        return _decode_dicom(data, max_pixels)
    if kind == "unknown":
        raise UnsupportedImageError("not a PNG, JPEG or DICOM image (unrecognized leading bytes)")
    try:
        # No warnings.catch_warnings() here: it swaps process-global state and is not thread-safe.
        # PIL only warns above Image.MAX_IMAGE_PIXELS (~89 MP) and raises above twice that; the
        # explicit check below is what enforces max_pixels before any pixel is decoded.
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageDecodeError(f"image has zero size ({width}x{height})")
            if width * height > max_pixels:
                raise _too_large(width, height, max_pixels)
            img.load()
            gray = img.convert("L") if img.mode not in ("L", "I;16", "I") else img
            array = np.asarray(gray)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"decompression bomb guard: {err}") from None
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


def normalize_levels(levels: Any) -> Any:
    """float32 grey levels in [0, 255] -> the model's zero-centred input, same shape. The one formula
    for numpy arrays and torch tensors (`medfusion.models.to_tensors` applies it on the device)."""
    return (levels / 255.0 - MEAN) / STD


def normalize(gray: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> float32 (1, H, W), zero-centred."""
    return normalize_levels(gray.astype(np.float32))[None]


def pixels(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded bytes -> the uint8 (size, size) grey levels a model batch carries."""
    return resize(decode_image(data, max_pixels), size)


def encode_png(gray: np.ndarray) -> bytes:
    """uint8 (H, W) -> PNG bytes (fast, lossless: what shards store)."""
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
