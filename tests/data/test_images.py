"""decode_image: every supported format to grey uint8, and every bad input to ImageDecodeError."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
)

from dicom_files import deflate_bomb, dicom_file, inflated_size, save
from medfusion.data.images import (
    DicomHeader,
    ImageDecodeError,
    ImageTooLargeError,
    UnsupportedImageError,
    decode_image,
    encode_png,
    normalize,
    pixels,
    read_dicom_header,
    resize,
    sniff_format,
)

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


DICOM_RAMP = np.tile(np.linspace(0, 4000, 50).astype(np.uint16), (40, 1))  # (40, 50), 0..4000


def SAME_AS_PLAIN(gray: np.ndarray) -> bool:  # noqa: N802 - reads as a constant in the table
    """The pixels of the plain Explicit VR Little Endian file of DICOM_RAMP with window (1000, 1000)."""
    return np.array_equal(gray, decode_image(dicom_file(DICOM_RAMP, window=(1000, 1000))))


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
        dicom_file(DICOM_RAMP),
        (40, 50),
        lambda a: a[0, 0] == 0 and a[0, -1] == 255 and np.all(np.diff(a[0].astype(int)) >= 0),
    ),
    (
        "dicom-monochrome1-inverted",
        dicom_file(DICOM_RAMP, photometric="MONOCHROME1"),
        (40, 50),
        lambda a: a[0, 0] == 255 and a[0, -1] == 0 and np.all(np.diff(a[0].astype(int)) <= 0),
    ),
    (
        # window [500, 1500]: the stored 979 (column 12) maps to (979 - 500) / 1000 * 255 = 122
        "dicom-file-window",
        dicom_file(DICOM_RAMP, window=(1000, 1000)),
        (40, 50),
        lambda a: a[0, 12] == 122 and a[0, 6] == 0 and a[0, 19] == 255,
    ),
    (
        # multi-valued window: the first pair is used
        "dicom-first-of-several-windows",
        dicom_file(DICOM_RAMP, window=([1000, 3000], [1000, 200])),
        (40, 50),
        lambda a: a[0, 12] == 122,
    ),
    (
        # rescale (x2 - 1000) happens before the window: stored 979 -> 958 -> (958 - 500) / 1000 * 255
        "dicom-rescale-then-window",
        dicom_file(DICOM_RAMP, window=(1000, 1000), rescale=(2, -1000)),
        (40, 50),
        lambda a: DICOM_RAMP[0, 12] == 979 and a[0, 12] == 116,
    ),
    # Every transfer syntax the reader takes gives the pixels of the plain file.
    *[
        (f"dicom-{name}", dicom_file(DICOM_RAMP, window=(1000, 1000), transfer_syntax=uid), (40, 50), SAME_AS_PLAIN)
        for name, uid in [
            ("deflated", DeflatedExplicitVRLittleEndian),
            ("implicit-vr", ImplicitVRLittleEndian),
            ("big-endian", ExplicitVRBigEndian),
        ]
    ],
    (
        # multi-frame: the first frame, alone
        "dicom-multiframe-first-frame",
        dicom_file(np.stack([DICOM_RAMP, DICOM_RAMP[:, ::-1]]), window=(1000, 1000), frames=2),
        (40, 50),
        SAME_AS_PLAIN,
    ),
    (
        # colour: the mean of the channels (all three equal here)
        "dicom-rgb",
        dicom_file(np.stack([RAMP[:40, :50]] * 3, axis=-1), photometric="RGB", bits=8),
        (40, 50),
        lambda a: a[0, 0] == 0 and a[0, -1] == 255 and np.all(np.diff(a[0].astype(int)) >= 0),
    ),
    *[
        (
            f"dicom-{name}",
            dicom_file(RAMP, bits=8, window=(128, 256), transfer_syntax=uid),
            (48, 64),
            lambda a, tolerance=tolerance: np.abs(a.astype(int) - RAMP).max() <= tolerance,
        )
        for name, uid, tolerance in [("jpeg-baseline", JPEGBaseline8Bit, 8), ("jpeg2000-lossless", JPEG2000Lossless, 1)]
    ],
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
        (dicom_file(DICOM_RAMP), "dicom"),
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
_DICOM = dicom_file(DICOM_RAMP)

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
    ("dicom-without-pixel-data", dicom_file(shape=DICOM_RAMP.shape), {}, "no pixel data"),
    ("dicom-truncated-pixels", _DICOM[:-500], {}, "DICOM pixel data cannot be decoded"),
    ("dicom-over-limit", _DICOM, {"max_pixels": 100}, "exceeds the limit of 100 pixels"),
    ("dicom-magic-then-garbage", bytes(128) + b"DICM" + b"\xff" * 64, {}, "DICOM"),
    # The limit counts every value the file declares: rows x columns x frames x samples per pixel.
    (
        "dicom-frames-over-limit",
        dicom_file(shape=(40, 50), frames=3, pixel_data=bytes(16)),
        {"max_pixels": 5000},
        "exceeds the limit of 5000 pixels",
    ),
    (
        "dicom-samples-over-limit",
        dicom_file(np.zeros((40, 50, 3), np.uint8), photometric="RGB", bits=8),
        {"max_pixels": 5000},
        "exceeds the limit of 5000 pixels",
    ),
    (
        "dicom-pixel-data-short-of-frames",
        dicom_file(shape=(40, 50), frames=2, pixel_data=DICOM_RAMP.tobytes()),
        {},
        "DICOM pixel data cannot be decoded",
    ),
    # Deflated: the header says 64x64 but 32000 frames (260 MB inflated from 250 KB).
    (
        "dicom-deflate-bomb-frames",
        deflate_bomb(frames=32_000, pixel_bytes=64 * 64 * 2 * 32_000),
        {},
        "exceeds the limit",
    ),
    (
        "dicom-deflated-header-bomb",
        deflate_bomb(pixel_bytes=64 * 64 * 2, private_bytes=64 * 2**20),
        {},
        "inflates past",
    ),
    (
        "dicom-deflated-truncated",
        dicom_file(DICOM_RAMP, transfer_syntax=DeflatedExplicitVRLittleEndian)[:-300],
        {},
        "DICOM",
    ),
    (
        "dicom-deflated-garbage",
        dicom_file(DICOM_RAMP, transfer_syntax=DeflatedExplicitVRLittleEndian)[:-400] + b"\xff" * 300,
        {},
        "DICOM",
    ),
    # What the reader cannot bound before decoding is refused with the transfer syntax's name.
    (
        "dicom-rle",
        dicom_file(shape=(40, 50), pixel_data=b"\0" * 64, transfer_syntax=RLELossless),
        {},
        "RLE Lossless is not supported",
    ),
    (
        "dicom-jpeg-lossless",
        dicom_file(shape=(40, 50), pixel_data=b"\0" * 64, transfer_syntax=JPEGLosslessSV1),
        {},
        "is not supported",
    ),
    # An encapsulated JPEG whose own header is larger than the DICOM header says: refused before decoding.
    (
        "dicom-jpeg-larger-than-header",
        dicom_file(np.zeros((400, 500), np.uint8), bits=8, shape=(40, 50), transfer_syntax=JPEGBaseline8Bit),
        {},
        "the DICOM header says 50x40",
    ),
]


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the broken files it reads
@pytest.mark.parametrize("name, data, kwargs, words", BAD, ids=[b[0] for b in BAD])
def test_decode_bad_raises_decode_error(name, data, kwargs, words):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    assert words in str(info.value), f"{name}: message {str(info.value)!r} lacks {words!r}"


# What the server maps to 415 and 422 (the rest of BAD is a plain ImageDecodeError: 400).
KINDS = {
    "garbage": UnsupportedImageError,
    "gif": UnsupportedImageError,
    "dicom-rle": UnsupportedImageError,
    "dicom-jpeg-lossless": UnsupportedImageError,
    "png-header-20000x20000": ImageTooLargeError,
    "png-header-over-limit": ImageTooLargeError,
    "png-over-custom-limit": ImageTooLargeError,
    "dicom-over-limit": ImageTooLargeError,
    "dicom-frames-over-limit": ImageTooLargeError,
    "dicom-samples-over-limit": ImageTooLargeError,
    "dicom-deflate-bomb-frames": ImageTooLargeError,
    "dicom-deflated-header-bomb": ImageTooLargeError,
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, data, kwargs, words", BAD, ids=[b[0] for b in BAD])
def test_refusal_kind(name, data, kwargs, words):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    expected = KINDS.get(name)
    if expected is None:
        assert not isinstance(info.value, (UnsupportedImageError, ImageTooLargeError)), name
    else:
        assert isinstance(info.value, expected), f"{name}: {type(info.value).__name__}"


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    "name", [n for n in KINDS if n.startswith("dicom")] + ["dicom-without-pixel-data", "dicom-magic-then-garbage"]
)
def test_read_dicom_header_refuses_what_decode_refuses_from_the_header(name):
    """The server's header check and the decoder share one reader, so they refuse the same files the same way."""
    _, data, kwargs, words = next(b for b in BAD if b[0] == name)
    with pytest.raises(ImageDecodeError) as info:
        read_dicom_header(data, **kwargs)
    assert words in str(info.value) and type(info.value) is KINDS.get(name, ImageDecodeError)


