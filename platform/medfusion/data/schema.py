"""The one in-memory record every source produces, and the Parquet schema of the shards.

Sources (synthetic, generic manifest, IU X-Ray) yield `Sample`s; the shard writer turns them into
rows of `SHARD_SCHEMA`. `box` is normalized xyxy in [0, 1] (fractions of width and height), or
None when the image has no lesion; readers take any list of 4 (older datasets wrote a fixed-size list).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from medfusion.config import SPLITS

SCHEMA_VERSION = 1
__all__ = ["SCHEMA_VERSION", "SHARD_SCHEMA", "SPLITS", "Sample"]

SHARD_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("report", pa.string(), nullable=False),
        pa.field("findings", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.int32()), nullable=False),
        # A variable-length list holding 4 values (not a fixed-size list): some pyarrow releases cannot
        # read back a null fixed-size list from Parquet ("Expected all lists to be of size=4").
        pa.field("box", pa.list_(pa.float32()), nullable=True),
    ]
)


@dataclass
class Sample:
    """One image with its texts and ground truth, before sharding."""

    sample_id: str
    patient_id: str
    image: bytes
    """Encoded image (PNG or JPEG; DICOM is converted to PNG at ingest)."""
    height: int
    width: int
    report: str
    """The clinical note available before the read (text-encoder input); may be empty."""
    findings: str
    """The radiologist's description (generation target)."""
    labels: list[int]
    """Class indices into the dataset's class list."""
    box: tuple[float, float, float, float] | None = None
    """Normalized xyxy lesion box, or None."""
    split: str | None = None
    """train / val / test when the source fixes it; otherwise assigned by patient hash."""

    def row(self) -> dict:
        return {
            "sample_id": self.sample_id,
            "patient_id": self.patient_id,
            "image": self.image,
            "height": int(self.height),
            "width": int(self.width),
            "report": self.report,
            "findings": self.findings,
            "labels": [int(i) for i in self.labels],
            "box": None if self.box is None else [float(v) for v in self.box],
        }
