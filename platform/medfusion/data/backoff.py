"""A pause for Ray Data's scheduling loop while it makes no progress and has nothing to wait on.

Ray 2.60's streaming executor (ray/data/_internal/execution/streaming_executor.py, `run`) steps its
scheduling loop back to back, and a step blocks only in `process_completed_tasks`
(streaming_executor_state.py), on `ray.wait(active tasks, num_returns=all, timeout=0.1)`. When the
consumers are behind, the backpressure policies let the executor read nothing from its tasks, but
those tasks' streaming generators hold outputs that are ready, so `ray.wait` returns at once; and
with no task running it is skipped. Either way the loop spins on its bookkeeping (resource usage,
backpressure, metrics) until the consumers catch up, which in training is most of an epoch: the
decode tasks are far ahead of the model. In a 2-worker training run's SplitCoordinator the spin took
45-60% of a core on the 2-core machine that the workers needed (py-spy: 87% of the coordinator's
samples in `_scheduling_loop_step`).

`IdleBackoff` is an execution callback (`DataContext.custom_execution_callback_classes`): after a
step that changed nothing that Ray's own no-progress guard (no_progress_guard.py) watches, nor the
running or submitted tasks, and that returned at once (it did not wait in `ray.wait`), it sleeps
IDLE_SLEEP_S. A step that read an output, launched a task or moved a block does not sleep.
"""

from __future__ import annotations

import time
from typing import Any

from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_SLEEP_S = 0.02
"""Seconds the scheduling loop rests after a step that made no progress and did not wait."""

QUICK_STEP_S = 0.01
"""A step shorter than this did not wait in `ray.wait` (which waits up to 0.1 s)."""


class IdleBackoff(ExecutionCallback):
    """Sleep IDLE_SLEEP_S after a quick scheduling step that changed nothing (one per execution)."""

    def __init__(self) -> None:
        self._last: tuple = ()
        self._step_start = time.monotonic()

    def on_execution_step(self, executor: Any) -> None:
        progress = _progress(executor)
        idle = progress == self._last and time.monotonic() - self._step_start < QUICK_STEP_S
        self._last = progress
        if idle:
            time.sleep(IDLE_SLEEP_S)
        self._step_start = time.monotonic()


def _progress(executor: Any) -> tuple:
    """What a step can change, per operator: outputs taken, tasks submitted and running, blocks
    queued in and out (Ray's no-progress guard watches the first and the last two)."""
    topology = getattr(executor, "_topology", None) or {}
    return tuple(
        (
            op.metrics.num_outputs_taken,
            op.metrics.num_tasks_submitted,
            op.num_active_tasks(),
            state.total_enqueued_input_blocks(),
            state.total_enqueued_output_blocks(),
        )
        for op, state in topology.items()
    )
