"""Shard rows -> model batches. The one preprocessing function of training, evaluation and baselines.

A model batch is a dict of numpy arrays (torch tensors once on the worker):

    image          float32 (B, 1, S, S)  normalized pixels (medfusion.data.images.normalize)
    report_ids     int64   (B, Tr)       note tokens, <pad>=0; an all-pad row means "no note"
    findings_ids   int64   (B, Tf)       <bos> findings <eos> <pad>...
    labels         float32 (B, C)        multi-hot (exactly one 1 per row for single-label data)
    box            float32 (B, 4)        normalized xyxy, zeros where there is no lesion
    has_box        float32 (B,)          1.0 where `box` is a real lesion box
    report_present float32 (B,)          1.0 where the note was given (not empty, not dropped)

`collate` is called inside Ray Data's `map_batches` (so it must stay a plain function of numpy and
pyarrow data) and by the plain DataLoader baseline of `medfusion bench ingest`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medfusion.data.images import preprocess
from medfusion.data.tokenizer import PAD_ID, Tokenizer

BATCH_KEYS = ("image", "report_ids", "findings_ids", "labels", "box", "has_box", "report_present")


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
) -> dict[str, np.ndarray]:
    """Turn a column batch of shard rows (``image``, ``report``, ``findings``, ``labels``, ``box``)
    into a model batch; extra columns (``sample_id``...) are passed through unchanged."""
    images = list(rows["image"])
    n = len(images)
    image = np.empty((n, 1, image_size, image_size), dtype=np.float32)
    for i, data in enumerate(images):
        image[i] = preprocess(bytes(data), image_size)

    reports = [str(r or "") for r in rows["report"]]
    if report_dropout > 0.0:
        rng = rng or np.random.default_rng()
        reports = ["" if drop else r for r, drop in zip(reports, rng.random(n) < report_dropout)]
    report_ids = tokenizer.encode_batch(reports, max_report_tokens)
    findings_ids = tokenizer.encode_batch((str(f or "") for f in rows["findings"]), max_findings_tokens, bos_eos=True)

    labels = np.zeros((n, num_classes), dtype=np.float32)
    for i, indices in enumerate(rows["labels"]):
        labels[i, np.asarray(list(indices), dtype=np.int64)] = 1.0

    box = np.zeros((n, 4), dtype=np.float32)
    has_box = np.zeros((n,), dtype=np.float32)
    for i, b in enumerate(rows["box"]):
        if b is not None and len(b) == 4 and not np.any(np.isnan(np.asarray(b, dtype=np.float32))):
            box[i] = np.asarray(b, dtype=np.float32)
            has_box[i] = 1.0

    batch = {
        "image": image,
        "report_ids": report_ids,
        "findings_ids": findings_ids,
        "labels": labels,
        "box": box,
        "has_box": has_box,
        "report_present": (report_ids != PAD_ID).any(axis=1).astype(np.float32),
    }
    for key in ("sample_id", "patient_id", "height", "width", "report", "findings"):
        if key in rows:
            batch[key] = np.asarray(list(rows[key]))
    return batch
