"""medfusion.storage against a local folder and the real SeaweedFS S3 server."""

from __future__ import annotations

import pytest

from medfusion import storage

pytestmark = pytest.mark.integration


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_prefix")


def test_round_trip_list_and_delete(root):
    storage.ensure_bucket(root)
    storage.write_bytes(storage.join(root, "a", "x.bin"), b"x" * 10)
    storage.write_text(storage.join(root, "b.txt"), "hello")
    assert storage.read_bytes(storage.join(root, "a", "x.bin")) == b"x" * 10
    assert storage.read_text(storage.join(root, "b.txt")) == "hello"
    assert [u.rsplit("/", 1)[-1] for u in storage.list_files(root)] == ["x.bin", "b.txt"]
    assert storage.exists(storage.join(root, "b.txt"))
    storage.delete_prefix(root)
    assert storage.list_files(root) == []


def test_missing_object_is_named(root):
    missing = storage.join(root, "nope.bin")
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.read_bytes(missing)
    assert not storage.exists(missing)


def test_local_writes_leave_no_temporary_files(tmp_path):
    target = tmp_path / "f.bin"
    storage.write_bytes(str(target), b"1")
    storage.write_bytes(str(target), b"22")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"] and target.read_bytes() == b"22"


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://b/runs/r1/model", "s3://b/runs/r1"),
        ("s3://b/runs/r1/model/", "s3://b/runs/r1"),
        ("s3://b/m.csv", "s3://b"),
        ("s3://b", "s3://b"),
        ("/data/cohort/m.csv", "/data/cohort"),
    ],
)
def test_parent_of_a_uri(uri, expected):
    assert storage.parent(uri) == expected


def test_json_files_are_strict_json(tmp_path):
    import json

    import numpy as np

    uri = str(tmp_path / "m.json")
    storage.write_json(
        uri, {"nan": float("nan"), "inf": float("inf"), "np": np.float32(0.5), "t": (1, 2), "o": tmp_path}
    )
    assert json.loads(storage.read_text(uri)) == {"nan": None, "inf": None, "np": 0.5, "t": [1, 2], "o": str(tmp_path)}


@pytest.mark.integration
@pytest.mark.parametrize(
    "env, code",
    [
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, "ACCESS_DENIED|SIGNATURE_DOES_NOT_MATCH"),
        ({"AWS_ACCESS_KEY_ID": "nobody"}, "ACCESS_DENIED|INVALID_ACCESS_KEY_ID"),
    ],
)
def test_refused_credentials_fail_at_once_naming_the_uri_and_their_source(
    s3_store, s3_prefix, monkeypatch, capsys, env, code
):
    from medfusion.cli import main
    from medfusion.config import PrepareConfig, SynthConfig
    from medfusion.data.prepare import run_prepare

    uri = s3_prefix + "/refused"
    run_prepare(PrepareConfig(source="synthetic", output_uri=uri, synth=SynthConfig(num_samples=40, image_size=32)))
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)  # a retry would sleep first
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(storage.StorageAccessError, match=f"read {uri}/manifest.json: .*({code})") as err:
        storage.read_text(uri + "/manifest.json")
    assert "credentials: AWS_ACCESS_KEY_ID=" in str(err.value) and env.get("AWS_SECRET_ACCESS_KEY", "@") not in str(
        err.value
    )
    assert main(["data", "inspect", uri]) == 2
    message = capsys.readouterr().err
    assert uri in message and "credentials:" in message and "Traceback" not in message
    assert sleeps == []


def test_transient_errors_are_still_retried(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    calls = iter([OSError("AWS Error NETWORK_CONNECTION during GetObject"), OSError("connection reset"), b"ok"])

    def flaky() -> bytes:
        outcome = next(calls)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    assert storage.with_retries("read s3://b/k", flaky) == b"ok"
    assert len(sleeps) == 2
