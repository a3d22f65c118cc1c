"""The Ray runtime a training run needs: an embedded Ray when none is given, the worker setup hooks,
and the environment and resources of each training worker."""

from __future__ import annotations

import logging
import math
import os

from medfusion import storage
from medfusion.config import TrainConfig

WORKER_MEMORY_PLACEHOLDER = 64 * 2**20  # bytes
# Ray Train's bound on one wait for the workers' placement group (TrainConfig.worker_wait_s).
WORKER_WAIT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def ensure_ray(cfg: TrainConfig, *, dashboard: bool = False, cpus: float = 0.0) -> bool:
    """Start an embedded Ray unless one is running (or this process runs inside a Ray job, whose
    RAY_ADDRESS names the cluster).

    Args:
        cfg: the run's config; the embedded Ray gets the CPUs of its workers.
        dashboard: start the dashboard too; Ray Tune needs it (see medfusion.tune).
        cpus: CPUs the work needs beyond one run of `cfg` (the embedded Ray gets at least that many).

    Returns:
        Whether this call started Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS", "local") != "local":
        ray.init(log_to_driver=True, configure_logging=False)
        return False
    # address="local": a new embedded Ray, even when a `ray start` cluster on this machine would
    # otherwise capture a plain ray.init().
    # + 1 for Ray Data's read/preprocess tasks.
    needed = math.ceil(max(cpus, cfg.num_workers * cfg.cpus_per_worker)) + 1
    # Every worker pins RAY_ADDRESS to its own cluster (pin_ray_address); without the dashboard,
    # Ray Train's placement-group cleaner is muted as well (quiet_placement_group_cleaner).
    hook = pin_ray_address if dashboard else quiet_placement_group_cleaner
    runtime_env = {"worker_process_setup_hook": f"{hook.__module__}.{hook.__name__}"}
    ray.init(
        address="local",
        num_cpus=max(os.cpu_count() or 1, needed),
        include_dashboard=dashboard,
        configure_logging=False,
        runtime_env=runtime_env,
    )
    return True


def pin_ray_address() -> None:
    """Worker setup hook: RAY_ADDRESS = this worker's own cluster.

    Ray Train's placement-group cleaner (which frees a run's workers when its controller dies, e.g.
    a Tune trial stopped by ASHA) finds its cluster through the State API, whose address lookup
    takes "the latest" Ray on a machine running several (another user's, a test session's) unless
    RAY_ADDRESS names one.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook of an embedded Ray without the dashboard: mute Ray Train's placement-group
    cleaner.

    The cleaner asks the State API, which the dashboard serves, whether the run's controller is
    still alive, and warns every time nothing answers: about one line a second, thousands over an
    hour's run. An embedded Ray ends with the process that started it, and its placement groups
    with it, so the cleaner has nothing to do here. RAY_ADDRESS is pinned as well: without it the
    cleaner's look-up fails outright on a machine running another Ray.
    """
    pin_ray_address()
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the training workers: storage credentials and, on CPU, DeepSpeed's CPU accelerator."""
    env = {k: os.environ[k] for k in storage.AWS_ENV_VARS if os.environ.get(k)}
    # Explicit both ways: a driver started with DS_ACCELERATOR=cpu must not pin GPU workers to CPU.
    env["DS_ACCELERATOR"] = "cuda" if cfg.use_gpu else "cpu"
    # Ray Train's print patch copies a worker's print to the root logger on top of the stdout Ray
    # already forwards to the driver; off, each progress line is shown once.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    return env


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    """Ray resources of one training worker."""
    resources: dict[str, float] = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = 1
    if not any(resources.values()):
        # A placement-group bundle cannot be empty: with no CPU reserved, a little memory stands in.
        resources["memory"] = WORKER_MEMORY_PLACEHOLDER
    return resources
