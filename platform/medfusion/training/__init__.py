"""Distributed training internals: the strategy engines (DeepSpeed, DDP), the one per-worker loop,
and submission to a Ray cluster. `medfusion.train.run_train` is the stage function that uses them."""
