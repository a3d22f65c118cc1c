"""medfusion.registry on a local folder and on the real S3 store: versions, latest, lineage, crashes,
concurrency, the CLI, and loading a registered version in the predictor."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from medfusion import registry, storage
from medfusion.cli import main
from medfusion.config import ConfigError, DataConfig, SynthConfig
from medfusion.data import synth
from medfusion.data.tokenizer import Tokenizer
from medfusion.export import CHECKSUMS_FILE, EXPORT_FILES, LINEAGE_FILE, ExportError, export_model, verify_export
from medfusion.models import create_model
from medfusion.predictor import Predictor
from medfusion.registry import ModelNotFoundError, RegistryError

DATA = DataConfig(image_size=64, max_report_tokens=24, max_findings_tokens=40)
NAME = "medfusion-tiny"
SWEEP_LINEAGE = {
    "sweep_uri": "s3://b/sweeps/s1",
    "trial_id": "trial_00003",
    "checkpoint_uri": "s3://b/sweeps/s1/t3/ckpt",
    "objective": "val_accuracy",
}


@pytest.fixture(scope="module")
def samples():
    return list(synth.generate(SynthConfig(num_samples=16, image_size=64)))


def _export(path: Path, samples, seed: int, accuracy: float) -> str:
    classes = synth.class_names(SynthConfig())
    tokenizer = Tokenizer.build(s.report + " " + s.findings for s in samples)
    torch.manual_seed(seed)
    model = create_model("medfusion_tiny", len(tokenizer), len(classes)).eval()
    lineage = {
        "dataset_uri": "s3://b/datasets/synth",
        "dataset_version": "ds-1234abcd",
        "run_id": f"run-{seed}",
        "config": {"lr": 3e-4, "model": {"fusion": "gated", "preset": "tiny"}},
    }
    return export_model(
        model,
        str(path),
        tokenizer=tokenizer,
        classes=classes,
        data_settings=DATA,
        metrics={"accuracy": accuracy, "mean_iou": 0.25, "auroc_macro": float("nan")},
        lineage=lineage,
    )


@pytest.fixture(scope="module")
def exports(tmp_path_factory, samples) -> list[str]:
    """Two different tiny exports (different weights and metrics)."""
    root = tmp_path_factory.mktemp("registry-exports")
    return [_export(root / f"export-{seed}", samples, seed, accuracy=0.5 + seed / 10) for seed in (0, 1)]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh registry root: a local folder, or a prefix on the session's SeaweedFS."""
    if request.param == "local":
        return str(tmp_path / "registry")
    return request.getfixturevalue("s3_prefix") + "/registry"


def _complete(uri: str) -> bool:
    return storage.exists(storage.join(uri, registry.VERSION_FILE))


def test_register_resolve_and_load_in_the_predictor(root, exports, samples):
    mv = registry.register(exports[0], root, NAME, metrics_ci={"accuracy": [0.41, 0.59]}, lineage=SWEEP_LINEAGE)
    assert mv.version.startswith("sha-") and len(mv.version) == 16 and mv.is_latest
    assert mv.uri == storage.join(root, NAME, mv.version) == registry.resolve_model_uri(root, NAME)
    assert registry.resolve_model_uri(root, NAME, mv.version) == mv.uri
    assert mv.metrics == {"accuracy": 0.5, "mean_iou": 0.25} and mv.metrics_ci == {"accuracy": [0.41, 0.59]}
    assert mv.dataset_version == "ds-1234abcd" and mv.source_uri == exports[0]

    # lineage.json links dataset -> trial -> checkpoint -> export -> this version
    chain = {step["step"]: step for step in mv.lineage["chain"]}
    assert chain["dataset"] == {"step": "dataset", "uri": "s3://b/datasets/synth", "version": "ds-1234abcd"}
    assert chain["run"]["trial_id"] == "trial_00003" and chain["run"]["sweep_uri"] == "s3://b/sweeps/s1"
    assert chain["checkpoint"]["uri"] == "s3://b/sweeps/s1/t3/ckpt" and chain["export"]["uri"] == exports[0]
    assert chain["model"] == {"step": "model", "ref": mv.ref, "uri": mv.uri}
    assert mv.lineage["objective"] == "val_accuracy" and mv.lineage["run_id"] == "run-0"

    card = storage.read_text(storage.join(mv.uri, registry.CARD_FILE))
    for text in (
        f"# Model card: {mv.ref}",
        "ds-1234abcd",
        "| accuracy | 0.5000 | [0.4100, 0.5900] |",
        "| mean_iou | 0.2500 | not computed |",
        '| model.fusion | "gated" |',
        "| lr | 0.0003 |",
        "Not for clinical use",
        "## Limitations",
        "trial_id trial_00003",
        "s3://b/sweeps/s1/t3/ckpt",
    ):
        assert text in card, text

    # The version folder is itself a verified export, whose lineage is the registry's.
    assert set(verify_export(mv.uri)) == {*EXPORT_FILES, CHECKSUMS_FILE}
    predictor = Predictor.from_export(registry.resolve_model_uri(root, NAME))
    assert predictor.info["lineage"]["model_version"] == mv.version
    (prediction,) = predictor.predict([{"image": samples[0].image, "report": samples[0].report}])
    assert prediction["labels"] and isinstance(prediction["findings"], str)


