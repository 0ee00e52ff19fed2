"""The Ray engine on a real 2-node cluster (two raylets on loopback, 1 CPU each), joined through
`--address` the way a user joins a running cluster: the local engine's results."""

from __future__ import annotations

import json

import pytest
from dp_fixtures import write_mixed

from data_prep.build import build
from data_prep.cli import main

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized()  # this driver must be free to join the cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_two_node_cluster_end_to_end(cluster, tmp_path) -> None:
    sources = write_mixed(tmp_path / "corpus")
    args = dict(test_fraction=0.2, val_fraction=0.1, seed=3)
    local = tmp_path / "local"
    local_report = build(sources, local, **args)
    out = tmp_path / "ray"
    argv = ["build", *map(str, sources), "--output-dir", str(out), "--engine", "ray", "--address", cluster.address]
    assert main([*argv, "--seed", "3", "--test-fraction", "0.2", "--val-fraction", "0.1"]) == 0
    assert not ray.is_initialized()  # the engine joined the cluster and left it
    report = json.loads((out / "report.json").read_text())
    assert report["engine"]["nodes"] == 2 and report["engine"]["parallelism"] == 2
    assert report["engine"]["nodes_that_read"] == 2  # the pages really were read on both nodes
    for name in ("train", "val", "test", "rejects"):
        manifest = json.loads((out / name / "manifest.json").read_text())
        data = b"".join((out / name / s["file"]).read_bytes() for s in manifest["shards"])
        assert data == (local / f"{name}.jsonl").read_bytes(), name
    for key in ("counts", "dedup", "split", "leakage", "rejects_by_reason", "steps", "lengths"):
        assert report[key] == local_report[key], key
