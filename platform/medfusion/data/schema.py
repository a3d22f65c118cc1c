"""The one in-memory record every source produces, and the Parquet schema of the shards.

Sources (synthetic, generic manifest, IU X-Ray) yield `Sample`s; the shard writer turns them into
rows of `SHARD_SCHEMA`. `box` is normalized xyxy in [0, 1] (fractions of width and height), or
None when the image has no lesion; readers take any list of 4 (older datasets wrote a fixed-size list).

Schema 2 adds the boxes per finding: `box_labels[k]` is the class index of `boxes[k]` (NIH
ChestX-ray14 gives up to 3 findings per image, each with its own box). `box` stays the first of
them, for readers of schema 1. Schema 1 datasets (no per-finding columns) are still read: their one
box belongs to each of the row's labels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from medfusion.config import SPLITS

SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)
__all__ = ["SCHEMA_VERSION", "SUPPORTED_SCHEMA_VERSIONS", "SHARD_SCHEMA", "SPLITS", "Sample"]

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
        pa.field("box_labels", pa.list_(pa.int32()), nullable=True),
        pa.field("boxes", pa.list_(pa.list_(pa.float32())), nullable=True),
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
    class_boxes: list[tuple[int, tuple[float, float, float, float]]] = field(default_factory=list)
    """(class index, normalized xyxy box) per finding that has a box; empty: `box` belongs to every label."""

    def finding_boxes(self) -> list[tuple[int, tuple[float, float, float, float]]]:
        """The boxes per finding: `class_boxes`, or the one `box` given to each label."""
        if self.class_boxes:
            return list(self.class_boxes)
        return [] if self.box is None else [(int(label), self.box) for label in self.labels]

    def row(self) -> dict:
        boxes = self.finding_boxes()
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
            "box_labels": [label for label, _ in boxes],
            "boxes": [[float(v) for v in box] for _, box in boxes],
        }
