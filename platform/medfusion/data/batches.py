"""Shard rows -> model batches. The one preprocessing function of training, evaluation and baselines.

A model batch is a dict of numpy arrays (torch tensors once on the worker):

    image          uint8   (B, 1, S, S)  grey levels; `medfusion.models.to_tensors` normalizes them
                                         on the device (medfusion.data.images.normalize), so a batch
                                         moves a quarter of the bytes of float32 pixels
    report_ids     int64   (B, Tr)       note tokens, <pad>=0; an all-pad row means "no note"
    findings_ids   int64   (B, Tf)       <bos> findings <eos> <pad>...
    labels         float32 (B, C)        multi-hot (exactly one 1 per row for single-label data)
    box            float32 (B, 4)        normalized xyxy, zeros where there is no lesion
    has_box        float32 (B,)          1.0 where `box` is a real lesion box
    class_boxes    float32 (B, C, 4)     normalized xyxy box of each finding, zeros where it has none
    class_has_box  float32 (B, C)        1.0 where the finding is present and boxed
    report_present float32 (B,)          1.0 where the note was given (not empty, not dropped)
    findings_present float32 (B,)        1.0 where the row has findings text (the decoder's target)

`collate` is called inside Ray Data's `map_batches` (so it must stay a plain function of numpy and
pyarrow data) and by the plain DataLoader baseline of `medfusion bench ingest`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfusion.config import AugmentConfig
from medfusion.data.augment import augment
from medfusion.data.images import pixels
from medfusion.data.tokenizer import PAD_ID, Tokenizer

BATCH_KEYS = (
    "image",
    "report_ids",
    "findings_ids",
    "labels",
    "box",
    "has_box",
    "class_boxes",
    "class_has_box",
    "report_present",
    "findings_present",
)


def row_nbytes(image_size: int, max_report_tokens: int, max_findings_tokens: int, num_classes: int) -> int:
    """About the bytes of one row of a model batch (the arrays of BATCH_KEYS), the pixels most of it."""
    pixels = image_size * image_size  # uint8
    tokens = 8 * (max_report_tokens + max_findings_tokens + 2)  # int64, findings with <bos> <eos>
    floats = 4 * (num_classes + 4 + 1 + 4 * num_classes + num_classes + 2)  # float32 labels, boxes, flags
    return pixels + tokens + floats


def collate(
    rows: Mapping[str, Sequence[Any]],
    *,
    tokenizer: Tokenizer,
    num_classes: int,
    image_size: int,
    max_report_tokens: int,
    max_findings_tokens: int,
    report_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
    report_keep: str = "head",
    augment_settings: AugmentConfig | None = None,
) -> dict[str, np.ndarray]:
    """Turn a column batch of shard rows (``image``, ``report``, ``findings``, ``labels``, ``box``, and
    from schema 2 ``box_labels``/``boxes``) into a model batch; extra columns (``sample_id``...) are
    passed through unchanged. `augment_settings` (training only) moves each image and all its boxes
    together (medfusion.data.augment)."""
    images = list(rows["image"])
    n = len(images)
    image = np.empty((n, 1, image_size, image_size), dtype=np.uint8)
    for i, data in enumerate(images):
        image[i, 0] = pixels(bytes(data), image_size)

    reports = [str(r or "") for r in rows["report"]]
    if report_dropout > 0.0:
        rng = rng or np.random.default_rng()
        reports = ["" if drop else r for r, drop in zip(reports, rng.random(n) < report_dropout)]
    report_ids = tokenizer.encode_batch(reports, max_report_tokens, keep=report_keep)
    findings = [str(f or "") for f in rows["findings"]]
    findings_ids = tokenizer.encode_batch(findings, max_findings_tokens, bos_eos=True)

    labels = np.zeros((n, num_classes), dtype=np.float32)
    for i, indices in enumerate(rows["labels"]):
        labels[i, np.asarray(list(indices), dtype=np.int64)] = 1.0

    box = np.zeros((n, 4), dtype=np.float32)
    has_box = np.zeros((n,), dtype=np.float32)
    for i, b in enumerate(rows["box"]):
        values = valid_box(b)
        if values is not None:
            box[i], has_box[i] = values, 1.0
    class_boxes, class_has_box = finding_box_arrays(rows, labels, box, has_box)
    if augment_settings is not None and augment_settings.enabled:
        _augment_rows(image, box, has_box, class_boxes, class_has_box, rng or np.random.default_rng(), augment_settings)

    batch = {
        "image": image,
        "report_ids": report_ids,
        "findings_ids": findings_ids,
        "labels": labels,
        "box": box,
        "has_box": has_box,
        "class_boxes": class_boxes,
        "class_has_box": class_has_box,
        "report_present": (report_ids != PAD_ID).any(axis=1).astype(np.float32),
        "findings_present": np.asarray([bool(f.strip()) for f in findings], dtype=np.float32),
    }
    for key in ("sample_id", "patient_id", "height", "width", "report", "findings"):
        if key in rows:
            batch[key] = np.asarray(list(rows[key]))
    return batch


def valid_box(values: Any) -> np.ndarray | None:
    """A shard box (4 normalized xyxy floats) as float32; None for null, a wrong length or a NaN."""
    box = None if values is None else np.asarray(list(values), dtype=np.float32)
    return box if box is not None and box.shape == (4,) and not np.isnan(box).any() else None


def finding_box_arrays(
    rows: Mapping[str, Sequence[Any]], labels: np.ndarray, box: np.ndarray, has_box: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(B, C, 4) boxes per finding and their (B, C) mask: from `box_labels`/`boxes` (schema 2), or
    for schema 1 rows the one box given to each of the row's labels."""
    n, num_classes = labels.shape
    class_boxes = np.zeros((n, num_classes, 4), dtype=np.float32)
    class_has_box = np.zeros((n, num_classes), dtype=np.float32)
    if "boxes" in rows and "box_labels" in rows:
        for i, (indices, boxes) in enumerate(zip(rows["box_labels"], rows["boxes"])):
            for index, b in zip(list(indices if indices is not None else []), list(boxes if boxes is not None else [])):
                values = valid_box(b)
                # The first box of a finding counts (NIH boxes one nodule twice on a few images).
                if 0 <= int(index) < num_classes and values is not None and not class_has_box[i, int(index)]:
                    class_boxes[i, int(index)] = values
                    class_has_box[i, int(index)] = 1.0
        return class_boxes, class_has_box
    class_has_box[:] = labels * has_box[:, None]
    class_boxes[:] = box[:, None, :] * class_has_box[..., None]
    return class_boxes, class_has_box


def _augment_rows(
    image: np.ndarray,
    box: np.ndarray,
    has_box: np.ndarray,
    class_boxes: np.ndarray,
    class_has_box: np.ndarray,
    rng: np.random.Generator,
    settings: AugmentConfig,
) -> None:
    """Augment each image in place with all of its boxes in one draw (the image's box and its findings')."""
    for i in range(len(image)):
        found = np.flatnonzero(class_has_box[i] > 0.5)
        boxes = np.concatenate([box[i : i + 1][has_box[i : i + 1] > 0.5], class_boxes[i, found]])
        image[i], moved = augment(image[i], boxes, rng, settings)
        if has_box[i] > 0.5:
            box[i], moved = moved[0], moved[1:]
        class_boxes[i, found] = moved
