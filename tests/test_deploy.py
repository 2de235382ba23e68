"""Deployments end to end: prefect.yaml, a process work pool, a worker, the UI's Retry."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
NIGHTLY = {"PIXELMILL_NIGHTLY_SOURCE": "gs://nightly-in/photos",
           "PIXELMILL_NIGHTLY_DESTINATION": "gs://nightly-out"}


def readme_deploy_commands() -> list[str]:
    """The bash block of the README's "Deploy it" section, line by line."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Deploy it", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def sh(command: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def error_logs(flow_run_id) -> str:
    """The warning and error logs of a flow run, for assertion messages."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterLevel

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]), level=LogFilterLevel(ge_=30)))
    return "\n".join(log.message[:800] for log in logs[:6])


def upload_demo_photos(bucket, prefix: str) -> int:
    import tempfile

    from pixelmill.samples import write_demo_set

    with tempfile.TemporaryDirectory() as folder:
        paths = write_demo_set(Path(folder))
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: bucket.blob(f"{prefix}{p.relative_to(folder).as_posix()}")
                          .upload_from_filename(str(p)), paths))
    return len(paths)


@pytest.fixture(scope="module")
def worker_env(prefect_api, ray_cluster, gcs_server):
    """The environment a user's shell and worker would have: the API, the GCS endpoint and
    the Ray cluster (this session's) so flow runs started by the worker share the 2 cores."""
    import ray

    env = {**os.environ, **NIGHTLY, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return env


@contextlib.contextmanager
def port_taken(port: int):
    """Another program listens on `port` meanwhile (it may already: then that one does)."""
    with socket.socket() as sock:
        # a server stopped earlier in the session leaves the port in TIME_WAIT: bind anyway
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            pass  # taken already
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # something does listen there
        yield


@pytest.fixture(scope="module")
def deployed(worker_env, gcs_server):
    from pixelmill.gcs import default_client

    client = default_client(os.environ["STORAGE_EMULATOR_HOST"])
    for name in ("in", "out"):
        client.create_bucket(name)
    images = upload_demo_photos(client.bucket("in"), "photos/")
    commands = readme_deploy_commands()
    assert commands[0].startswith('eval "$(.venv/bin/pixelmill server start')
    assert [c.split()[0:3] for c in commands][1:3] == [
        [".venv/bin/python", "-m", "deployments.setup"], [".venv/bin/prefect", "--no-prompt", "deploy"]]
    # A fresh shell: no PREFECT_API_URL; pixelmill's server is the session's (started by
    # pixelmill under this home), so the first line finds it and exports its URL.
    shell = {key: value for key, value in worker_env.items() if key != "PREFECT_API_URL"}
    shell["PIXELMILL_HOME"] = str(Path(os.environ["PIXELMILL_HOME"]) / "server")
    with port_taken(4200):
        output = sh("set -e\n" + "\n".join(commands) + '\necho "API=$PREFECT_API_URL"', shell)
    assert f"API={os.environ['PREFECT_API_URL']}" in output.stdout
    flow_run_id = re.search(r"Created flow run .*?UUID: ([0-9a-f-]{36})", output.stdout, re.S)
    assert flow_run_id, output.stdout[-3000:]
    return {"flow_run_id": flow_run_id[1], "images": images, "client": client}


def test_readme_deploy_commands_run_the_adhoc_deployment(deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(deployed["flow_run_id"])
    reports = [b for b in deployed["client"].list_blobs("out") if b.name.endswith("report.json")]
    chunks = json.loads(reports[0].download_as_bytes())["chunks"] if reports else []
    assert flow_run.state.is_completed(), [c.get("error") for c in chunks][:2]
    resized = [b.name for b in deployed["client"].list_blobs("out") if "/resized/" in b.name]
    assert len(resized) == deployed["images"]
    assert all(re.fullmatch(r"\d{8}T\d{4}Z/resized/photos/.+", name) for name in resized)


def test_artifacts_show_progress_summary_and_failures(deployed):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[deployed["flow_run_id"]])))
    by_type = {artifact.type: artifact for artifact in artifacts}
    assert float(by_type["progress"].data) == 100.0
    assert re.fullmatch(r"share of the \d+ chunks done \(\d+ images to make, \d+ kept\)",
                        by_type["progress"].description), by_type["progress"].description
    summary = by_type["markdown"].data
    assert f"**{deployed['images']} made**, **0 failed**" in summary
    # a bucket on the emulator: the command that serves the gallery, not a link that fails
    assert "images/s" in summary and "`pixelmill gallery gs://out/" in summary
    assert "](http" not in summary
    assert json.loads(by_type["table"].data) == []  # no failures in this run


