"""Reading a dataset: the manifest, checksums, and streaming batches with Ray Data.

`open_dataset` is the one place that knows the layout; everything downstream (training workers,
evaluation, benchmarks) gets shard URIs, class names and the tokenizer from the `DatasetInfo` it
returns. `stream_split` builds the Ray Data pipeline: `read_parquet` with column projection, then
decode, resize, normalize and tokenize in `map_batches`, fused into one task per shard and streamed
with bounded memory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from medfusion import storage
from medfusion.config import AugmentConfig, DataConfig
from medfusion.data.batches import BATCH_KEYS, collate, row_nbytes
from medfusion.data.schema import SCHEMA_VERSION, SPLITS, SUPPORTED_SCHEMA_VERSIONS
from medfusion.data.shards import MANIFEST
from medfusion.data.tokenizer import Tokenizer
from medfusion.loader import to_dict

if TYPE_CHECKING:
    import ray.data

# What the model needs from a shard; `sample_id` etc. are added for evaluation only.
MODEL_COLUMNS = ["image", "report", "findings", "labels", "box"]
FINDING_BOX_COLUMNS = ["box_labels", "boxes"]
"""Schema 2's boxes per finding; schema 1 datasets have only `box`."""


class DatasetError(ValueError):
    """A dataset is missing, incomplete or corrupted; the message names the file."""


def dataset_version(manifest_bytes: bytes) -> str:
    """The dataset version used for lineage: the first 16 hex digits of the manifest's sha256."""
    return hashlib.sha256(manifest_bytes).hexdigest()[:16]


