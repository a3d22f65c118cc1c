"""Distributed training: everything a run needs below the train stage (`medfusion.train.run_train`).

- `run`: one run on the connected Ray: `plan_run` (checks before any worker starts), `train_here`,
  `build_trainer` and `fit` (the Ray Train `TorchTrainer`), the run's outputs.
- `rundir`: the run folder: file names, `resolve_run`, resume checks, `TrainResult`.
- `runtime`: the Ray runtime: `ensure_ray` (embedded Ray), the worker setup hooks, each worker's
  environment and resources.
- `loop`: the one per-worker training loop (`train_loop_per_worker`) and the `TrainJob` it is handed.
- `engine`: the strategies behind one `Engine` protocol: DeepSpeed (ZeRO 0-3) and DDP.
- `outputs`: learning curves and the test evaluation of a finished run.

A run on a Ray cluster (``ray_address``) is submitted through `medfusion.orchestration.stages`, as
every stage is.

Imported by the stages (`medfusion.train`, `medfusion.tune`), `medfusion.tuning` and `medfusion.bench`.
Nothing here imports a stage module, so the stages stay thin and free of cycles.
"""