def test_lineage_file_name_is_the_exports():
    assert registry.LINEAGE_FILE == LINEAGE_FILE


def test_reregistering_is_a_no_op_and_versions_are_immutable(tmp_path, exports):
    root = str(tmp_path / "registry")
    first = registry.register(exports[0], root, NAME)
    again = registry.register(exports[0], root, NAME, lineage={"trial_id": "other"})
    assert (again.version, again.registered_at, again.lineage) == (first.version, first.registered_at, first.lineage)
    assert [mv.version for mv in registry.list_versions(root)] == [first.version]

    pinned = registry.register(exports[0], root, NAME, version="v1")
    assert registry.register(exports[0], root, NAME, version="v1").registered_at == pinned.registered_at
    before = {p: storage.read_bytes(p) for p in storage.list_files(pinned.uri)}
    with pytest.raises(RegistryError, match=r"medfusion-tiny:v1 already exists .* versions are immutable"):
        registry.register(exports[1], root, NAME, version="v1")
    assert {p: storage.read_bytes(p) for p in storage.list_files(pinned.uri)} == before
    assert registry.get_version(root, NAME).version == "v1"  # the failed registration moved nothing
    with pytest.raises(ConfigError, match="alias"):
        registry.register(exports[0], root, NAME, version="latest")


def test_list_is_newest_first_and_latest_is_marked(tmp_path, exports):
    root = str(tmp_path / "registry")
    old = registry.register(exports[0], root, NAME)
    new = registry.register(exports[1], root, NAME, set_latest=False)
    other = registry.register(exports[0], root, "other-model")
    assert [mv.ref for mv in registry.list_versions(root)] == [other.ref, new.ref, old.ref]
    assert [(mv.version, mv.is_latest) for mv in registry.list_versions(root, NAME)] == [
        (new.version, False),
        (old.version, True),
    ]
    registry.register(exports[1], root, NAME)  # re-registering promotes it to latest
    assert registry.get_version(root, NAME).version == new.version
    assert registry.list_versions(str(tmp_path / "empty")) == []


