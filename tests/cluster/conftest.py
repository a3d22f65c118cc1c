"""The multi-node harness (tests/multinode.py) as pytest fixtures.

`ray_nodes`: a fresh head (0 CPUs) plus two worker nodes, `worker-a` and `worker-b` (2 CPUs each,
their own resource and label), per test; the S3 store's credentials are in every node's environment.
A test that needs a different head (GCS fault tolerance on Redis) builds a `RayNodes` itself.
"""

from __future__ import annotations

import pytest

from multinode import RayNodes


@pytest.fixture
def ray_nodes(s3_store):
    nodes = RayNodes()
    try:
        nodes.start_head()
        nodes.add_worker("worker-a")
        nodes.add_worker("worker-b")
        yield nodes
    finally:
        nodes.stop()