def test_nightly_deployment_has_its_cron_schedule(deployed):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name("process-images/nightly-thumbnails")
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "UTC"
    assert schedule.active
    assert nightly.parameters["source"] == NIGHTLY["PIXELMILL_NIGHTLY_SOURCE"]
    assert nightly.parameters["spec"]["size"] == [100, 100]
    assert nightly.work_pool_name == "pixelmill-process"
    assert re.fullmatch(r"[0-9a-f]{7,}", nightly.version or "")  # the git SHA


def test_nightly_schedule_is_paused_when_deployed_without_its_paths(deployed, worker_env):
    from prefect.client.orchestration import get_client

    def nightly_after_deploy(env: dict[str, str]):
        sh(".venv/bin/prefect --no-prompt deploy --name nightly-thumbnails", env)
        with get_client(sync_client=True) as client:
            return client.read_deployment_by_name("process-images/nightly-thumbnails")

    unset = {key: value for key, value in worker_env.items() if key not in NIGHTLY}
    paused = nightly_after_deploy(unset)
    assert [schedule.active for schedule in paused.schedules] == [False]
    assert paused.parameters["source"] == ""
    active = nightly_after_deploy(worker_env)  # both set again: the schedule is switched on
    assert [schedule.active for schedule in active.schedules] == [True]
    assert active.parameters["source"] == NIGHTLY["PIXELMILL_NIGHTLY_SOURCE"]