@pytest.mark.parametrize("same_export", [False, True], ids=["two-exports", "one-export-twice"])
def test_concurrent_registrations_do_not_clobber_and_latest_is_always_complete(root, exports, monkeypatch, same_export):
    sources = [exports[0], exports[0]] if same_export else exports
    real_write = storage.write_bytes

    def slow_write(uri: str, data: bytes) -> None:  # widen the window in which the two copies interleave
        time.sleep(0.01)
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", slow_write)
    start = threading.Barrier(3)
    results, errors, seen = {}, [], []
    done = threading.Event()

    def register(i: int) -> None:
        start.wait()
        try:
            results[i] = registry.register(sources[i], root, NAME)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    def watch() -> None:  # a reader resolving `latest` the whole time must only ever see complete versions
        start.wait()
        while not done.is_set():
            try:
                uri = registry.resolve_model_uri(root, NAME)
            except ModelNotFoundError:
                continue  # nothing registered yet
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)
                return
            seen.append((uri, _complete(uri)))

    threads = [threading.Thread(target=register, args=(i,)) for i in (0, 1)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join(60)
    done.set()
    threads[2].join(60)
    assert not errors, errors
    versions = {mv.version for mv in results.values()}
    assert len(versions) == (1 if same_export else 2)
    for mv in results.values():
        assert _complete(mv.uri)
        verify_export(mv.uri)  # every file intact: neither copy clobbered the other
    assert registry.get_version(root, NAME).version in versions
    assert {mv.version for mv in registry.list_versions(root, NAME)} == versions
    assert all(complete for _, complete in seen)


@pytest.mark.parametrize("writes_before_crash", [0, 4, 8])  # 8: every file but version.json
def test_a_crash_mid_copy_is_invisible_and_the_next_registration_completes_it(
    root, exports, monkeypatch, writes_before_crash
):
    previous = registry.register(exports[0], root, NAME)
    real_write = storage.write_bytes
    count = [0]

    def crashing_write(uri: str, data: bytes) -> None:
        if count[0] == writes_before_crash:
            raise OSError(f"simulated crash writing {uri}")
        count[0] += 1
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", crashing_write)
    with pytest.raises(OSError, match="simulated crash"):
        registry.register(exports[1], root, NAME)
    monkeypatch.setattr(storage, "write_bytes", real_write)

    partial = "sha-" + hashlib.sha256(storage.read_bytes(storage.join(exports[1], CHECKSUMS_FILE))).hexdigest()[:12]
    assert registry.resolve_model_uri(root, NAME) == previous.uri
    assert [mv.version for mv in registry.list_versions(root)] == [previous.version]
    if writes_before_crash:
        with pytest.raises(ModelNotFoundError, match=f"{NAME}:{partial} is incomplete"):
            registry.resolve_model_uri(root, NAME, partial)
    redone = registry.register(exports[1], root, NAME)
    assert redone.version == partial and redone.is_latest and registry.resolve_model_uri(root, NAME) == redone.uri
    verify_export(redone.uri)


@pytest.mark.parametrize(
    "ref, expected",
    [
        ("medfusion", ("medfusion", "latest")),
        ("medfusion-tiny:sha-0123456789ab", ("medfusion-tiny", "sha-0123456789ab")),
        (" m.v2_x:v1.0 ", ("m.v2_x", "v1.0")),
        ("", "name"),
        ("bad name", "name"),
        (":v1", "name"),
        ("m:", "version"),
        ("m:a:b", "version"),
        ("../m", "name"),
        ("m:../v", "version"),
        ("_deployments", "name"),
        ("m" * 129, "name"),
    ],
)
def test_parse_ref(ref, expected):
    if isinstance(expected, tuple):
        assert registry.parse_ref(ref) == expected
        return
    with pytest.raises(ConfigError, match=rf"model reference .*: {expected}: .* not a valid name \(allowed: "):
        registry.parse_ref(ref)


def test_unknown_names_and_versions_list_what_exists(tmp_path, exports):
    root = str(tmp_path / "registry")
    with pytest.raises(ModelNotFoundError, match="the registry is empty"):
        registry.get_version(root, NAME)
    mv = registry.register(exports[0], root, NAME)
    with pytest.raises(ModelNotFoundError, match=f"model 'nope' is not in the registry {root}; models: {NAME}"):
        registry.resolve_model_uri(root, "nope")
    with pytest.raises(ModelNotFoundError, match=f"has no version 'v9'; versions in .*: {mv.version}"):
        registry.resolve_model_uri(root, NAME, "v9")
    with pytest.raises(ConfigError, match="not a valid name"):
        registry.register(exports[0], root, "bad/name")


def test_a_corrupted_export_is_refused_naming_the_file(tmp_path, exports):
    broken = tmp_path / "broken"
    for name in (*EXPORT_FILES, CHECKSUMS_FILE):
        (broken / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / name).write_bytes(Path(exports[0], name).read_bytes())
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(data))
    root = str(tmp_path / "registry")
    with pytest.raises(ExportError, match="model.safetensors: sha256 mismatch"):
        registry.register(str(broken), root, NAME)
    with pytest.raises(ExportError, match="checksums.json: missing"):
        registry.register(str(tmp_path / "nothing-here"), root, NAME)
    assert storage.list_files(root) == []


