"""A real Ray cluster of two nodes (two raylets on this machine, one CPU each): local paths
are refused unless said to be shared, and a stage asking for more than any one node has is
refused up front instead of waiting forever."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.helpers import load_report
from tests.test_cli import PIXELMILL

pytestmark = pytest.mark.slow

CLUSTER = """
import sys
from ray.cluster_utils import Cluster
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1,
                                                        "include_dashboard": False})
cluster.add_node(num_cpus=1)
print(cluster.address, flush=True)
sys.stdin.read()  # until the test closes it
cluster.shutdown()
"""

ASK_TWO_CPUS = """
import sys
from flows.process_images import make_task_runner, process_images
from pixelmill.spec import StageResources
flow = process_images.with_options(task_runner=make_task_runner("ray", sys.argv[1]))
state = flow(source="gs://a/in", destination="gs://b/out", run_name="x",
             resize_resources=StageResources(num_cpus=2), return_state=True)
print(state.name, "|", state.message)
"""


@pytest.fixture(scope="module")
def two_nodes(prefect_api):
    # Ray's session files go to a short folder of the test's own (unix socket paths have a
    # length limit), never the machine's /tmp/ray: this cluster must not become the default.
    ray_tmp = tempfile.mkdtemp(prefix="pmray-", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen([sys.executable, "-c", CLUSTER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    address = process.stdout.readline().strip()
    try:
        assert address, "the two-node cluster did not start"
        yield address, env
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def photos(folder: Path) -> Path:
    folder.mkdir()
    for number in range(3):
        Image.new("RGB", (160, 120), (80 * number, 40, 200)).save(folder / f"{number}.jpg")
    return folder


def test_local_paths_on_a_cluster_of_two_nodes_are_refused_unless_shared(tmp_path, two_nodes):
    address, env = two_nodes
    source = photos(tmp_path / "src")
    command = [PIXELMILL, "run", str(source), str(tmp_path / "dst"), "--size", "64x48",
               "--ray-address", address, "--run-name", "c"]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert (f"SOURCE {source} is a local folder but the Ray cluster has 2 nodes"
            in refused.stderr), refused.stderr
    assert "--shared-filesystem" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "dst").exists()  # nothing written

    # both nodes are this machine, so the folder *is* shared: said so, the run works
    shared = subprocess.run([*command, "--shared-filesystem"], capture_output=True, text=True,
                            env=env, timeout=300)
    assert shared.returncode == 0, shared.stdout[-2000:] + shared.stderr[-2000:]
    report = load_report(tmp_path / "dst/c/report.json")
    assert report["counts"]["ok"] == 3


def test_a_stage_asking_more_than_any_one_node_has_is_refused(two_nodes):
    address, env = two_nodes
    # two CPUs in the cluster, but one per node: Ray would wait forever for a 2-CPU slot
    result = subprocess.run([sys.executable, "-c", ASK_TWO_CPUS, address], capture_output=True,
                            text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert ("Failed | the resize stage asks for 2 CPU per chunk but no node of the cluster has "
            "more than 1 (2 node(s))") in result.stdout, result.stdout + result.stderr[-2000:]
