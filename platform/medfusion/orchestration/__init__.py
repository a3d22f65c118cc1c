"""Orchestration: where each stage runs, and the pipeline steps around the stages.

One module per job:

- `stages`: the stage table (`STAGES`), the execution target of a ``ray_address`` (`ray_target`),
  `run_stage` (embedded, Ray Jobs API or KubeRay; the result comes back as the same dict), and the
  remote entry point `main` (``python -m medfusion.orchestration STAGE --config-b64 ... --result-uri ...``).
- `jobs`: the one Ray Jobs API client: auth token and headers, the job environment, submit-and-follow
  with log streaming, `JobError` and the terminal job states.
- `kuberay`: `KubeRayOptions`, the RayJob and RayService manifests, `run_rayjob`, `apply_rayservice`,
  the RBAC those calls need, and the project's images.
- `artifacts`: what a KFP step records in its artifacts (data URIs, results, metrics, the leaderboard).
- `gate`: the quality gate over evaluate's metrics.
- `deploy`: publish to the registry, deploy the Serve application where ``ray_address`` says, and
  smoke-test it like a client.
- `pipeline`: `PipelineConfig`, the typed parameters of the Kubeflow pipeline.

Callers import each name from its module; this package re-exports nothing. Its users are the stage
functions (``medfusion.train`` dispatches a remote ``ray_address`` through `stages`) and the entry
points: the CLI, the KFP components and the pipeline (``medfusion.pipelines.run`` runs or submits
it). It never imports those wrappers: the Serve app and the stage functions are named by import path
strings. Importing any module here starts nothing and imports neither Ray, kfp nor kubernetes.
"""
