"""Online inference: the HTTP API, request validation and the model runner behind Ray Serve.

One module per layer, each importing only the ones above it in this list:

- `settings`: the typed `ServeConfig` from a Serve config's ``args`` (`serve_config`), the model
  reference resolved to an export (`resolve_served_model_uri`), the bearer token (`read_token`), each
  deployment's options and init args, and `ApiSettings` (what the API enforces).
- `parsing`: `ApiError` (status, stable error code, detail) and the `POST /v1/predict` body parsed and
  validated into a `PredictRequest` (JSON or multipart), the image header checked before decoding.
- `runtime`: the model side: `ModelRunner` (the loaded Predictor on its own thread), `BatchPacer`,
  `ServeMetrics`, and the `Backend` protocol the API calls, with `LocalBackend` (in process) and
  `HandleBackend` (a Serve handle to the model deployment).
- `api`: `create_api(backend)`, the FastAPI app (auth, limits, errors, access log); its docstring holds
  the table of every error a client can get.
- `header_timeout`: a request-header timeout for uvicorn (the server in Serve's proxy), which has none.

Callers import each name from its module; this package re-exports nothing. Its users are the entry
points: the Serve wrappers in `medfusion.serve.app`, the CLI and `medfusion.bench.serve`. The library
never imports `medfusion.serve` (the wrappers) itself: running the application on Ray
(`serve_forever`) lives there. Importing any module here starts nothing and imports neither Ray,
FastAPI nor torch.
"""
