"""URIs in, bytes out: local paths and ``s3://`` through one small API.

S3 is configured by the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_REGION``), so AWS S3, MinIO, SeaweedFS and GCS interop work the same.
Transient S3 errors (a restarting server, a dropped connection) are retried with backoff; an error
that outlives the retries names the object.
"""

from __future__ import annotations

import functools
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

T = TypeVar("T")

RETRY_ATTEMPTS = int(os.environ.get("MEDFUSION_S3_RETRIES", "10"))  # ~50 s of backoff in all
RETRY_BASE_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 8.0


class StorageError(IOError):
    """An object could not be read or written; the message names it."""


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a local path or an s3:// URI."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


_AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
            "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def s3_filesystem() -> pafs.S3FileSystem:
    """A pyarrow S3 filesystem from the standard AWS environment variables (cached per env, so
    connections are reused across calls)."""
    # The pid is part of the key: the AWS SDK client must not be shared across fork().
    return _s3_filesystem((os.getpid(), *(os.environ.get(k) for k in _AWS_ENV)))


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

    Errors that retrying cannot fix (not found, permission, wrong kind of path) are raised at once.
    """
    delay = RETRY_BASE_DELAY_S
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise  # retrying cannot help
        except (OSError, ConnectionError) as err:
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
