"""The multi-node harness itself: a worker whose `ray start` exits before it joins is started again,
as the kubelet restarts a KubeRay worker pod's container (a loaded machine makes `ray start` give up
after its fixed 30 s wait for the raylet to register)."""

from __future__ import annotations

import signal

import pytest

from multinode import RayNodes


@pytest.mark.integration
def test_a_worker_that_exits_before_joining_is_started_again(capsys):
    nodes = RayNodes()
    original = nodes._start
    started = []

    def start_and_lose_the_first(name, args, env, labels):
        node = original(name, args, env, labels)
        started.append(node)
        if len(started) == 1:
            node.kill(signal.SIGKILL)  # this attempt's `ray start` ends before its node joins
        return node

    try:
        nodes.start_head()
        nodes._start = start_and_lose_the_first
        node = nodes.add_worker("worker-a", attempts=2)
        assert len(started) == 2 and node is started[1]
        assert nodes.node_state("worker-a") == "ALIVE"
        assert "worker-a did not join (attempt 1 of 2); starting it again" in capsys.readouterr().out
    finally:
        nodes.stop()


@pytest.mark.integration
def test_a_worker_that_never_joins_fails_naming_every_attempt():
    nodes = RayNodes()
    original = nodes._start

    def start_and_lose(name, args, env, labels):
        node = original(name, args, env, labels)
        if name != "head":
            node.kill(signal.SIGKILL)
        return node

    try:
        nodes.start_head()
        nodes._start = start_and_lose
        with pytest.raises(RuntimeError, match=r"node worker-a did not join in 2 attempts:\n(.|\n)*attempt 2: "):
            nodes.add_worker("worker-a", attempts=2)
    finally:
        nodes.stop()
