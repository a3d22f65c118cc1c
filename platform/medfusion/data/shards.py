"""Writing a dataset: Parquet shards per split, the tokenizer, rejected rows, and manifest.json last.

Layout under the dataset root (a local path or ``s3://bucket/prefix``)::

    train/part-00000.parquet ...   val/...   test/...
    tokenizer.json                 built from the training split only
    rejected.jsonl                 rows a source skipped, with row number and reason
    manifest.json                  written last: a reader that finds it finds a complete dataset

The dataset version is the sha256 of manifest.json (see medfusion.data.dataset.dataset_version).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from medfusion import storage
from medfusion.data.schema import SCHEMA_VERSION, SHARD_SCHEMA, SPLITS, Sample
from medfusion.data.tokenizer import Tokenizer, split_words

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
REJECTED = "rejected.jsonl"
# A row group per ~1k rows keeps column projection and streaming reads granular.
ROW_GROUP_ROWS = 1024


class DatasetExistsError(FileExistsError):
    """The output URI already holds a dataset and overwrite was not asked for."""


def text_lengths(lengths: list[int]) -> dict:
    """How long the non-empty texts are in words: count, quantiles, and the histogram {words: texts}
    from which `data inspect` counts the texts a token limit cuts."""
    given = sorted(n for n in lengths if n > 0)
    if not given:
        return {"count": 0, "p50": 0, "p90": 0, "max": 0, "histogram": {}}
    return {
        "count": len(given),
        "p50": given[len(given) // 2],
        "p90": given[min(len(given) - 1, int(0.9 * len(given)))],
        "max": given[-1],
        "histogram": {str(n): c for n, c in sorted(Counter(given).items())},
    }


def assign_split(patient_id: str, val: float, test: float, salt: str) -> str:
    """Deterministic split of a patient by hash: the same patient always lands in the same split."""
    digest = hashlib.sha256(f"{salt}:{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test:
        return "test"
    if u < test + val:
        return "val"
    return "train"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_output(uri: str, overwrite: bool) -> None:
    """Refuse to write over an existing dataset (or the leftovers of an interrupted write)."""
    existing = storage.list_files(uri)
    if not existing:
        return
    if overwrite:
        # The manifest goes first, so a concurrent reader sees "no dataset", never a mix.
        if storage.exists(storage.join(uri, MANIFEST)):
            storage.delete_prefix(storage.join(uri, MANIFEST))
        storage.delete_prefix(uri)
        return
    if storage.exists(storage.join(uri, MANIFEST)):
        raise DatasetExistsError(f"{uri}: a dataset already exists here; pass --overwrite to replace it")
    raise DatasetExistsError(
        f"{uri}: holds {len(existing)} files but no {MANIFEST} (an interrupted write?); "
        "pass --overwrite to replace them"
    )


@dataclass
class _SplitWriter:
    root: str
    split: str
    target_bytes: int
    rows: list[dict] = field(default_factory=list)
    pending_bytes: int = 0
    shards: list[dict] = field(default_factory=list)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        self.pending_bytes += len(row["image"]) + len(row["report"]) + len(row["findings"]) + 64
        if self.pending_bytes >= self.target_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        name = f"{self.split}/part-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self.rows, schema=SHARD_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=ROW_GROUP_ROWS, compression="zstd")
        data = buf.getvalue()
        # Whole-object PUT with retries: a restarted S3 server never leaves half a shard behind.
        storage.write_bytes(storage.join(self.root, name), data)
        self.shards.append({"path": name, "rows": len(self.rows), "bytes": len(data), "sha256": _sha256(data)})
        self.rows, self.pending_bytes = [], 0


def write_dataset(
    samples: Iterable[Sample],
    *,
    output_uri: str,
    classes: list[str],
    multi_label: bool,
    source: dict,
    shard_size_mb: float = 128.0,
    split_val: float = 0.1,
    split_test: float = 0.1,
    split_salt: str = "medfusion",
    vocab_size: int = 4000,
    min_token_freq: int = 1,
    rejected: list[dict] | None = None,
    extra: dict | None = None,
    progress=None,
) -> dict:
    """Shard `samples` into `output_uri` and write manifest.json last. Returns the manifest.

    `rejected` is read after `samples` is exhausted, so a lazy source may fill it while iterating.
    The caller has already checked the output (check_output).
    """
    storage.ensure_bucket(output_uri)
    target = int(shard_size_mb * 2**20)
    writers = {s: _SplitWriter(output_uri, s, target) for s in SPLITS}
    class_counts: dict[str, Counter] = defaultdict(Counter)
    boxes: Counter = Counter()
    finding_boxes: Counter = Counter()
    reports: Counter = Counter()
    findings: Counter = Counter()
    report_words: list[int] = []
    findings_words: list[int] = []
    train_texts: list[str] = []
    seen_ids: set[str] = set()
    for sample in samples:
        if sample.sample_id in seen_ids:
            raise ValueError(f"sample_id {sample.sample_id!r} appears twice in the source")
        seen_ids.add(sample.sample_id)
        split = sample.split or assign_split(sample.patient_id, split_val, split_test, split_salt)
        writers[split].add(sample.row())
        for index in sample.labels:
            class_counts[split][classes[index]] += 1
        boxes[split] += sample.box is not None
        finding_boxes[split] += len(sample.finding_boxes())
        report_words.append(len(split_words(sample.report)))
        findings_words.append(len(split_words(sample.findings)))
        reports[split] += report_words[-1] > 0
        findings[split] += findings_words[-1] > 0
        if split == "train":
            train_texts.append(sample.report)
            train_texts.append(sample.findings)
        if progress is not None:
            progress.update(1)
    for writer in writers.values():
        writer.flush()

    tokenizer = Tokenizer.build(train_texts, vocab_size=vocab_size, min_freq=min_token_freq)
    tokenizer_bytes = tokenizer.to_json().encode()
    storage.write_bytes(storage.join(output_uri, TOKENIZER), tokenizer_bytes)
    rejected = list(rejected or [])
    rejected_bytes = "".join(json.dumps(r) + "\n" for r in rejected).encode()
    storage.write_bytes(storage.join(output_uri, REJECTED), rejected_bytes)

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "classes": classes,
        "multi_label": multi_label,
        "tokenizer": {
            "path": TOKENIZER,
            "type": "word",
            "vocab_size": len(tokenizer),
            "sha256": _sha256(tokenizer_bytes),
        },
        "splits": {
            s: {
                "rows": sum(sh["rows"] for sh in w.shards),
                "with_box": boxes[s],
                "boxes": finding_boxes[s],
                "with_report": reports[s],
                "with_findings": findings[s],
                "class_counts": dict(sorted(class_counts[s].items())),
                "shards": w.shards,
            }
            for s, w in writers.items()
        },
        "rejected": {"path": REJECTED, "rows": len(rejected), "sha256": _sha256(rejected_bytes)},
        "split": {"val": split_val, "test": split_test, "salt": split_salt},
        "text_words": {"report": text_lengths(report_words), "findings": text_lengths(findings_words)},
        # Callables are evaluated now, after the source is exhausted (lazy sources count as they go).
        **{k: (v() if callable(v) else v) for k, v in (extra or {}).items()},
    }
    storage.write_text(storage.join(output_uri, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))
    return manifest
