"""URIs in, bytes out: local paths and ``s3://`` through one small API.

S3 is configured by the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``), so AWS S3, MinIO, SeaweedFS and GCS interop work the same.
Transient S3 errors (a restarting server, a dropped connection) are retried with backoff; an error
that outlives the retries names the object.
"""

from __future__ import annotations

import functools
import json
import math
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

T = TypeVar("T")

RETRY_ATTEMPTS = int(os.environ.get("MEDFUSION_S3_RETRIES", "10"))  # ~50 s of backoff in all
RETRY_BASE_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 8.0


# AWS error codes that retrying cannot fix: wrong or expired credentials, a refused policy, a bucket
# that does not exist. pyarrow spells them ACCESS_DENIED, S3 itself and boto3 AccessDenied.
PERMANENT_S3_ERRORS = {
    "ACCESS_DENIED": "access denied: the credentials are wrong or lack permission",
    "INVALID_ACCESS_KEY_ID": "the server knows no such access key id",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key id",
    "NO_SUCH_BUCKET": "the bucket does not exist",
    "EXPIRED_TOKEN": "the session token has expired",
    "INVALID_TOKEN": "the session token is not valid",
}


class StorageError(IOError):
    """An object could not be read or written; the message names it."""


class StorageAccessError(StorageError):
    """S3 refused a request for a reason retrying cannot fix; the message names the object, the
    reason and where the credentials came from."""


def permanent_s3_error(err: BaseException) -> str | None:
    """The code of a permanent S3 error in `err`'s message (ACCESS_DENIED, …), or None."""
    text = str(err)
    for code in PERMANENT_S3_ERRORS:
        if code in text or code.title().replace("_", "") in text:
            return code
    return None


def credential_source() -> str:
    """Where S3 credentials come from, for error messages (the access key id shortened, no secret)."""
    key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or "AWS S3"
    if key:
        shown = key[:4] + "…" if len(key) > 4 else key
        return f"AWS_ACCESS_KEY_ID={shown} and AWS_SECRET_ACCESS_KEY from the environment, endpoint {endpoint}"
    return f"no AWS_ACCESS_KEY_ID in the environment (the AWS SDK's default chain), endpoint {endpoint}"


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a local path or an s3:// URI."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


def parent(uri: str) -> str:
    """The folder holding `uri` (``s3://b/runs/r1/model`` -> ``s3://b/runs/r1``); a bucket is its own parent."""
    if is_s3(uri):
        root = uri.rstrip("/")
        return root.rsplit("/", 1)[0] if root.count("/") > 2 else root
    return str(Path(uri).parent)


# The standard AWS variables that configure S3 access (credentials, endpoint, region).
AWS_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
)


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from the standard AWS environment variables (cached per env, so
    connections are reused across calls)."""
    # The pid is part of the key: the AWS SDK client must not be shared across fork().
    return _s3_filesystem((os.getpid(), *(os.environ.get(k) for k in AWS_ENV_VARS)))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(env_key: tuple) -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    kwargs: dict = {
        "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        # pyarrow's own retries are short; ours (with_retries) wrap every operation as well.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3),
        "connect_timeout": 5,
        "request_timeout": 60,
    }
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for `uri` and the path inside it (``bucket/key`` for S3)."""
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).absolute())


def with_retries(what: str, fn: Callable[[], T], attempts: int = RETRY_ATTEMPTS) -> T:
    """Run `fn`, retrying transient I/O errors with exponential backoff.

    Errors that retrying cannot fix (not found, permission, wrong kind of path, S3's refusals of the
    credentials or the bucket) are raised at once.

    Raises:
        StorageAccessError: S3 refused the credentials or the bucket (not retried).
        StorageError: a transient error outlived the retries.
    """
    delay = RETRY_BASE_DELAY_S
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise  # retrying cannot help
        except (OSError, ConnectionError) as err:
            code = permanent_s3_error(err)
            if code:
                raise StorageAccessError(
                    f"{what}: {PERMANENT_S3_ERRORS[code]} ({code}); credentials: {credential_source()}"
                ) from err
            if attempt == attempts:
                raise StorageError(f"{what}: failed after {attempts} attempts ({err})") from err
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY_S)
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    info = with_retries(f"stat {uri}", lambda: fs.get_file_info(path))
    return info.type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    """The whole object; FileNotFoundError names the URI when it does not exist."""
    fs, path = filesystem(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    try:
        return with_retries(f"read {uri}", read)
    except FileNotFoundError:
        raise FileNotFoundError(f"{uri}: no such file or object") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write an object whole. Local files go through a temporary name and a rename, so a reader
    never sees a partial file; an S3 PUT is atomic by itself."""
    fs, path = filesystem(uri)
    if not is_s3(uri):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
        return

    def put() -> None:
        with fs.open_output_stream(path) as f:
            f.write(data)

    with_retries(f"write {uri}", put)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str) -> list[str]:
    """All files under a prefix, recursively, as URIs of the same kind, sorted."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    infos = with_retries(f"list {uri}", lambda: fs.get_file_info(selector))
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + i.path for i in infos if i.type == pafs.FileType.File)


def delete_prefix(uri: str) -> None:
    """Remove everything under `uri` (no error when it does not exist)."""
    fs, path = filesystem(uri)
    info = with_retries(f"stat {uri}", lambda: fs.get_file_info(path))
    if info.type == pafs.FileType.Directory or (is_s3(uri) and info.type == pafs.FileType.NotFound):
        with_retries(f"delete {uri}", lambda: fs.delete_dir_contents(path, missing_dir_ok=True))
        if not is_s3(uri):
            fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        with_retries(f"delete {uri}", lambda: fs.delete_file(path))


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI when it does not exist (no-op for local paths)."""
    if not is_s3(uri):
        return
    bucket = uri[len("s3://") :].split("/", 1)[0]
    fs = s3_filesystem()
    info = with_retries(f"stat s3://{bucket}", lambda: fs.get_file_info(bucket))
    if info.type == pafs.FileType.NotFound:
        with_retries(f"create bucket s3://{bucket}", lambda: fs.create_dir(bucket))


def json_safe(value: Any) -> Any:
    """A copy of `value` that strict JSON accepts: non-finite floats become null, tuples lists,
    numpy/torch scalars numbers, and any other object its string."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if hasattr(value, "item") and callable(value.item):
        return json_safe(value.item())
    return str(value)


def json_bytes(value: Any, *, sort_keys: bool = False) -> bytes:
    """`value` as indented strict JSON (see json_safe)."""
    return json.dumps(json_safe(value), indent=2, sort_keys=sort_keys, allow_nan=False).encode()


def write_json(uri: str, value: Any, *, sort_keys: bool = False) -> None:
    """Write `value` to `uri` as indented strict JSON (see json_safe)."""
    write_bytes(uri, json_bytes(value, sort_keys=sort_keys))
