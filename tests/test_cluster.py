"""Real Ray clusters of two nodes (two raylets on this machine, one CPU each): local paths
are refused unless said to be shared, a stage asking for more than any one node has is
refused up front instead of waiting forever, and a cluster started with `ray start` (a head
and a second node with a resource label of its own) runs a run's chunks on both nodes with
source and destination in a bucket."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.helpers import load_report, load_report_blob
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


NODES = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(json.dumps({node["NodeID"]: node["Resources"] for node in ray.nodes() if node["Alive"]}))
"""


def _cluster_nodes(address: str, env: dict[str, str]) -> dict[str, dict[str, float]]:
    result = subprocess.run([sys.executable, "-c", NODES, address], capture_output=True,
                            text=True, env=env, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ray_start_cluster(prefect_api, gcs_server, tmp_path_factory):
    """A head and a second node, each `ray start --block` with one CPU, the second labelled
    with a `second_node` resource; token authentication with a token of the test's own.
    Ray 2.60 gives a cluster of several nodes the machine's own address, not loopback (its
    single-machine mode, which keeps to 127.0.0.1, refuses a second node)."""
    from ray.util import get_node_ip_address

    from cli.server import free_port, start_detached, stop_pid

    base = tmp_path_factory.mktemp("raystart")
    token = base / "token"
    token.write_text("pixelmill-test-" + os.urandom(16).hex())
    ray_tmp = tempfile.mkdtemp(prefix="pmrs-", dir="/tmp")  # short: unix socket paths
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_TMPDIR=ray_tmp)
    port = free_port()
    address = f"{get_node_ip_address()}:{port}"
    ray = str(Path(sys.executable).with_name("ray"))
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats",
              "--dashboard-agent-listen-port", "0"]

    def started(log: Path):
        return lambda pid: "Ray runtime started" in log.read_text(errors="replace")

    pids = []
    try:
        pids.append(start_detached(
            [ray, "start", "--head", "--port", str(port), "--temp-dir", ray_tmp,
             "--ray-client-server-port", str(free_port()), "--include-dashboard=false",
             *common], env, base / "head.log", started(base / "head.log"), 120, "ray head"))
        pids.append(start_detached(
            [ray, "start", "--address", address, "--resources", '{"second_node": 1}', *common],
            env, base / "second.log", started(base / "second.log"), 120, "ray second node"))
        nodes = _cluster_nodes(address, env)
        assert len(nodes) == 2, nodes
        yield address, env, nodes
    finally:
        for pid in reversed(pids):
            stop_pid(pid, timeout=10)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_a_runs_chunks_run_on_both_nodes_of_a_cluster_and_its_outputs_are_whole(
        ray_start_cluster, gcs):
    address, env, nodes = ray_start_cluster
    [second] = [node for node, resources in nodes.items() if "second_node" in resources]
    src, dst = gcs.bucket(gcs.unique("mnsrc")), gcs.bucket(gcs.unique("mndst"))
    names = [f"in/p{number:02d}.jpg" for number in range(12)]
    for number, name in enumerate(names):
        buffer = io.BytesIO()
        Image.new("RGB", (160, 120), (20 * number, 90, 200)).save(buffer, "JPEG")
        src.blob(name).upload_from_string(buffer.getvalue(), content_type="image/jpeg")

    result = subprocess.run(
        [PIXELMILL, "run", f"gs://{src.name}/in", f"gs://{dst.name}/out", "--size", "64x48",
         "--filter", "blur", "--chunk-size", "1", "--run-name", "mn", "--ray-address", address],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "runner: ray" in result.stdout, result.stdout

    report = load_report_blob(dst, "out/mn/report.json")
    assert report["counts"] == {"discovered": 12, "ok": 12, "failed": 0, "skipped": 0}
    held = {blob.name for blob in dst.list_blobs(prefix="out/mn/")}
    for image in report["images"]:
        assert set(image["outputs"]) == {"resized", "blur"}
        assert {f"out/mn/{path}" for path in image["outputs"].values()} <= held, image
    # every chunk says where each stage ran; between them the chunks used both nodes
    assert len(report["chunks"]) == 12
    ran_on = [set(chunk["nodes"].values()) for chunk in report["chunks"]]
    assert set().union(*ran_on) == set(nodes), (ran_on, nodes)
    assert any(second in stages for stages in ran_on)
