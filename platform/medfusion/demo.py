"""`make demo` / `medfusion demo`: the main job on an embedded local default.

Today: start the local S3 store, generate a synthetic dataset into it, and stream one epoch of
model batches through Ray Data, printing a summary. Later stages (train, tune, evaluate, serve,
the Kubeflow pipeline) extend this same function.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from medfusion.config import DataConfig, PrepareConfig, SynthConfig, preset_values
from medfusion.store import DEFAULT_ROOT, Store


@dataclass
class DemoConfig:
    """What the demo runs on."""

    preset: str = "tiny"
    """Size preset of the data and model."""
    samples: int = 1000
    """Synthetic images to generate."""
    dataset_uri: str = "s3://medfusion/datasets/demo"
    """Where the dataset goes (the local store's bucket)."""
    store_root: str = DEFAULT_ROOT
    """Folder of the local store."""


def run_demo(cfg: DemoConfig) -> dict:
    import numpy as np
    import ray

    from medfusion.data.dataset import open_dataset, quiet_ray_data, stream_split, summarize
    from medfusion.data.prepare import run_prepare

    store = Store(cfg.store_root)
    state = store.up()
    os.environ.update(state.env())
    print(f"[1/3] local S3 store at {state.endpoint} (bucket s3://{state.bucket}; `medfusion store down` stops it)")

    synth = SynthConfig(**{**preset_values(cfg.preset, "synth"), "num_samples": cfg.samples})
    prepared = run_prepare(
        PrepareConfig(source="synthetic", output_uri=cfg.dataset_uri, overwrite=True, synth=synth), show_progress=True
    )
    print(f"[2/3] {prepared.summary()}")

    info = open_dataset(cfg.dataset_uri, verify=True)
    data_cfg = DataConfig(**preset_values(cfg.preset, "data"))
    ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False, ignore_reinit_error=True)
    quiet_ray_data()
    try:
        start = time.perf_counter()
        samples, batches, with_box, report_tokens = 0, 0, 0, 0
        label_counts = np.zeros(len(info.classes), dtype=np.int64)
        for batch in stream_split(info, "train", data_cfg).iter_batches(batch_size=data_cfg.batch_size):
            batches += 1
            samples += len(batch["image"])
            with_box += int(batch["has_box"].sum())
            report_tokens += int((batch["report_ids"] != 0).sum())
            label_counts += batch["labels"].sum(axis=0).astype(np.int64)
            shape = batch["image"].shape
        elapsed = time.perf_counter() - start
    finally:
        ray.shutdown()
    print(
        f"[3/3] streamed one epoch of split 'train' through Ray Data: {samples} samples in {batches} batches, "
        f"{samples / elapsed:.0f} samples/s; image batch {tuple(shape)}; {with_box} with a lesion box; "
        f"{report_tokens / max(samples, 1):.1f} note tokens per sample"
    )
    print("      per class: " + ", ".join(f"{c} {n}" for c, n in zip(info.classes, label_counts)))
    return {"dataset": summarize(info), "streamed_samples": samples, "samples_per_s": samples / elapsed}
