"""decode_image: every supported format to grey uint8, and every bad input to ImageDecodeError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medfusion.data.images import ImageDecodeError, decode_image, encode_png, preprocess, resize, sniff_format

RAMP = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1))  # (48, 64), 0..252 left to right


def pil_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose (valid, CRC-checked) IHDR claims width x height with no real pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    with_pixels: bool = True,
) -> bytes:
    """A minimal 16-bit DX DICOM file (Part 10, with preamble) built in memory."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if with_pixels:
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    # pydicom >= 3 spells it enforce_file_format; 2.x wrote the preamble with write_like_original=False.
    if int(pydicom.__version__.split(".")[0]) >= 3:
        ds.save_as(buf, enforce_file_format=True)
    else:  # pragma: no cover - older pydicom
        ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


DICOM_RAMP = np.tile(np.linspace(0, 4000, 50).astype(np.uint16), (40, 1))  # (40, 50), 0..4000


# --------------------------------------------------------------------------------------------
# Good inputs: [name, bytes, expected shape, check on the decoded pixels]
# --------------------------------------------------------------------------------------------

GOOD = [
    ("png-8bit", pil_bytes(Image.fromarray(RAMP), "PNG"), (48, 64), lambda a: np.array_equal(a, RAMP)),
    (
        "png-16bit-stretched",
        pil_bytes(Image.fromarray(RAMP.astype(np.uint16) * 100 + 1000), "PNG"),
        (48, 64),
        lambda a: a[0, 0] == 0 and a[0, -1] == 255 and np.all(np.diff(a[0].astype(int)) >= 0),
    ),
    (
        "jpeg",
        pil_bytes(Image.fromarray(RAMP), "JPEG", quality=95),
        (48, 64),
        lambda a: np.abs(a.astype(int) - RAMP).max() <= 8,
    ),
    (
        "png-rgb-to-grey",
        pil_bytes(Image.fromarray(np.stack([RAMP] * 3, axis=-1)), "PNG"),
        (48, 64),
        lambda a: np.abs(a.astype(int) - RAMP).max() <= 1,
    ),
    (
        "jpeg-rgb-to-grey",
        pil_bytes(Image.fromarray(np.stack([RAMP] * 3, axis=-1)), "JPEG", quality=95),
        (48, 64),
        lambda a: np.abs(a.astype(int) - RAMP).max() <= 8,
    ),
    (
        "png-palette",
        pil_bytes(Image.fromarray(RAMP).convert("P"), "PNG"),
        (48, 64),
        lambda a: np.abs(a.astype(int) - RAMP).max() <= 4,
    ),
    (
        "png-grey-alpha",
        pil_bytes(Image.fromarray(RAMP).convert("LA"), "PNG"),
        (48, 64),
        lambda a: np.array_equal(a, RAMP),
    ),
    (
        "dicom-percentile-window",
        dicom_bytes(DICOM_RAMP),
        (40, 50),
        lambda a: a[0, 0] == 0 and a[0, -1] == 255 and np.all(np.diff(a[0].astype(int)) >= 0),
    ),
    (
        "dicom-monochrome1-inverted",
        dicom_bytes(DICOM_RAMP, photometric="MONOCHROME1"),
        (40, 50),
        lambda a: a[0, 0] == 255 and a[0, -1] == 0 and np.all(np.diff(a[0].astype(int)) <= 0),
    ),
    (
        # window [500, 1500]: the stored 979 (column 12) maps to (979 - 500) / 1000 * 255 = 122
        "dicom-file-window",
        dicom_bytes(DICOM_RAMP, window=(1000, 1000)),
        (40, 50),
        lambda a: a[0, 12] == 122 and a[0, 6] == 0 and a[0, 19] == 255,
    ),
    (
        # multi-valued window: the first pair is used
        "dicom-first-of-several-windows",
        dicom_bytes(DICOM_RAMP, window=([1000, 3000], [1000, 200])),
        (40, 50),
        lambda a: a[0, 12] == 122,
    ),
    (
        # rescale (x2 - 1000) happens before the window: stored 979 -> 958 -> (958 - 500) / 1000 * 255
        "dicom-rescale-then-window",
        dicom_bytes(DICOM_RAMP, window=(1000, 1000), rescale=(2, -1000)),
        (40, 50),
        lambda a: DICOM_RAMP[0, 12] == 979 and a[0, 12] == 116,
    ),
]


@pytest.mark.parametrize("name, data, shape, check", GOOD, ids=[g[0] for g in GOOD])
def test_decode_good(name, data, shape, check):
    gray = decode_image(data)
    assert gray.dtype == np.uint8
    assert gray.shape == shape
    assert check(gray), f"{name}: unexpected pixels {gray[0, :12]}"


@pytest.mark.parametrize(
    "data, kind",
    [
        (GOOD[0][1], "png"),
        (GOOD[2][1], "jpeg"),
        (dicom_bytes(DICOM_RAMP), "dicom"),
        (b"GIF89a" + bytes(200), "unknown"),
        (b"", "unknown"),
    ],
)
def test_sniff_format(data, kind):
    assert sniff_format(data) == kind