@dataclass
class DatasetInfo:
    """What a dataset root holds, from its manifest.json."""

    uri: str
    version: str
    manifest: dict[str, Any]
    tokenizer: Tokenizer

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def multi_label(self) -> bool:
        return bool(self.manifest.get("multi_label", False))

    @property
    def model_columns(self) -> list[str]:
        """The shard columns `collate` reads from this dataset."""
        return MODEL_COLUMNS + (FINDING_BOX_COLUMNS if self.manifest.get("schema_version", 1) >= 2 else [])

    def rows(self, split: str) -> int:
        return int(self.manifest["splits"][split]["rows"])

    def shard_uris(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return [storage.join(self.uri, s["path"]) for s in self.manifest["splits"][split]["shards"]]


def open_dataset(uri: str, verify: bool = False) -> DatasetInfo:
    """Read manifest.json and the tokenizer of the dataset at `uri` (optionally verify checksums).

    Raises:
        DatasetError: no dataset at `uri`, an unsupported schema version, or (verify) a shard
            whose sha256 or row count does not match the manifest.
    """
    manifest_uri = storage.join(uri, MANIFEST)
    try:
        raw = storage.read_bytes(manifest_uri)
    except FileNotFoundError:
        raise DatasetError(
            f"{uri}: no dataset here ({MANIFEST} not found; run `medfusion data synth` or `data ingest`)"
        ) from None
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise DatasetError(f"{manifest_uri}: not valid JSON ({err})") from None
    if manifest.get("schema_version") not in SUPPORTED_SCHEMA_VERSIONS:
        raise DatasetError(
            f"{manifest_uri}: schema_version {manifest.get('schema_version')!r} is not supported "
            f"(expected one of {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}; this release writes {SCHEMA_VERSION})"
        )
    tok_meta = manifest["tokenizer"]
    tok_uri = storage.join(uri, tok_meta["path"])
    tok_bytes = storage.read_bytes(tok_uri)
    if hashlib.sha256(tok_bytes).hexdigest() != tok_meta["sha256"]:
        raise DatasetError(f"{tok_uri}: sha256 mismatch with {MANIFEST}")
    info = DatasetInfo(
        uri=uri, version=dataset_version(raw), manifest=manifest, tokenizer=Tokenizer.from_json(tok_bytes.decode())
    )
    if verify:
        verify_dataset(info)
    return info


def verify_dataset(info: DatasetInfo, progress=None) -> int:
    """Check every shard's sha256 and row count against the manifest. Returns the shards checked."""
    checked = 0
    for split in SPLITS:
        for shard in info.manifest["splits"][split]["shards"]:
            shard_uri = storage.join(info.uri, shard["path"])
            try:
                data = storage.read_bytes(shard_uri)
            except FileNotFoundError:
                raise DatasetError(f"shard {shard_uri}: missing") from None
            got = hashlib.sha256(data).hexdigest()
            if got != shard["sha256"]:
                raise DatasetError(
                    f"shard {shard_uri}: sha256 mismatch (expected {shard['sha256'][:12]}…, got {got[:12]}…)"
                )
            checked += 1
            if progress is not None:
                progress.update(1)
    return checked


def read_shard(uri: str, columns: list[str] | None = None, schema_only: bool = False):
    """One shard's `columns` as a pyarrow Table (or only its schema), read with retries; a missing or
    unreadable shard is a DatasetError naming it."""
    fs, path = storage.filesystem(uri)
    read = (
        (lambda: pq.read_schema(path, filesystem=fs))
        if schema_only
        else (lambda: pq.read_table(path, columns=columns, filesystem=fs))
    )
    try:
        return storage.with_retries(f"read {uri}", read)
    except FileNotFoundError:
        raise DatasetError(f"shard {uri}: missing") from None
    except Exception as err:
        if isinstance(err, (storage.StorageError, DatasetError)):
            raise
        raise DatasetError(f"shard {uri}: unreadable Parquet ({err})") from None


def collate_kwargs(info: DatasetInfo, data_cfg: DataConfig) -> dict[str, Any]:
    """The arguments of `collate` that a dataset and a DataConfig fix."""
    return {
        "tokenizer": info.tokenizer,
        "num_classes": len(info.classes),
        "image_size": data_cfg.image_size,
        "max_report_tokens": data_cfg.max_report_tokens,
        "max_findings_tokens": data_cfg.max_findings_tokens,
        "report_keep": data_cfg.report_keep,
    }


def iter_local_batches(
    info: DatasetInfo,
    split: str,
    data_cfg: DataConfig,
    extra_columns: tuple[str, ...] = (),
    limit: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Model batches of one split read in this process with pyarrow (no Ray): tests, small evals."""
    columns = info.model_columns + [c for c in extra_columns if c not in info.model_columns]
    kwargs = collate_kwargs(info, data_cfg)
    served = 0
    for uri in info.shard_uris(split):
        table = read_shard(uri, columns)
        for batch in table.to_batches(max_chunksize=data_cfg.batch_size):
            if limit is not None and served >= limit:
                return
            rows = batch.to_pydict()
            if limit is not None:
                rows = {k: v[: limit - served] for k, v in rows.items()}
            served += len(rows["image"])
            yield collate(rows, **kwargs)


@functools.lru_cache(maxsize=4)
def _tokenizer(tokenizer_json: str) -> Tokenizer:
    return Tokenizer.from_json(tokenizer_json)


def preprocess_rows(
    rows: dict[str, np.ndarray],
    *,
    tokenizer_json: str,
    num_classes: int,
    data: dict,
    report_dropout: float,
    seed: int | None,
    passthrough: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """The `map_batches` function: shard rows -> model batch (decode, resize, normalize, tokenize).

    A plain function run as Ray tasks: on small CPU work per batch, tasks start streaming at once
    where an actor pool first waits for its actors to start.
    """
    rng = None
    augment_settings = AugmentConfig(**data["augment"]) if data.get("augment") else None
    if report_dropout > 0.0 or augment_settings is not None:
        # A different stream per batch, reproducible from the seed and the batch's first sample.
        first = str(rows["sample_id"][0]) if "sample_id" in rows and len(rows["sample_id"]) else ""
        rng = np.random.default_rng([seed or 0, int(hashlib.sha256(first.encode()).hexdigest()[:8], 16)])
    batch = collate(
        rows,
        tokenizer=_tokenizer(tokenizer_json),
        num_classes=num_classes,
        image_size=data["image_size"],
        max_report_tokens=data["max_report_tokens"],
        max_findings_tokens=data["max_findings_tokens"],
        report_dropout=report_dropout,
        rng=rng,
        report_keep=data.get("report_keep", "head"),
        augment_settings=augment_settings,
    )
    # Only numeric columns reach training workers (iter_torch_batches), unless asked for.
    return {k: v for k, v in batch.items() if k in BATCH_KEYS or k in passthrough}


def _read_parquet(paths: list[str], fs: Any, columns: list[str]) -> ray.data.Dataset:
    """`ray.data.read_parquet` of `columns`, one read task per shard, through Ray Data's file-based
    (V1) Parquet reader.

    Ray 2.60's default DataSourceV2 reader packs a few shards of several MB into one read task, so
    nothing runs in parallel. With one task per shard and no block splitting (`override_num_blocks`
    equal to the shard count), the read fuses with the `map_batches` that follows: each shard is
    read and decoded in one task, with no read task holding a CPU while it waits for its blocks to
    be consumed (README, "Benchmarks", has the figures). The reader is chosen when the read is
    planned, so the flag is restored right after.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    default = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(
            paths, filesystem=fs, columns=columns, shuffle=None, override_num_blocks=len(paths)
        )
    finally:
        ctx.use_datasource_v2 = default


# Blocks a running map task may have produced and not yet handed over (Ray's default is 4): a
# shard's task yields all its model batches without pausing for the driver to catch up.
STREAMING_BLOCKS_PER_TASK = 16


def stream_split(
    info: DatasetInfo,
    split: str,
    data_cfg: DataConfig,
    *,
    training: bool = False,
    extra_columns: tuple[str, ...] = (),
    seed: int | None = None,
    concurrency: int | None = None,
) -> ray.data.Dataset:
    """A Ray Data pipeline over one split: read_parquet (projected columns) -> map_batches(preprocess_rows),
    fused into one task per shard that yields blocks of `data_cfg.batch_size` model rows.

    `training` enables note dropout (data_cfg.report_dropout). `concurrency` caps the shard tasks in
    flight (default: as many as there are CPUs). Call `ray.init` before.
    """
    import ray.data

    uris = info.shard_uris(split)
    if not uris:
        raise DatasetError(f"{info.uri}: split {split!r} has no shards")
    fs, _ = storage.filesystem(uris[0])
    paths = [storage.filesystem(u)[1] for u in uris]
    dropout = data_cfg.report_dropout if training else 0.0
    augmenting = training and data_cfg.augment.enabled
    columns = info.model_columns + [c for c in extra_columns if c not in info.model_columns]
    if (dropout > 0.0 or augmenting) and "sample_id" not in columns:
        columns.append("sample_id")
    ds = _read_parquet(paths, fs, columns).map_batches(
        preprocess_rows,
        fn_kwargs={
            "tokenizer_json": info.tokenizer.to_json(),
            "num_classes": len(info.classes),
            "data": {
                "image_size": data_cfg.image_size,
                "max_report_tokens": data_cfg.max_report_tokens,
                "max_findings_tokens": data_cfg.max_findings_tokens,
                "report_keep": data_cfg.report_keep,
                "augment": to_dict(data_cfg.augment) if augmenting else None,
            },
            "report_dropout": dropout,
            "seed": seed,
            "passthrough": tuple(extra_columns),
        },
        # A whole read block per call: a batch size here would stop the read from fusing with the map.
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
        zero_copy_batch=True,
    )
    rows = block_rows(info, split, data_cfg)
    # Fused into the map task: its output leaves as blocks of whole batches, so `iter_batches` only
    # slices them.
    ds = ds.repartition(target_num_rows_per_block=rows)
    # This dataset's own context (not the process-wide one). The resource reservation splits the
    # CPUs between operators from limits that Ray's autoscaling coordinator reports only about a
    # second into each execution: until then one task runs at a time, most of an epoch of a few
    # thousand samples.
    ds.context.op_resource_reservation_enabled = False
    ds.context._max_num_blocks_in_streaming_gen_buffer = STREAMING_BLOCKS_PER_TASK
    # Blocks of `rows` (Ray's default is 128 MiB: a whole shard), so that a task yields its first
    # model rows after decoding one block, not its whole shard. The one size bounds both the read's
    # blocks (stored rows) and the map's output buffer (model rows): the smaller row sets it, or the
    # buffer would hold several decoded blocks back (512-px PNGs decoded to 256-px pixels are a third
    # of their stored size).
    ds.context.target_max_block_size = max(1, int(_row_bytes(info, split, data_cfg) * rows))
    # The scheduling loop rests while backpressure holds it behind the consumers instead of
    # spinning beside them (medfusion.data.backoff has the profile), and hands each block over as
    # its task yields it (medfusion.data.metadata has the figures).
    from medfusion.data.backoff import IdleBackoff
    from medfusion.data.metadata import InlineMetadata

    callbacks = ds.context.custom_execution_callback_classes
    ds.context.custom_execution_callback_classes = [
        *callbacks,
        *(c for c in (IdleBackoff, InlineMetadata) if c not in callbacks),
    ]
    return ds


# The most a block of model rows may hold (whole batches permitting): Ray's default target is 128 MiB,
# and a decode task keeps up to STREAMING_BLOCKS_PER_TASK of them in the object store.
MAX_BLOCK_BYTES = 64 * 2**20


def _row_bytes(info: DatasetInfo, split: str, data_cfg: DataConfig) -> float:
    """Bytes of one row as stored or as a model row, whichever is smaller (see `stream_split`)."""
    shards = info.manifest["splits"][split]["shards"]
    stored_row_bytes = sum(s.get("bytes", 0) for s in shards) / max(1, sum(s["rows"] for s in shards))
    model_row_bytes = row_nbytes(
        data_cfg.image_size, data_cfg.max_report_tokens, data_cfg.max_findings_tokens, len(info.classes)
    )
    return min(stored_row_bytes, model_row_bytes) if stored_row_bytes else model_row_bytes


def block_rows(info: DatasetInfo, split: str, data_cfg: DataConfig) -> int:
    """Rows per block of `stream_split`: data.block_rows rounded up to whole batches, as many whole
    batches as fit in MAX_BLOCK_BYTES when that is fewer, and never less than one batch.

    Handing a block from a decode task to the consumer (object store put, the streaming generator's
    report, the executor's bookkeeping, the consumer's fetch) costs about the same for 64 rows as for
    256. On 2 cores, one-batch blocks of 64 synthetic rows streamed at 0.75-0.86x a DataLoader with
    as many decode processes that restarts them every pass; 256-row blocks at 0.83-0.98x (median
    0.95) one that keeps them, for a first batch about 0.1 s later (README, "Benchmarks").
    """
    batch = data_cfg.batch_size
    batches = math.ceil(data_cfg.block_rows / batch)
    fit = int(MAX_BLOCK_BYTES // max(1.0, _row_bytes(info, split, data_cfg) * batch))
    return batch * max(1, min(batches, fit))


def quiet_ray_data() -> None:
    """Keep Ray Data's per-operator progress logging out of command output (benchmarks, demo)."""
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def summarize(info: DatasetInfo) -> dict[str, Any]:
    """Counts per split and class (what `medfusion data inspect` prints)."""
    return {
        "uri": info.uri,
        "version": info.version,
        "classes": info.classes,
        "multi_label": info.multi_label,
        "vocab_size": len(info.tokenizer),
        "splits": {
            s: {
                "rows": v["rows"],
                "shards": len(v["shards"]),
                "with_box": v.get("with_box", 0),
                "boxes": v.get("boxes", v.get("with_box", 0)),
                "with_report": v.get("with_report"),
                "with_findings": v.get("with_findings"),
                "class_counts": v.get("class_counts", {}),
            }
            for s, v in info.manifest["splits"].items()
        },
        "rejected": info.manifest.get("rejected", {}).get("rows", 0),
        "truncated_texts": info.manifest.get("truncated_texts", 0),
        "text_words": info.manifest.get("text_words"),
        "source": info.manifest.get("source", {}),
        "created_at": info.manifest.get("created_at"),
    }


def text_length_lines(summary: dict[str, Any], data_cfg: DataConfig | None = None) -> list[str]:
    """What `data inspect` says about the texts: how long they are, and how many the token limits cut."""
    data_cfg = data_cfg or DataConfig()
    words = summary.get("text_words") or {}
    lines = []
    limits = (
        ("report", "notes", data_cfg.max_report_tokens, "data.max_report_tokens"),
        ("findings", "findings", data_cfg.max_findings_tokens - 2, "data.max_findings_tokens"),
    )
    for key, shown, limit, field_name in limits:
        stats = words.get(key)
        if not stats:
            continue
        if not stats["count"]:
            lines.append(f"{shown}: none in this dataset")
            continue
        over = sum(count for n, count in stats["histogram"].items() if int(n) > limit)
        cut = f"; {over} longer than {field_name}={limit if key == 'report' else limit + 2}"
        if key == "report" and over:
            cut += f" (the {data_cfg.report_keep} is kept; data.report_keep chooses head, tail or head_tail)"
        lines.append(
            f"{shown}: {stats['count']} given, words p50 {stats['p50']} p90 {stats['p90']} max {stats['max']}{cut}"
        )
    if summary.get("truncated_texts"):
        lines.append(f"texts cut at prepare.max_report_chars: {summary['truncated_texts']}")
    return lines
