"""`medfusion tune` across real Ray nodes (tests/multinode.py) when a node is lost mid-sweep.

Two trials run at once, one per worker node: each trial's Train worker takes 2 of a worker node's 3
CPUs (the third reads data), so two cannot share a node. Every trial's driver reserves the custom
resource `trial-driver`, which only the head has (TuneConfig.trial_resources), so the drivers, Ray
Train's controllers and their data coordinators stay on the head, as on Kubernetes where worker pods
are the ones that go. The node under one trial is killed once that trial's first checkpoint is
committed:

- that trial fails (train.max_failures=0: Train does not restart it in place) and Tune retries it
  (max_failures=1); the retry resumes from its checkpoint once a node has room for its worker;
- the other trial is not disturbed: one attempt, its workers where they started, all its epochs;
- the leaderboard ends complete: both trials finished, ranked, with objectives.

Every wait is on observable state (the driver's output, node states, checkpoint and attempt files),
bounded. Marked slow (about 4 minutes): `make test-slow`, or `pytest -m slow tests/cluster -s` to see
the figures (time to detect the lost node, time to the retry and to its resumption, steps lost).
"""

from __future__ import annotations

import json
import re
import time

import pytest

from medfusion import storage
from medfusion.orchestration.kuberay import TRIAL_DRIVER_RESOURCE
from medfusion.tuning import results as R
from multinode import RayNodes

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]

SAMPLES, IMAGE, STEPS = 240, 32, 6
NODES_LINE = re.compile(r"\[medfusion\] workers on nodes: rank 0 ([0-9a-f]+) \(run ([^)]+)\)")
RESUMED_LINE = re.compile(r"\[medfusion\] rank 0: resumed at epoch (\d+), global step (\d+) \(run ([^)]+)\)")


@pytest.fixture
def sweep_nodes(s3_store):
    """A head (0 CPUs, trial-driver: 100, as k8s/ heads advertise it) and two worker nodes of 3 CPUs each."""
    nodes = RayNodes(head_resources={TRIAL_DRIVER_RESOURCE: 100})
    try:
        nodes.start_head()
        nodes.add_worker("worker-a", cpus=3)
        nodes.add_worker("worker-b", cpus=3)
        yield nodes
    finally:
        nodes.stop()


@pytest.fixture
def sweep_dataset(s3_prefix, synthetic_dataset):
    return synthetic_dataset(f"{s3_prefix}/data", SAMPLES, IMAGE)


def _attempts(run_uri: str) -> list[dict]:
    return [json.loads(storage.read_text(uri)) for uri in storage.list_files(storage.join(run_uri, "attempts"))]


def test_a_lost_node_retries_its_trial_and_leaves_the_other_alone(sweep_nodes, sweep_dataset, s3_prefix):
    nodes = sweep_nodes
    storage_uri = f"{s3_prefix}/sweeps"
    sweep_uri = storage.join(storage_uri, "spread")
    driver = nodes.run_driver(
        [
            *["tune", "--preset", "tiny", "--data", sweep_dataset, "--name", "spread", "--seeds", "0"],
            *[f"storage_uri={storage_uri}", "register=false", "search=grid", "scheduler=fifo"],
            *["search_space.model.fusion=[concat, gated]", "max_concurrent_trials=2", "max_failures=1"],
            *["trial_cpus=0", f"trial_resources={{{TRIAL_DRIVER_RESOURCE}: 1}}"],
            *[f"data.image_size={IMAGE}", "data.batch_size=16", "train.epochs=3", f"train.max_steps_per_epoch={STEPS}"],
            *["train.num_workers=1", "train.cpus_per_worker=2", "train.max_failures=0", "train.worker_wait_s=300"],
            *["train.warmup_steps=1", "train.shuffle_buffer=0", "train.evaluate=false"],
        ]
    )

    # Both trials start, one per worker node.
    placed: dict[str, str] = {}
    after = 0.0
    while len(placed) < 2:
        after, match = driver.wait_line(NODES_LINE, "both trials' workers start", 300, after)
        placed.setdefault(match.group(2), nodes.name_of(match.group(1)))
    assert sorted(placed.values()) == ["worker-a", "worker-b"], f"one trial per worker node, got {placed}"
    victim = next(trial for trial, node in placed.items() if node == "worker-b")
    other = next(trial for trial in placed if trial != victim)
    victim_uri = storage.join(sweep_uri, "trials", victim)

    # Lose worker-b once the victim's first epoch is checkpointed.
    nodes.wait_for(
        lambda: storage.exists(storage.join(victim_uri, "checkpoint_epoch0000", "train_state.json")),
        f"trial {victim} commits epoch 0's checkpoint",
        300,
    )
    killed_at = nodes.kill("worker-b")
    nodes.wait_for(lambda: nodes.node_state("worker-b") == "DEAD", "worker-b seen dead", 60)
    detected_s = time.monotonic() - killed_at
    nodes.wait_for(lambda: len(_attempts(victim_uri)) == 2, f"Tune retries trial {victim}", 120)
    retried_s = time.monotonic() - killed_at
    resumed_at, resumed = driver.wait_line(RESUMED_LINE, f"trial {victim} resumes", 400, after=killed_at)
    assert resumed.group(3) == victim and int(resumed.group(1)) >= 1, resumed.group(0)

    assert driver.finish(600) == 0, driver.tail(120)
    board = json.loads(storage.read_text(storage.join(sweep_uri, "leaderboard.json")))
    trials = {t["trial_id"]: t for t in board["trials"]}
    assert set(trials) == {victim, other} and board["interrupted"] is False
    for trial in trials.values():
        assert trial["status"] == R.FINISHED and trial["objective"] is not None, trial
        assert trial["epochs_run"] == 3, trial
    assert sorted(t["rank"] for t in trials.values()) == [1, 2]
    assert trials[victim]["attempts"] == 2 and trials[other]["attempts"] == 1, trials
    assert [a["resumed_from_checkpoint"] for a in _attempts(victim_uri)] == [False, True]

    # The other trial was not disturbed: its workers started once, where they started, and never resumed.
    other_lines = [line for _, line in driver.lines if f"(run {other})" in line]
    assert sum(bool(NODES_LINE.search(line)) for line in other_lines) == 1, other_lines
    assert not any(RESUMED_LINE.search(line) for line in other_lines), other_lines
    other_metrics = json.loads(storage.read_text(storage.join(sweep_uri, "trials", other, "result.json")))
    assert [nodes.name_of(n) for n in other_metrics["worker_nodes"]] == [placed[other]]
    assert [h["epoch"] for h in other_metrics["history"]] == [0, 1, 2]
    retry_nodes = [m.group(1) for _, line in driver.lines if (m := NODES_LINE.search(line)) and m.group(2) == victim]
    print(
        f"\n[node loss, tune] detect {detected_s:.1f} s; trial retried {retried_s:.1f} s and resumed "
        f"{resumed_at - killed_at:.1f} s after the kill (on {nodes.name_of(retry_nodes[-1])}, once "
        f"trial {other} had finished there); resumed at epoch {resumed.group(1)}, global step {resumed.group(2)}: "
        f"at most the {STEPS} steps of the interrupted epoch lost; other trial: 1 attempt, undisturbed"
    )
