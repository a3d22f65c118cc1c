"""What a Serve application is configured with: the typed config, the model reference, the token, the
deployment options and the init args of each deployment, and the settings the HTTP API enforces.

Pure functions of a `ServeConfig`: nothing here imports Ray, FastAPI or torch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from medfusion.config import ConfigError, ServeConfig, ServeLimitsConfig
from medfusion.loader import load_config

log = logging.getLogger(__name__)

# Serve's HTTP proxies run `medfusion.serve.app.proxy_callback` (the request-header timeout) when Ray's
# processes start with this variable naming it.
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "medfusion.serve.app:proxy_callback"
THROUGHPUT_ENV = {
    # Serve's throughput mode (ray/serve/_private/constants.py, RAY_SERVE_THROUGHPUT_OPTIMIZED): user
    # code and the router on the replica's own event loop instead of threads of their own, proxy and
    # handle calls over gRPC, the GC frozen after start-up. The model runs on its own thread
    # (runtime.ModelRunner), so nothing blocks that loop.
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ...but not its direct ingress: that starts no proxies (so no header timeout) and has each ingress
    # replica listen on a port of its own, for HAProxy in front of them.
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    # ...nor its buffered request logs (1000 lines per process): a replica killed with its node would
    # take them along, and they would reach the log file only in bursts.
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
}
SERVE_ENVIRONMENT = {PROXY_CALLBACK_ENV: PROXY_CALLBACK, **THROUGHPUT_ENV}
"""What Ray's processes must find in their environment for the app's Serve, read once as each starts:
the image sets it (Dockerfile), `medfusion serve` and the bench set it before starting an embedded Ray."""


def export_serve_environment() -> None:
    """SERVE_ENVIRONMENT into this process's environment, keeping any variable already set, so that a
    Ray started here afterwards passes it to Serve's processes."""
    for name, value in SERVE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)


# Fields of ServeConfig the model replicas read: changing any other field (limits, auth...) does not
# restart them.
MODEL_FIELDS = ("device", "beam_size", "max_decode_len", "max_batch_size", "batch_wait_timeout_s", "torch_threads")


def serve_config(args: ServeConfig | Mapping[str, Any] | None) -> ServeConfig:
    """The typed config from what a Serve config file's ``args`` hold (a mapping) or a ServeConfig."""
    if isinstance(args, ServeConfig):
        return args
    if args is not None and not isinstance(args, Mapping):
        raise ConfigError(f"args: expected a mapping of ServeConfig fields, got {type(args).__name__}")
    return load_config(ServeConfig, base=dict(args or {}))


def _is_uri(model: str) -> bool:
    return "://" in model or "/" in model or model.startswith(".") or os.path.exists(model)


def resolve_served_model_uri(model: str, registry_uri: str = "") -> str:
    """The export folder to load for `model`: itself when it is a path or URI, else a registry lookup.

    What a ServeConfig's ``model`` may hold; `medfusion.registry.resolve_model_uri` resolves only the
    registry half of it, from an already split name and version.

    Args:
        model: an export folder (local path, ``s3://...``), or ``NAME[:VERSION]`` (VERSION defaults to
            ``latest``) resolved through ``medfusion.registry.resolve_model_uri``.
        registry_uri: the registry root, for NAME[:VERSION].

    Raises:
        ConfigError: naming the field, when the reference cannot be resolved (an unknown name or
            version lists the registered ones).
    """
    from medfusion import registry

    model = model.strip()
    if not model:
        raise ConfigError("model: required: an export folder (path or s3://...) or NAME[:VERSION] from the registry")
    if _is_uri(model):
        return model
    try:
        name, version = registry.parse_ref(model)
    except ConfigError as err:
        expected = "neither an existing path, an s3:// URI nor NAME[:VERSION]"
        raise ConfigError(f"model: {model!r} is {expected} ({err})") from None
    if not registry_uri:
        raise ConfigError(f"registry_uri: required to resolve the registry reference {model!r}")
    return registry.resolve_model_uri(registry_uri, name, version)


