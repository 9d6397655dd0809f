"""A search joins an existing two-node Ray cluster (--address) and its trials run on both nodes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest
import yaml

from tally import results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_search_runs_on_both_nodes_of_a_cluster(tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    from tally.cluster import require_token_auth, token_available

    # the cluster runs with token auth, as every cluster of ours does (tally.cluster). Without it (this
    # test run alone, before any local Ray of the session switched this process to token mode) the
    # cluster calls the driver's own server without a token, the driver refuses, the cluster takes the
    # driver for dead and cancels its trials ("The actor never ran"). The token: the one this machine's
    # local Ray uses, if any (this process may hold a connection to it), else a fresh one.
    if not token_available():
        monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    require_token_auth()
    # head: 1 CPU and the trial drivers' resource; second node: 1 CPU. A 1-CPU trial fits on either,
    # and with two at a time both nodes must take one.
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "resources": {"TRAIN_DRIVER": 2}})
    pids = []
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        pids = [p.process.pid for node in cluster.list_all_nodes()
                for procs in node.all_processes.values() for p in procs]
        spec = {"name": "cluster", "base": {
            "data": {"source": "embedded", "image_size": 32}, "model": {"arch": "resnet10"},
            "method": {"name": "tally"},
            "train": {"epochs": 2, "warmup_epochs": 1, "steps_per_epoch": 4, "batch_size": 16, "lr": 1e-3,
                      "device": "cpu"}},
            "space": {"method.alpha": {"type": "uniform", "low": 0.1, "high": 1.0}},
            "selection": {"metric": "pair_acc_mean"},
            "budget": {"trials": 4, "concurrency": 2}, "resources": {"workers": 1, "cpus_per_worker": 1}}
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        shared = tmp_path / "shared-results"
        proc = subprocess.run([sys.executable, "-m", "tally.cli", "search", str(path), "--address", cluster.address,
                               "--storage", str(shared)], capture_output=True, text=True, timeout=800,
                              env=joining_env())
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = results.summarise(shared / "cluster")
        assert len(summary) == 4 and (summary["status"] == "done").all()
        node_ids = {n.node_id for n in cluster.list_all_nodes()}
        assert set(summary["ray_node_id"]) == node_ids
    finally:
        cluster.shutdown()
    assert pids and not [pid for pid in pids if alive(pid)]


def joining_env() -> dict:
    """The driver joins with a token (tally.cluster requires one): the user's, or a fresh one when this
    machine has none (the test cluster, started by ray.cluster_utils, checks it only in token mode)."""
    from tally.cluster import token_available

    env = dict(os.environ)
    if not token_available():
        env["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    return env


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