def test_read_dicom_header_declares_without_reading_pixels():
    bomb = deflate_bomb(frames=2, samples=3, rows=30, cols=20, pixel_bytes=250 * 2**20)
    header = read_dicom_header(bomb)
    assert header == DicomHeader(DeflatedExplicitVRLittleEndian, 30, 20, 2, 3, 16) and header.values == 3600
    assert peak_allocated(read_dicom_header, bomb) < 2**20


def test_decode_error_is_a_value_error():
    # callers (the server's 400/422 mapping, ingest) may catch ValueError
    assert issubclass(ImageDecodeError, ValueError)


def test_decode_multiframe_colour_dicom_is_2d():
    ds = pydicom.dcmread(io.BytesIO(dicom_file(DICOM_RAMP)))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.NumberOfFrames = 2
    ds.PixelData = np.zeros((2, 40, 50, 3), dtype=np.uint8).tobytes()
    assert decode_image(save(ds)).shape == (40, 50)


def peak_allocated(fn, *args, **kwargs) -> int:
    """Bytes allocated at the peak while `fn` runs (tracemalloc sees zlib's buffers and numpy's arrays)."""
    tracemalloc.start()
    try:
        try:
            fn(*args, **kwargs)
        except ImageDecodeError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


MiB = 2**20
BOMBS = [
    # (name, file, max_pixels): each inflates to 250 MB or more from 250 KB
    ("frames", deflate_bomb(frames=32_000, pixel_bytes=64 * 64 * 2 * 32_000), 2_000_000),
    ("pixel-element", deflate_bomb(pixel_bytes=250 * MiB), 2_000_000),
    ("header", deflate_bomb(pixel_bytes=64 * 64 * 2, private_bytes=250 * MiB), 2_000_000),
]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, data, max_pixels", BOMBS, ids=[b[0] for b in BOMBS])
def test_deflate_bomb_inflates_within_budget(name, data, max_pixels):
    """A deflated data set is inflated only as far as the header and the first frame go, within the budget."""
    assert len(data) < 300_000 and inflated_size(data) > 250 * MiB
    # the budget: the header allowance plus one float32 frame of at most max_pixels values, a few times over
    assert peak_allocated(decode_image, data, max_pixels) < 4 * MiB + 4 * 4 * max_pixels


