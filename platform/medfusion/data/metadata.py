"""Blocks handed to the consumer as soon as their task yields them: Ray Data's inline metadata fetch.

Ray 2.60's streaming executor turns each block a task yields into a `RefBundle` through a metadata
fetcher (ray/data/_internal/execution/metadata_fetcher.py). Its default, `ThreadedMetadataFetcher`,
keeps the scheduling loop from blocking on `ray.get(metadata)`: each block is deferred to a
background thread (whose `ray.wait` waits up to 0.1 s) and emitted at the end of a later scheduling
step (whose `ray.wait` waits up to 0.1 s for every running task). On a large cluster that keeps
cross-node metadata reads off the loop. Here a block of 256 model rows is about a tenth of a second
of decode, so one or two of those waits per block hold the consumer back. Measured with `bench
ingest` on 2 cores, the two fetchers taking turns on the same quiet machine: synthetic 2000-sample
passes ran at 0.77-0.93x the DataLoader threaded (median 0.89, 9 runs) and 0.87-1.00x inline (median
0.97, 8 runs), 1.10x the threaded throughput pass by pass in one Ray session; a warm pass's first
batch came 0.1 s sooner (synthetic 0.25-0.35 s against 0.34-0.45 s, NIH 256 px 0.46-0.49 against
0.55-0.57). Larger NIH films gain nothing in throughput and lose none (pass by pass 0.97x and 1.02x
at 256 px; medians 0.95 of the DataLoader either way).

`InlineMetadata` is an execution callback (`DataContext.custom_execution_callback_classes`) that gives
an execution of our own pipelines (`stream_split`) the `InlineMetadataFetcher` before its thread
starts: the path Ray's `RAY_DATA_METADATA_PREFETCH_ON_THREAD=0` selects for a whole process, here
only for those datasets and wherever their executor runs (the driver, or Ray Train's
SplitCoordinator actor). An explicit `RAY_DATA_METADATA_PREFETCH_ON_THREAD` in the environment wins:
with it set, Ray's own choice stands.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.data._internal.execution.metadata_fetcher import InlineMetadataFetcher
from ray.util.debug import log_once

logger = logging.getLogger(__name__)

PREFETCH_ENV = "RAY_DATA_METADATA_PREFETCH_ON_THREAD"
"""Ray's switch between the two fetchers for a whole process; set, it overrides InlineMetadata."""


class InlineMetadata(ExecutionCallback):
    """Emit each block as its task yields it (InlineMetadataFetcher), unless PREFETCH_ENV is set."""

    def before_execution_starts(self, executor: Any) -> None:
        if PREFETCH_ENV in os.environ:
            return
        if not hasattr(executor, "_metadata_fetcher"):  # another Ray: its own fetcher stands
            if log_once("medfusion_inline_metadata"):
                logger.warning("Ray Data's executor has no _metadata_fetcher: blocks keep Ray's default hand-over")
            return
        # Built in the executor's __init__ and started by its thread, which starts after this callback.
        executor._metadata_fetcher = InlineMetadataFetcher()
