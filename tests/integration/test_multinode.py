"""The job on a real two-node Ray cluster (two raylets on this machine): placement by resources.

``ray.cluster_utils.Cluster`` starts a head node and a second node, each with its own CPUs and
custom resources; ``ammd run`` connects to it through ``ray.address`` (its driver attaches to
the head's raylet, as under ``ray job submit``). The learner ranks are spread one per node
(STRICT_SPREAD over bundles asking for ``learner_slot``, which each node offers once), so their
DeepSpeed gloo group forms across the two raylets with rank 0's address from ``node_address``;
the rollout actors ask for ``rollout_slot``, which only the second node offers, so they run on
another node than learner rank 0 (placed beside the driver, on the head). The report's
``placement`` must show exactly that, and the job must have trained.

Every port is free-picked (another Ray may run on this machine), the nodes get a fresh temp dir,
token auth is off, and the ``ray_current_cluster`` file the Cluster writes is removed after.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from learner.learner_actor import free_port

# In the extended set (CI runs it), so that make test stays within 20 minutes on 2 cores.
pytestmark = [pytest.mark.slow, pytest.mark.extended]
ROOT = Path(__file__).resolve().parents[2]


def _node_args(num_cpus: int, resources: dict[str, float]) -> dict:
    """A node of ``num_cpus`` CPUs and ``resources``, its agents on free ports (never the defaults)."""
    return {"num_cpus": num_cpus, "resources": resources, "object_store_memory": 200 * 2**20,
            "dashboard_agent_listen_port": free_port(), "metrics_agent_port": free_port(),
            "metrics_export_port": free_port(), "runtime_env_agent_port": free_port()}


@pytest.fixture
def two_nodes():
    """A head (2 CPUs, one learner slot) and a second node (3 CPUs, one learner slot, two
    rollout slots); yields the cluster's GCS address and the two node ids (head first)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray (PLATFORM.md)
    from ray._common.utils import get_ray_address_file
    from ray.cluster_utils import Cluster
    address_file = Path(get_ray_address_file(None))
    had_file = address_file.exists()
    temp_dir = tempfile.mkdtemp(prefix="ray2n_", dir="/tmp")  # short: socket paths have a limit
    head_args = {**_node_args(2, {"learner_slot": 1}), "gcs_server_port": free_port(), "include_dashboard": False,
                 "temp_dir": temp_dir}
    cluster = Cluster(initialize_head=True, head_node_args=head_args)
    try:
        worker = cluster.add_node(**_node_args(3, {"learner_slot": 1, "rollout_slot": 2}))
        cluster.wait_for_nodes()
        yield cluster.address, cluster.head_node.node_id, worker.node_id
    finally:
        cluster.shutdown()
        if not had_file and address_file.exists():  # only the file this cluster wrote
            address_file.unlink()


def test_job_spans_two_nodes_placed_by_resources(toy_world, tmp_path, two_nodes):
    address, head_id, worker_id = two_nodes
    ammd = Path(sys.executable).with_name("ammd")
    cmd = [str(ammd), "run", "configs/local-cpu.yaml", "name=two-nodes", f"output_dir={tmp_path}",
           f"ray.address={address}", "learner.steps=6", "learner.sync_every=3", "learner.save_every=0",
           "data.eval_size=20", "rollout.prompts_per_batch=32", f"status.port={free_port()}",
           "learner.placement_strategy=STRICT_SPREAD", "learner.resources={learner_slot: 1}",
           "rollout.student.resources={rollout_slot: 1}", "rollout.teacher.resources={rollout_slot: 1}"]
    t0 = time.time()
    job = subprocess.run(cmd, cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=600)
    text = job.stdout + job.stderr
    assert job.returncode == 0, text[-4000:]
    assert f"connecting to the Ray cluster at {address}" in text and "placement: " in text

    report = json.loads((tmp_path / "two-nodes" / "report.json").read_text())
    where = {name: p["node_id"] for name, p in report["placement"].items()}
    assert set(where) == {"learner-0", "learner-1", "student-0", "teacher-0", "buffer"}
    # One gloo group over two raylets: rank 0 beside the driver (the head), rank 1 on the other.
    assert where["learner-0"] == head_id and where["learner-1"] == worker_id
    # The rollout actors ran where rollout_slot is: not on learner rank 0's node.
    assert where["student-0"] == where["teacher-0"] == worker_id != where["learner-0"]
    assert all(p["node_ip"] for p in report["placement"].values())
    # It trained: every step done, the weights pushed, a finite loss, on-policy rows made.
    assert report["steps"] == 6 and report["final_weight_version"] == 2
    assert all(math.isfinite(h["loss"]) for h in report["history"]) and len(report["history"]) == 6
    assert report["rows_by_source"]["student"] > 0 and report["rows_by_source"]["teacher"] > 0
    assert "## Placement" in (tmp_path / "two-nodes" / "report.md").read_text()
    print(f"two-node job: {time.time() - t0:.0f} s; {report['placement']}")
