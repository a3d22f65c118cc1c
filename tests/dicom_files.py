"""DICOM files built in memory for the tests: the one builder every test module uses.

`dicom_file` writes a well-formed file in any transfer syntax the reader accepts (or marks one it
refuses); `deflate_bomb` writes a Deflated Explicit VR Little Endian file whose data set inflates to
any size, without ever holding it, for the decompression-bomb tests.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    generate_uid,
)

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image, for presentation
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
ZEROS_BLOCK = 2**20  # the deflate bomb repeats the compressed form of this many zero bytes
MAX_ELEMENT_BYTES = 2**31  # a value length is 32 bits: larger private data is split over elements
# Encapsulated syntaxes dicom_file encodes with Pillow; any other UID is only written into the meta.
PILLOW_FORMATS = {JPEGBaseline8Bit: "JPEG", JPEG2000Lossless: "JPEG2000"}


def dicom_file(
    pixels: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    bits: int = 16,
    shape: tuple[int, int] | None = None,
    pixel_data: bytes | None = None,
    frames: int | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> bytes:
    """A minimal DX DICOM file (Part 10, with preamble).

    Args:
        pixels: the image: (rows, cols), (rows, cols, 3) when `photometric` is RGB, with a leading frame
            axis when `frames` is given; None writes no pixel element unless `pixel_data` is given.
        photometric: PhotometricInterpretation.
        window: (WindowCenter, WindowWidth), or none.
        rescale: (RescaleSlope, RescaleIntercept), or none.
        bits: 16 (12 bits stored, as detectors write) or 8.
        shape: (Rows, Columns) of the header when it should not match `pixels` (a header-only bomb).
        pixel_data: raw PixelData bytes that replace the encoded `pixels`.
        frames: NumberOfFrames (written even without pixels, to make a header lie).
        transfer_syntax: the UID in the file meta. Deflated and the native ones are written as such,
            JPEG Baseline and JPEG 2000 Lossless are encoded with Pillow (8 bits), and with any other
            compressed UID `pixel_data` is encapsulated as it is (for the syntaxes the reader refuses).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX_SOP_CLASS, meta.MediaStorageSOPInstanceUID, "DX"
    colour = photometric in ("RGB", "YBR_FULL")
    if pixels is not None:
        frame_shape = pixels.shape[1:] if frames is not None else pixels.shape
        rows_cols = shape or frame_shape[:2]
    else:
        rows_cols = shape
    if rows_cols is not None:
        ds.Rows, ds.Columns = rows_cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = (3 if colour else 1), photometric
        if colour:
            ds.PlanarConfiguration = 0
        stored = 12 if bits == 16 else bits
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, stored, stored - 1, 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    if pixel_data is not None and UID(transfer_syntax).is_compressed:
        ds.PixelData = encapsulate([pixel_data])  # as one frame, whatever the bytes are
        ds["PixelData"].VR = "OB"
    elif pixel_data is not None:
        ds.PixelData = pixel_data
    elif pixels is not None and transfer_syntax in PILLOW_FORMATS:
        stack = pixels if frames is not None else pixels[None]
        ds.PixelData = encapsulate([_pillow_encode(f.astype(np.uint8), PILLOW_FORMATS[transfer_syntax]) for f in stack])
        ds["PixelData"].VR = "OB"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        if colour and transfer_syntax == JPEGBaseline8Bit:
            ds.PhotometricInterpretation = "YBR_FULL_422"  # what a JPEG Baseline colour file declares
    elif pixels is not None:
        byte_order = ">" if transfer_syntax == ExplicitVRBigEndian else "<"
        ds.PixelData = pixels.astype(f"{byte_order}u{bits // 8}").tobytes()
    return save(ds)


def _pillow_encode(frame: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {"irreversible": False}))
    return buf.getvalue()


def save(ds: Dataset) -> bytes:
    """`ds` as Part 10 file bytes (pydicom 3 deflates the data set itself for the deflated syntax)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def deflate_bomb(
    rows: int = 64,
    cols: int = 64,
    *,
    frames: int | None = None,
    samples: int = 1,
    pixel_bytes: int,
    private_bytes: int = 0,
) -> bytes:
    """A Deflated Explicit VR Little Endian DICOM whose data set inflates to about `pixel_bytes` + `private_bytes`.

    The header is honest about what it declares (`rows` x `cols`, `frames`, `samples`, 16 bits), and the
    pixel element holds `pixel_bytes` zeros (under 4 GiB), whatever the header says. With `private_bytes`,
    private OB elements of that many zeros in all come before the pixel data (a bomb in the header). Each
    mebibyte of zeros compresses to about a kilobyte: the deflate stream is cut with full flushes, so
    every block of zeros compresses to the same bytes and the file is built without ever holding the
    inflated data.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = DX_SOP_CLASS, meta.MediaStorageSOPInstanceUID, "DX"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "RGB" if samples == 3 else "MONOCHROME2"
    if samples == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames is not None:
        ds.NumberOfFrames = frames
    header = io.BytesIO()
    write_file_meta_info(header, meta, enforce_standard=True)
    body = pydicom.filebase.DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [b"\0" * 128, b"DICM", header.getvalue(), compressor.compress(body.getvalue())]
    if private_bytes:
        parts.append(compressor.compress(b"\x09\x00\x10\x00LO\x04\x00ACME"))  # (0009,0010) private creator
        for element, start in enumerate(range(0, private_bytes, MAX_ELEMENT_BYTES)):  # (0009,1000), (0009,1001)...
            size = min(MAX_ELEMENT_BYTES, private_bytes - start)
            parts.append(compressor.compress(struct.pack("<HH", 0x0009, 0x1000 + element) + b"OB\0\0"))
            parts.append(compressor.compress(struct.pack("<I", size)))
            parts += _zeros(compressor, size)
    parts.append(compressor.compress(PIXEL_DATA_TAG + b"OW\0\0" + struct.pack("<I", pixel_bytes)))
    parts += _zeros(compressor, pixel_bytes)
    parts.append(compressor.flush())
    return b"".join(parts)


def _zeros(compressor: zlib._Compress, count: int) -> list[bytes]:
    """`count` zero bytes through `compressor`: one compressed block reused for each full mebibyte."""
    parts = [compressor.flush(zlib.Z_FULL_FLUSH)]  # a full flush resets the history: blocks repeat exactly
    whole, rest = divmod(count, ZEROS_BLOCK)
    if whole:
        block = compressor.compress(b"\0" * ZEROS_BLOCK) + compressor.flush(zlib.Z_FULL_FLUSH)
        parts.append(block * whole)
    parts.append(compressor.compress(b"\0" * rest))
    return parts


def inflated_size(data: bytes, stop_at: int | None = None) -> int:
    """What the deflated data set of `data` inflates to, counted in pieces and never held whole (or, with
    `stop_at`, a count of at least that much once it is reached: 13 GB take half a minute to count)."""
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, data[meta_end:]
    while pending and (stop_at is None or total < stop_at):
        total += len(inflater.decompress(pending, ZEROS_BLOCK))
        pending = inflater.unconsumed_tail
    return total