def test_deflated_pixel_element_longer_than_its_frames_reads_only_the_first_frame():
    gray = decode_image(deflate_bomb(pixel_bytes=250 * MiB))
    assert gray.shape == (64, 64) and gray.dtype == np.uint8


def test_only_the_first_frame_is_converted():
    frames = np.random.default_rng(0).integers(0, 4000, (8, 500, 500)).astype(np.uint16)
    data = dicom_file(frames, frames=8)
    one_frame_float = 500 * 500 * 4
    assert decode_image(data).shape == (500, 500)
    # the file's pixel data (4 MB) is read in place; only frame 0 becomes float32 (1 MB), with a few temporaries
    assert peak_allocated(decode_image, data) < 6 * one_frame_float


def corrupt_element(data: bytes, tag_and_vr: bytes, offset: int, replacement: bytes) -> bytes:
    """`data` with `replacement` written `offset` bytes after the (explicit VR) element header."""
    at = data.index(tag_and_vr) + offset
    return data[:at] + replacement + data[at + len(replacement) :]


_WINDOWED = dicom_file(DICOM_RAMP, window=(1000, 1000))
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
def test_resize_pixels_and_normalize_shapes(size):
    assert resize(RAMP, size).shape == (size, size)
    grey = pixels(GOOD[0][1], size)
    assert grey.shape == (size, size) and grey.dtype == np.uint8
    x = normalize(grey)
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
