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