# --------------------------------------------------------------------------------------------
# Bad inputs: [name, bytes, kwargs, words the message must contain]
# --------------------------------------------------------------------------------------------

_PNG = GOOD[0][1]
_DICOM = dicom_bytes(DICOM_RAMP)

BAD = [
    ("empty", b"", {}, "empty"),
    ("garbage", b"this is not an image at all" * 10, {}, "not a PNG, JPEG or DICOM"),
    ("gif", pil_bytes(Image.fromarray(RAMP), "GIF"), {}, "not a PNG, JPEG or DICOM"),
    ("truncated-png", _PNG[: len(_PNG) // 2], {}, "cannot decode PNG"),
    ("png-magic-only", _PNG[:8], {}, "cannot decode PNG"),
    ("truncated-jpeg", GOOD[2][1][:300], {}, "cannot decode JPEG"),
    # PIL's own bomb guard fires inside Image.open, before decode_image's limit check
    ("png-header-20000x20000", png_header_only(20000, 20000), {}, "exceeds"),
    ("png-header-over-limit", png_header_only(7000, 7000), {}, "exceeds the limit"),
    ("png-over-custom-limit", _PNG, {"max_pixels": 1000}, "exceeds the limit of 1000 pixels"),
    ("dicom-without-pixel-data", dicom_bytes(DICOM_RAMP, with_pixels=False), {}, "no pixel data"),
    ("dicom-truncated-pixels", _DICOM[:-500], {}, "DICOM pixel data cannot be decoded"),
    ("dicom-over-limit", _DICOM, {"max_pixels": 100}, "exceeds the limit of 100 pixels"),
    ("dicom-magic-then-garbage", bytes(128) + b"DICM" + b"\xff" * 64, {}, "DICOM"),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken files it reads
@pytest.mark.parametrize("name, data, kwargs, words", BAD, ids=[b[0] for b in BAD])
def test_decode_bad_raises_decode_error(name, data, kwargs, words):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    assert words in str(info.value), f"{name}: message {str(info.value)!r} lacks {words!r}"


def test_decode_error_is_a_value_error():
    # callers (the server's 400/422 mapping, ingest) may catch ValueError
    assert issubclass(ImageDecodeError, ValueError)


def test_decode_multiframe_colour_dicom_is_2d():
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(DICOM_RAMP)))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = 2
    ds.PixelData = np.zeros((2, 40, 50, 3), dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    assert decode_image(buf.getvalue()).shape == (40, 50)


def corrupt_element(data: bytes, tag_and_vr: bytes, offset: int, replacement: bytes) -> bytes:
    """`data` with `replacement` written `offset` bytes after the (explicit VR) element header."""
    at = data.index(tag_and_vr) + offset
    return data[:at] + replacement + data[at + len(replacement) :]


_WINDOWED = dicom_bytes(DICOM_RAMP, window=(1000, 1000))
CORRUPT_DICOM_HEADERS = [
    # pydicom parses elements lazily, so these raise on first access inside _decode_dicom
    ("rows-with-unknown-vr", corrupt_element(_WINDOWED, b"\x28\x00\x10\x00US", 4, b"PS")),
    ("window-center-not-a-number", corrupt_element(_WINDOWED, b"\x28\x00\x50\x10DS", 8, b"O")),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, data", CORRUPT_DICOM_HEADERS, ids=[c[0] for c in CORRUPT_DICOM_HEADERS])
def test_corrupt_dicom_header_raises_decode_error(name, data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


# --------------------------------------------------------------------------------------------
# The helpers around decoding
# --------------------------------------------------------------------------------------------


def test_encode_png_round_trips():
    assert np.array_equal(decode_image(encode_png(RAMP)), RAMP)


@pytest.mark.parametrize("size", [16, 48, 100])
def test_resize_and_preprocess_shapes(size):
    assert resize(RAMP, size).shape == (size, size)
    x = preprocess(GOOD[0][1], size)
    assert x.shape == (1, size, size) and x.dtype == np.float32


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken files it reads
@pytest.mark.parametrize("name", ["png-8bit", "png-16bit-stretched", "jpeg", "dicom-file-window"])
def test_corrupted_bytes_never_raise_another_type(name):
    """Truncations and flipped bytes of a good file: a grey uint8 image or ImageDecodeError, nothing else."""
    data = next(g[1] for g in GOOD if g[0] == name)
    rng = np.random.default_rng(0)
    variants = [data[:cut] for cut in rng.integers(1, len(data), size=20)]
    for _ in range(40):
        mutated = bytearray(data)
        for position in rng.integers(8 if name != "dicom-file-window" else 132, len(data), size=4):
            mutated[position] = int(rng.integers(0, 256))
        variants.append(bytes(mutated))
    for variant in variants:
        try:
            gray = decode_image(variant)
        except ImageDecodeError:
            continue
        assert gray.dtype == np.uint8 and gray.ndim == 2