def test_bad_metrics_ci_names_the_metric(tmp_path, exports):
    with pytest.raises(ConfigError, match=r"metrics_ci.accuracy: expected \[low, high\]"):
        registry.register(exports[0], str(tmp_path), NAME, metrics_ci={"accuracy": [0.9, 0.1]})


def test_cli_models_register_list_show(root, exports, capsys, monkeypatch):
    monkeypatch.setenv(registry.REGISTRY_ENV, root)  # the default --registry
    assert main(["models", "register", exports[0], "--name", NAME, "--version", "v1"]) == 0
    assert f"registered {NAME}:v1 at {storage.join(root, NAME, 'v1')} (latest)" in capsys.readouterr().out
    assert main(["models", "register", exports[1], "--name", NAME, "--no-latest", "--registry", root]) == 0
    capsys.readouterr()

    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "REGISTERED", "(UTC)", "DATA", "VERSION", "METRICS", "LATEST"]
    assert len(lines) == 3 and lines[1].split()[1].startswith("sha-") and "accuracy=0.6000" in lines[1]
    assert lines[2].split()[1] == "v1" and lines[2].rstrip().endswith("*") and "ds-1234abcd" in lines[2]
    assert main(["models", "list", "--name", "other"]) == 0
    assert capsys.readouterr().out.strip() == "no registered models"

    assert main(["models", "show", NAME]) == 0
    out = capsys.readouterr().out
    assert (
        out.startswith(f"# Model card: {NAME}:v1")
        and f"version folder (export): {storage.join(root, NAME, 'v1')}" in out
    )
    assert main(["models", "show", f"{NAME}:nope"]) == 2
    err = capsys.readouterr().err
    assert "ModelNotFoundError" in err and "has no version 'nope'" in err and "v1" in err and "Traceback" not in err
    assert main(["models", "show", "bad name"]) == 2
    assert "not a valid name" in capsys.readouterr().err


def test_version_json_is_the_metadata(tmp_path, exports):
    mv = registry.register(
        exports[0],
        str(tmp_path),
        NAME,
        metrics={"accuracy": 0.7, "loss": float("nan")},
        metrics_ci={"test_f1": (0.1, 0.2)},
    )
    meta = json.loads(storage.read_bytes(storage.join(mv.uri, registry.VERSION_FILE)))
    assert meta["name"] == NAME and meta["version"] == mv.version and meta["registered_at"] == mv.registered_at
    assert meta["metrics"] == {"accuracy": 0.7} and meta["metrics_ci"] == {"test_f1": [0.1, 0.2]}
    assert meta["source_uri"] == exports[0] and meta["content_sha256"] == mv.lineage["export_checksums_sha256"]
    assert meta["dataset_uri"] == "s3://b/datasets/synth" and meta["params"]["model.fusion"] == "gated"
    card = storage.read_text(storage.join(mv.uri, registry.CARD_FILE))
    assert "| accuracy | 0.7000 | not computed |" in card and "| test_f1 | - | [0.1000, 0.2000] |" in card
    assert "loss" not in meta["metrics"]


@pytest.mark.parametrize(
    "metrics, shown",
    [
        ({"accuracy": 0.5, "mean_iou": 0.25}, ["accuracy", "mean_iou"]),
        (
            {"val_loss": 1.0, "test_accuracy": 0.9, "test_mean_iou": 0.5, "x": 2.0},
            ["test_accuracy", "test_mean_iou", "val_loss"],
        ),
        ({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}, ["a", "b", "c"]),
        ({}, []),
    ],
)
def test_models_list_picks_the_headline_metrics(metrics, shown):
    assert registry._list_metrics(metrics) == shown