def test_setup_with_an_api_that_does_not_answer_says_so_in_one_line(worker_env):
    env = {**worker_env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    result = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "deployments.setup", "pools"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "http://127.0.0.1:9/api (PREFECT_API_URL) does not answer" in lines[0]


def test_retry_from_the_ui_redoes_only_the_failed_chunk(deployed, worker_env, gcs_server):
    """One chunk fails for good (403 on one output), the user fixes it and presses Retry:
    the same flow run runs again and makes only what the bucket lacks: that chunk's images."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    gcs_server.forbidden_objects = {"retry-1/resized/photos/logo-with-alpha.jpg"}
    with get_client(sync_client=True) as client:
        adhoc = client.read_deployment_by_name("process-images/adhoc")
        flow_run = client.create_flow_run_from_deployment(adhoc.id, parameters={
            "source": "gs://in/photos", "destination": "gs://out", "run_name": "retry-1",
            "chunk_size": 3, "spec": {"size": [120, 90], "filters": ["blur"]}})
    worker = "prefect worker start --pool pixelmill-process --run-once"
    sh(f".venv/bin/{worker}", worker_env)
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run.id).state.is_failed()
    gcs_server.forbidden_objects = set()  # the permission problem is fixed ...
    # ... and the user presses Retry: the very request the Prefect UI sends
    reply = httpx.post(f"{os.environ['PREFECT_API_URL']}/flow_runs/{flow_run.id}/set_state",
                       json={"state": {"type": "SCHEDULED", "name": "AwaitingRetry",
                                       "message": "Retry from the UI"}, "force": True})
    assert reply.status_code in (200, 201), reply.text
    sh(f".venv/bin/{worker}", worker_env)
    with get_client(sync_client=True) as client:
        final = client.read_flow_run(flow_run.id)
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_run.id])))
    assert final.state.is_completed(), final.state
    assert final.run_count == 2
    second = {run.name: run.state.name for run in task_runs
              if run.flow_run_run_count == 2 and "chunk" in run.name}
    # the other 7 chunks' outputs are in the bucket, so only the failed chunk's 3 images
    # make up the retried run's one chunk
    assert second == {"resize-chunk-000": "Completed", "filter-chunk-000": "Completed"}, second
    report = json.loads(deployed["client"].bucket("out").blob("retry-1/report.json")
                        .download_as_bytes())
    # the retried chunk's 3 images were made now; the others were reused (skipped)
    assert report["counts"]["ok"] == 3
    assert report["counts"]["skipped"] == deployed["images"] - 3
    assert report["counts"]["failed"] == 0


def test_a_big_run_from_a_deployment_starts_its_parts_as_deployment_runs(deployed, worker_env):
    """More images to make than the part size: each group of parts is a flow run of the
    process-images-part/parts deployment, taken by the pool's worker alongside the others;
    the run waits for them, then writes one report and one gallery from their records."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        adhoc = client.read_deployment_by_name("process-images/adhoc")
        parts = client.read_deployment_by_name("process-images-part/parts")
        flow_run = client.create_flow_run_from_deployment(adhoc.id, parameters={
            "source": "gs://in/photos", "destination": "gs://out", "run_name": "fan",
            "part_size": 4, "part_deployment": "process-images-part/parts",
            "spec": {"size": [64, 48]}})
    env = {**worker_env, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    worker = subprocess.Popen([".venv/bin/prefect", "worker", "start", "--pool",
                               "pixelmill-process"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with get_client(sync_client=True) as client:
            for _ in range(300):
                final = client.read_flow_run(flow_run.id)
                if final.state.is_final():
                    break
                time.sleep(1)
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    assert final.state.is_completed(), (final.state, error_logs(flow_run.id))
    images = deployed["images"]
    groups = -(-images // 4)
    assert len(children) >= 2 and len(children) <= groups, [c.name for c in children]
    assert {child.deployment_id for child in children} == {parts.id}
    assert all(child.state.is_completed() for child in children), [c.state for c in children]
    assert sorted(child.name for child in children)[0] == "fan-part-0001"
    # one worker took them side by side: their run times overlap
    spans = sorted((child.start_time, child.end_time) for child in children)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans
    bucket = deployed["client"].bucket("out")
    report = json.loads(bucket.blob("fan/report.json").download_as_bytes())
    assert report["counts"] == {"discovered": images, "ok": images, "failed": 0,
                                "skipped": 0}, report["counts"]
    assert report["runner"]["name"] == "deployment" and report["parts"] >= 2
    names = [blob.name for blob in bucket.list_blobs(prefix="fan/")]
    assert len([name for name in names if name.startswith("fan/resized/")]) == images
    assert "fan/gallery/index.html" in names
    assert not [name for name in names if "/.pixelmill-plan/" in name], names


def test_variants_are_generated_from_prefect_yaml(prefect_api):
    result = subprocess.run([str(ROOT / ".venv/bin/python"), "-m", "deployments.render",
                             "--check"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_cloud_run_variant_deploys_to_a_cloud_run_v2_pool(worker_env):
    env = {**worker_env, "PIXELMILL_IMAGE": "registry.example/pixelmill:test"}
    sh(".venv/bin/python -m deployments.setup pools --docker --cloud-run", env)
    blocks = sh(".venv/bin/python -m deployments.setup blocks --results-bucket results", env)
    assert "gcp-credentials/pixelmill-gcp saved" in blocks.stdout
    assert "gcs-bucket/pixelmill-results saved (bucket results)" in blocks.stdout
    sh(".venv/bin/prefect --no-prompt deploy --all --prefect-file "
       "deployments/cloud-run.prefect.yaml", env)
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("pixelmill-cloud-run")
        docker = client.read_work_pool("pixelmill-docker")
        deployment = client.read_deployment_by_name("process-images/adhoc")
    assert pool.type == "cloud-run-v2" and docker.type == "docker"
    assert deployment.work_pool_name == "pixelmill-cloud-run"
    assert deployment.job_variables["image"] == "registry.example/pixelmill:test"
    assert "credentials" in deployment.job_variables  # the block reference, resolved
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