def read_token(env_name: str, token_file: str, required: bool = False) -> str | None:
    """The configured bearer token (file first, then the environment), or None when auth is off.

    Args:
        env_name: the environment variable that holds the token (unset or empty: no token).
        token_file: a file that holds it (takes precedence; it must exist and hold one).
        required: ServeConfig.require_auth: no token is an error rather than an open API.

    Raises:
        ConfigError: a configured token file that is missing or empty, or no token when `required`
            (never serve open by mistake).
    """
    if token_file:
        try:
            token = open(token_file, encoding="utf-8").read().strip()  # noqa: SIM115 - tiny file
        except OSError as err:
            raise ConfigError(f"auth_token_file: cannot read {token_file} ({type(err).__name__})") from None
        if not token:
            raise ConfigError(f"auth_token_file: {token_file} is empty")
        return token
    token = os.environ.get(env_name, "").strip() if env_name else ""
    if not token and required:
        where = f"{env_name} is {'empty' if env_name in os.environ else 'not set'}" if env_name else "no auth_token_env"
        raise ConfigError(
            f"require_auth: true, but there is no bearer token ({where} and no auth_token_file): "
            "refusing to serve /v1 without auth"
        )
    return token or None


def empty_token_warning(env_name: str, token_file: str) -> str | None:
    """A warning when the token variable is set but empty (e.g. a Kubernetes Secret with an empty key):
    auth is then off, which an unset variable says by intent but an empty one likely does not."""
    if token_file or not env_name or env_name not in os.environ or os.environ[env_name].strip():
        return None
    return (
        f"{env_name} is set but empty: bearer-token auth is OFF and /v1 answers anyone "
        "(require_auth=true refuses to start instead)"
    )


def check_auth(cfg: ServeConfig, warn: Callable[[str], None] | None = None) -> list[str]:
    """What `medfusion serve` checks before it starts anything; returns the warnings.

    Args:
        cfg: the application's settings.
        warn: called with each warning before any error is raised (the CLI prints them).

    Raises:
        ConfigError: `cfg.require_auth` without a non-empty token, or an unreadable token file.
    """
    warning = empty_token_warning(cfg.auth_token_env, cfg.auth_token_file)
    warnings = [warning] if warning else []
    for line in warnings:
        if warn is not None:
            warn(line)
    read_token(cfg.auth_token_env, cfg.auth_token_file, required=cfg.require_auth)
    return warnings


def model_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options of the model deployment (a Serve config file's `deployments` override them)."""
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus}
    if cfg.num_gpus:
        actor["num_gpus"] = cfg.num_gpus
    return {
        "autoscaling_config": asdict(cfg.autoscaling),
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"retry_after_s": cfg.limits.retry_after_s},
        "ray_actor_options": actor,
    }


def ingress_deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve deployment options of the HTTP ingress.

    Its proxy-side queue is as deep as one replica's capacity: requests wait there for a moment while
    the router picks a replica even when replicas have room, so the model's (small) queue bound would
    refuse bursts the ingress could take.
    """
    return {
        "num_replicas": cfg.ingress_replicas,
        "max_ongoing_requests": cfg.ingress_max_ongoing_requests,
        "max_queued_requests": cfg.ingress_max_ongoing_requests,
        "backpressure_config": {"retry_after_s": cfg.limits.retry_after_s},
        "ray_actor_options": {"num_cpus": cfg.ingress_num_cpus},
    }


def model_args(cfg: ServeConfig) -> dict[str, Any]:
    """Init args of a model replica: only what it reads, so that other changes do not restart it."""
    return {**{k: getattr(cfg, k) for k in MODEL_FIELDS}, "max_pixels": cfg.limits.max_pixels}


def ingress_args(cfg: ServeConfig) -> dict[str, Any]:
    """Init args of an ingress replica: limits and where to read the token (never the token itself)."""
    return {
        "limits": asdict(cfg.limits),
        "auth_token_env": cfg.auth_token_env,
        "auth_token_file": cfg.auth_token_file,
        "require_auth": cfg.require_auth,
    }


@dataclass(frozen=True)
class ApiSettings:
    """What `create_api` enforces."""

    limits: ServeLimitsConfig = field(default_factory=ServeLimitsConfig)
    token: str | None = None
    """The bearer token; None disables auth."""
    echo_request_id: bool = True
    """Add X-Request-ID to responses (off behind Serve, whose proxy already does)."""

    @classmethod
    def from_ingress_args(cls, args: Mapping[str, Any], echo_request_id: bool = False) -> ApiSettings:
        """Settings from `ingress_args`, reading the token where the replica runs (env or mounted file).

        Raises:
            ConfigError: ``require_auth`` without a token: the replica (and so the deployment) fails
                to start rather than serve an open API.
        """
        limits = load_config(ServeLimitsConfig, base=dict(args.get("limits") or {}))
        env_name, token_file = str(args.get("auth_token_env", "")), str(args.get("auth_token_file", ""))
        warning = empty_token_warning(env_name, token_file)
        if warning:
            log.warning("medfusion API: %s", warning)
        token = read_token(env_name, token_file, required=bool(args.get("require_auth", False)))
        return cls(limits=limits, token=token, echo_request_id=echo_request_id)
