"""Session fixtures: a real SeaweedFS S3 server and a real local Ray, both on loopback.

Both are started once per session on free ports and stopped afterwards; only the processes the
fixtures started are stopped.
"""

from __future__ import annotations

import os
import uuid

import pytest

from medfusion.store import Store

# Ray workers inherit the driver's environment; DeepSpeed on CPU must never probe for CUDA.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def s3_store(tmp_path_factory):
    """A SeaweedFS S3 server on 127.0.0.1 with generated credentials; the AWS env points at it."""
    store = Store(tmp_path_factory.mktemp("seaweedfs"))
    state = store.up(detach=False)
    saved = {k: os.environ.get(k) for k in state.env()}
    os.environ.update(state.env())
    yield store
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    store.down(timeout_s=5)


@pytest.fixture
def s3_prefix(s3_store):
    """A fresh s3:// prefix in the store's bucket for one test."""
    return f"s3://{s3_store.state().bucket}/test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_local(s3_store):
    """An embedded Ray with 2 CPUs, started after the S3 env is set so workers inherit it."""
    import ray

    if not ray.is_initialized():
        # address="local": never attach to a cluster some other process started with `ray start`.
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_dataset():
    """`synthetic_dataset(uri, samples, image_size)` writes a synthetic dataset at `uri` (replacing one
    there) and returns `uri`."""
    from medfusion.config import PrepareConfig, SynthConfig
    from medfusion.data.prepare import run_prepare

    def make(uri: str, samples: int, image_size: int) -> str:
        synth = SynthConfig(num_samples=samples, image_size=image_size)
        run_prepare(PrepareConfig(source="synthetic", output_uri=uri, overwrite=True, synth=synth))
        return uri

    return make
