"""The tune stage's parts (`medfusion.tune.run_tune` is the stage).

    config    TuneConfig, the sweep's schema
    space     search spaces: parsing, checking, Ray Tune domains, trial configs
    trials    running trials (each a Ray Train run) through Ray Tune, and reading them back
    results   trial records, the leaderboard, the Pareto front, the printed tables
    ablation  the fused-vs-single-modality ablation of a finished sweep, and registering the best

Library layer: imported by the tune stage, the benchmarks and the CLI; it imports the training
runtime (`medfusion.training`), never the stage modules.
"""
