"""The prepare stage: a source (synthetic, generic manifest, IU X-Ray) -> a sharded dataset."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from medfusion import storage
from medfusion.config import PrepareConfig
from medfusion.data.dataset import dataset_version
from medfusion.data.schema import Sample
from medfusion.data.shards import MANIFEST, REJECTED, check_output, write_dataset
from medfusion.loader import to_dict


class TooManyRejectedError(ValueError):
    """More rows were rejected than `max_rejected_fraction` allows."""


@dataclass
class PrepareResult:
    """URIs and counts of the dataset that `run_prepare` wrote."""

    dataset_uri: str
    manifest_uri: str
    version: str
    rows: dict[str, int]
    classes: list[str]
    rejected: int

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in self.rows.items())
        return (
            f"dataset {self.dataset_uri} (version {self.version}): {counts}; "
            f"{len(self.classes)} classes; {self.rejected} rows rejected"
        )


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, mininterval=1.0)


def run_prepare(cfg: PrepareConfig, show_progress: bool = False) -> PrepareResult:
    """Read the configured source and write Parquet shards + manifest.json to `cfg.output_uri`.

    Raises:
        DatasetExistsError: the output holds a dataset and `cfg.overwrite` is false.
        TooManyRejectedError: more than `cfg.max_rejected_fraction` of the rows were bad
            (rejected.jsonl is written next to where the dataset would be, with every reason).
    """
    if not cfg.output_uri:
        raise ValueError("output_uri: required (a local path or s3://bucket/prefix)")
    storage.ensure_bucket(cfg.output_uri)
    check_output(cfg.output_uri, cfg.overwrite)

    if cfg.source == "synthetic":
        from medfusion.data import synth

        classes = synth.class_names(cfg.synth)
        multi_label = False
        samples: Iterator[Sample] = synth.generate(cfg.synth)
        rejected_rows: list[dict] = []
        total: int | None = cfg.synth.num_samples
        source = {"type": "synthetic", "params": to_dict(cfg.synth)}
        extra: dict = {}
    else:
        from medfusion.data.ingest import open_source

        src = open_source(cfg)
        classes, multi_label, total = src.classes, src.multi_label, src.total_rows
        source = {"type": cfg.source, "uri": cfg.source_uri, "image_size": cfg.image_size}
        rejected_rows = []

        def checked() -> Iterator[Sample]:
            yield from src
            rejected_rows.extend(r.to_json() for r in src.rejected)
            fraction = len(rejected_rows) / max(src.total_rows, 1)
            if fraction > cfg.max_rejected_fraction:
                # Keep the reasons where the user looks, but no manifest: this is not a dataset.
                storage.write_text(
                    storage.join(cfg.output_uri, REJECTED), "".join(json.dumps(r) + "\n" for r in rejected_rows)
                )
                reasons = "; ".join(f"row {r['row']}: {r['reason']}" for r in rejected_rows[:5])
                raise TooManyRejectedError(
                    f"{cfg.source_uri}: {len(rejected_rows)} of {src.total_rows} rows rejected "
                    f"({fraction:.1%} > max_rejected_fraction {cfg.max_rejected_fraction:.1%}); "
                    f"first: {reasons}; all in {storage.join(cfg.output_uri, REJECTED)}"
                )

        samples = checked()
        extra = {"truncated_texts": lambda: src.truncated_texts}

    with _progress(total, f"prepare {cfg.source}", show_progress) as bar:
        manifest = write_dataset(
            samples,
            output_uri=cfg.output_uri,
            classes=classes,
            multi_label=multi_label,
            source=source,
            shard_size_mb=cfg.shard_size_mb,
            split_val=cfg.split.val,
            split_test=cfg.split.test,
            split_salt=cfg.split.salt,
            vocab_size=cfg.vocab_size,
            min_token_freq=cfg.min_token_freq,
            rejected=rejected_rows,
            extra=extra,
            progress=bar,
        )
    manifest_uri = storage.join(cfg.output_uri, MANIFEST)
    return PrepareResult(
        dataset_uri=cfg.output_uri,
        manifest_uri=manifest_uri,
        version=dataset_version(storage.read_bytes(manifest_uri)),
        rows={s: v["rows"] for s, v in manifest["splits"].items()},
        classes=classes,
        rejected=manifest["rejected"]["rows"],
    )
