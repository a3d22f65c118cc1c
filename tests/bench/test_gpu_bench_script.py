"""scripts/gpu_bench.sh (run on a GPU machine, not here): it parses, and every command it runs is one
the CLI accepts, with the settings the GPU measurements need."""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess

import pytest

from medfusion import cli

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "gpu_bench.sh"


def _commands(out_dir: pathlib.Path) -> dict[str, list[str]]:
    """name -> argv after the executable, from the script's dry run."""
    env = {**os.environ, "DRY_RUN": "1", "MEDFUSION": "medfusion"}
    proc = subprocess.run(["bash", str(SCRIPT), str(out_dir)], env=env, capture_output=True, text=True, check=True)
    commands = {}
    for line in proc.stdout.splitlines():
        name, command = line.split(": ", 1)
        executable, *argv = shlex.split(command)
        assert executable == "medfusion", line
        commands[name] = argv
    return commands


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_runs_nothing_and_writes_nothing(tmp_path):
    assert set(_commands(tmp_path / "out")) == {"train-zero0-3", "serve-tiny", "serve-small", "ingest"}
    assert not (tmp_path / "out").exists()


@pytest.fixture
def loaded(monkeypatch):
    """The config each bench command loads; the benches themselves do not run."""
    import medfusion.bench.ingest
    import medfusion.bench.serve
    import medfusion.bench.train

    seen = {}

    def record(name):
        def run(cfg, **_):
            seen[name] = cfg
            return {}

        return run

    monkeypatch.setattr(medfusion.bench.train, "run_train_bench", record("train"))
    monkeypatch.setattr(medfusion.bench.serve, "run_serve_bench", record("serve"))
    monkeypatch.setattr(medfusion.bench.ingest, "run_ingest_bench", record("ingest"))
    return seen


def test_every_command_is_accepted_by_the_cli(tmp_path, loaded):
    configs = {}
    for name, argv in _commands(tmp_path).items():
        loaded.clear()
        assert cli.main(argv) == 0, name
        (configs[name],) = loaded.values()
    train = configs["train-zero0-3"]
    assert (train.device, train.zero_stages) == ("cuda", [0, 1, 2, 3])
    assert (configs["serve-tiny"].preset, configs["serve-small"].preset) == ("tiny", "small")
    assert type(configs["ingest"]).__name__ == "IngestBenchConfig"
