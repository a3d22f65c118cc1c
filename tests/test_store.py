"""`medfusion store up|status|down` start and stop exactly one SeaweedFS process on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from medfusion.store import _pid_alive

pytestmark = pytest.mark.integration


def _cli(*args, root):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return subprocess.run(
        [sys.executable, "-m", "medfusion.cli", "--store-root", str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_store_up_status_down(tmp_path):
    root = tmp_path / "store"
    assert _cli("store", "status", root=root).returncode == 1
    up = _cli("store", "up", root=root)
    assert up.returncode == 0, up.stderr
    assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in up.stdout
    state = json.loads((root / "store.json").read_text())
    try:
        status = _cli("store", "status", root=root)
        assert status.returncode == 0 and json.loads(status.stdout)["pid"] == state["pid"]
        # A second `up` reuses the running server instead of starting another.
        again = _cli("store", "up", root=root)
        assert json.loads((root / "store.json").read_text())["pid"] == state["pid"], again.stderr
        env = dict(
            line.removeprefix("export ").split("=", 1) for line in up.stdout.splitlines() if line.startswith("export")
        )
        import boto3
        import botocore.exceptions

        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        assert "medfusion" in {b["Name"] for b in s3.list_buckets()["Buckets"]}
        wrong = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="nobody",
            aws_secret_access_key="wrong",
            region_name="us-east-1",
        )
        with pytest.raises(
            botocore.exceptions.ClientError, match="InvalidAccessKeyId|AccessDenied|SignatureDoesNotMatch"
        ):
            wrong.list_objects_v2(Bucket="medfusion")
    finally:
        down = _cli("store", "down", root=root)
    assert down.stdout.strip() == "stopped"
    assert not _pid_alive(state["pid"])  # gone, or a zombie waiting for an init that does not reap
    assert _cli("store", "down", root=root).stdout.strip() == "not running"
