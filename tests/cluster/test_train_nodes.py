"""`medfusion train` across real Ray nodes (tests/multinode.py) when a node is lost.

Two workers are placed one per worker node (placement_strategy=STRICT_SPREAD; the head has no CPUs),
streaming the dataset from the local S3 store. The node under rank 1 is killed (SIGKILL to its raylet,
object store and workers) in the second epoch, after the first epoch's checkpoint is committed:

- a replacement node joins, and the run resumes from that checkpoint on it and finishes;
- no node comes back, and the run fails after worker_wait_s with a message that names the lost node
  and the resources it waited for, instead of waiting forever (Ray Train's default).

Every wait is on observable state (the driver's output lines, node states from the State API,
checkpoint files), bounded. The figures (time to detect the lost node, time to resume, steps lost)
are printed; `pytest -s` shows them.
"""

from __future__ import annotations

import json
import re
import time

import pytest

from medfusion import storage
from multinode import Driver

pytestmark = pytest.mark.integration

SAMPLES, IMAGE = 320, 32
STEP_LINE = re.compile(r"\[medfusion\] epoch (\d+) step (\d+) ")
RESUMED_LINE = re.compile(r"\[medfusion\] rank 0: resumed at epoch (\d+), global step (\d+)")
NODES_LINE = re.compile(r"\[medfusion\] workers on nodes: (.*)")


@pytest.fixture(scope="module")
def node_dataset(s3_store, synthetic_dataset):
    return synthetic_dataset(f"s3://{s3_store.state().bucket}/cluster-tests/data", SAMPLES, IMAGE)


def _train(ray_nodes, dataset_uri: str, storage_uri: str, name: str, *extra: str) -> Driver:
    command = [
        "train",
        "--preset=tiny",
        f"--data={dataset_uri}",
        f"storage_uri={storage_uri}",
        f"name={name}",
        f"data.image_size={IMAGE}",
        "data.batch_size=4",
        "epochs=3",
        "num_workers=2",
        "cpus_per_worker=1",
        "placement_strategy=STRICT_SPREAD",
        "strategy=deepspeed",
        "zero_stage=2",
        "warmup_steps=2",
        "shuffle_buffer=0",
        "log_every_steps=1",
        "max_steps_per_epoch=8",
        "evaluate=false",
        "patience=0",
        *extra,
    ]
    return ray_nodes.run_driver(command)


def _placement(ray_nodes, driver: Driver, after: float = 0.0) -> list[str]:
    """Harness names of the nodes under rank 0, 1, ... from the driver's 'workers on nodes' line."""
    _, match = driver.wait_line(NODES_LINE, "the workers start", 180, after)
    node_ids = re.findall(r"rank \d+ ([0-9a-f]+)", match.group(1))
    return [ray_nodes.name_of(node_id) for node_id in node_ids]


def _lose_rank1_node_in_epoch_1(ray_nodes, driver: Driver, run_uri: str) -> tuple[str, float, int]:
    """Kill the node under rank 1 once epoch 0's checkpoint is committed and epoch 1 has stepped.

    Returns:
        The lost node's name, the kill time and the last global step printed before the kill.
    """
    placement = _placement(ray_nodes, driver)
    assert sorted(placement) == ["worker-a", "worker-b"], f"one worker per worker node, got {placement}"
    _, step = driver.wait_line(re.compile(r"\[medfusion\] epoch 1 step (\d+) \((\d+)/"), "epoch 1 steps", 300)
    assert storage.exists(storage.join(run_uri, "checkpoint_epoch0000", "train_state.json"))
    lost = placement[1]
    killed_at = ray_nodes.kill(lost)
    last_step = max(
        int(m.group(2)) for stamp, line in driver.lines if stamp <= killed_at and (m := STEP_LINE.search(line))
    )
    return lost, killed_at, last_step


def test_a_lost_node_resumes_from_the_checkpoint_on_its_replacement(ray_nodes, node_dataset, s3_prefix):
    name = "lose-a-node"
    run_uri = f"{s3_prefix}/{name}"
    driver = _train(ray_nodes, node_dataset, s3_prefix, name, "max_failures=2", "worker_wait_s=120")
    lost, killed_at, last_step = _lose_rank1_node_in_epoch_1(ray_nodes, driver, run_uri)

    ray_nodes.wait_for(lambda: ray_nodes.node_state(lost) == "DEAD", f"{lost} seen dead", 60)
    detected_s = time.monotonic() - killed_at
    ray_nodes.add_worker("worker-c")
    resumed_at, resumed = driver.wait_line(RESUMED_LINE, "the run resumes", 300, after=killed_at)
    assert int(resumed.group(1)) == 1, "resumes at epoch 1, from epoch 0's checkpoint"
    resumed_step = int(resumed.group(2))
    placement = _placement(ray_nodes, driver, after=killed_at)
    assert sorted(placement) == sorted({"worker-a", "worker-b", "worker-c"} - {lost}), placement

    assert driver.finish(600) == 0, driver.tail()
    result = json.loads(storage.read_text(storage.join(run_uri, "result.json")))
    assert result["epochs_run"] == 3 and len(result["history"]) == 3
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2], "no epoch lost or repeated in the history"
    assert {ray_nodes.name_of(n) for n in result["worker_nodes"]} == set(placement)
    print(
        f"\n[node loss, train] detect {detected_s:.1f} s; resume {resumed_at - killed_at:.1f} s after the kill "
        f"(replacement joined after detection); steps lost {last_step - resumed_step} "
        f"(last step {last_step}, resumed at {resumed_step})"
    )


def test_without_a_replacement_the_run_fails_naming_the_lost_node(ray_nodes, node_dataset, s3_prefix):
    name = "no-replacement"
    driver = _train(ray_nodes, node_dataset, s3_prefix, name, "max_failures=2", "worker_wait_s=15")
    lost, killed_at, _ = _lose_rank1_node_in_epoch_1(ray_nodes, driver, f"{s3_prefix}/{name}")
    lost_ids = ray_nodes.node_ids(lost)

    assert driver.finish(240) != 0
    failed_s = time.monotonic() - killed_at
    out = driver.tail(200)
    assert "worker_wait_s=15 s" in out and "2 workers x {'CPU': 1.0} with placement_strategy=STRICT_SPREAD" in out, out
    lost_lines = [line for line in out.splitlines() if "lost node:" in line]
    assert lost_lines and any(node_id in lost_lines[0] for node_id in lost_ids), out
    assert f"medfusion.io/node={lost}" in lost_lines[0] and "'CPU': 2.0" in lost_lines[0], lost_lines
    print(f"\n[node loss, train, no replacement] the run failed {failed_s:.1f} s after the kill:\n{lost_lines[0]}")
