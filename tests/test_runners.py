"""The same flow checks on every runner `--runner` offers, and how `auto` chooses.

Chunks, lineage, artifacts, retries, the report and the kept outputs of a second run must not
depend on where the tasks ran. Ray's own run is in test_flow_ray.py (GPU-tagged stages);
here Ray comes in through `auto` past its crossover."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from prefect.task_runners import ThreadPoolTaskRunner

from pixelmill.spec import PipelineSpec
from tests.corpus import BAD, GOOD, block_the_garden_folder, make_source
from tests.helpers import load_report

pytestmark = pytest.mark.slow

SPEC = PipelineSpec(size=(120, 90), filters=("blur",))


def _runner(name: str):
    from flows.runners import AutoTaskRunner
    from flows.process_images import make_task_runner

    if name == "auto-ray":  # past a crossover of 0 images, auto takes Ray
        return AutoTaskRunner(lambda: make_task_runner("ray"), crossover=0)
    return make_task_runner(name)


@pytest.fixture(scope="module", params=["threads", "processes", "sequential", "auto",
                                        "auto-ray"])
def runner_run(request, tmp_path_factory, prefect_api):
    """One flow run over 3 chunks on the runner, then the same run again."""
    from flows.process_images import process_images

    if request.param == "auto-ray":
        request.getfixturevalue("ray_cluster")
    source = make_source(tmp_path_factory.mktemp("src"))
    dest = tmp_path_factory.mktemp("dest")
    flow = process_images.with_options(task_runner=_runner(request.param))
    run = dest / "r"
    states, reports = [], []
    for _ in range(2):
        states.append(flow(source=str(source), destination=str(dest), spec=SPEC, run_name="r",
                           chunk_size=3, return_state=True))
        reports.append(load_report(run / "report.json"))
    return request.param, states, reports, run


def test_every_output_and_the_report(runner_run):
    name, (first, _), (on_disk, _), run = runner_run
    assert first.is_completed(), first.message
    report = first.result()
    assert report.counts.model_dump() == {"discovered": 9, "ok": 7, "failed": 2, "skipped": 0}
    expected = {"auto": "threads", "auto-ray": "ray"}.get(name, name)
    assert report.runner.name == expected
    assert report.runner.reason.startswith("auto: ") == name.startswith("auto")
    assert on_disk["counts"] == {"discovered": 9, "ok": 7, "failed": 2, "skipped": 0}
    assert on_disk["runner"]["name"] == expected
    assert len(report.chunks) == 3 and all(c.state == "Completed" for c in report.chunks)
    # the Ray node of each stage, on Ray only
    assert all(bool(chunk.get("nodes")) == (expected == "ray") for chunk in on_disk["chunks"])
    for image in report.images:
        if image.source in GOOD:
            assert set(image.outputs) == {"resized", "blur"}
            with Image.open(run / image.outputs["blur"]) as made:
                assert made.size == (image.width, image.height)
        else:
            assert image.source in BAD and image.status == "failed"


def test_a_second_run_keeps_everything(runner_run):
    _, (_, second), (_, on_disk), run = runner_run
    assert second.is_completed(), second.message
    # the two failed images are tried again (in one chunk); the seven made are kept
    assert on_disk["counts"] == {"discovered": 9, "ok": 0, "failed": 2, "skipped": 7}
    assert sum(chunk["images"] for chunk in on_disk["chunks"]) == 2
    assert "Images (7)" in (run / "gallery/index.html").read_text()


def test_task_runs_lineage_and_artifacts_in_the_api(runner_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId,
    )

    _, (first, _), _, _ = runner_run
    flow_run_id = first.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    names = {run.name: run.state.type.value for run in task_runs}
    for stage in ("resize", "filter"):
        for number in range(3):
            assert names.get(f"{stage}-chunk-{number:03d}") == "COMPLETED", names
    by_id = {run.id: run.name for run in task_runs}
    for run in task_runs:
        if run.name.startswith("filter-chunk-"):
            upstream = {by_id.get(item.id) for item in run.task_inputs["resized"]}
            assert run.name.replace("filter", "resize") in upstream
    by_type = {artifact.type: artifact for artifact in artifacts}
    assert float(by_type["progress"].data) == 100.0
    assert "**7 made**, **2 failed**" in by_type["markdown"].data
    assert f"- runner: {first.result().runner.name}" in by_type["markdown"].data
    assert len(json.loads(by_type["table"].data)) == 2


@pytest.mark.parametrize("name", ["threads", "processes", "auto"])
def test_a_chunk_that_fails_for_good_is_retried_then_fails_only_itself(name, tmp_path,
                                                                       prefect_api, monkeypatch):
    """A file where a chunk's output folder must go: its task is retried (2 attempts), then
    that chunk alone fails; the flow ends Failed with the other images made."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    import flows.process_images as module

    monkeypatch.setattr(module, "resize_chunk",
                        module.resize_chunk.with_options(retries=1, retry_delay_seconds=0))
    source = make_source(tmp_path / "src")
    dest = tmp_path / "dest"
    block_the_garden_folder(dest, "iso")
    state = module.process_images.with_options(task_runner=_runner(name))(
        source=str(source), destination=str(dest), spec=PipelineSpec(size=(100, 100)),
        run_name="iso", chunk_size=1, return_state=True)
    assert state.is_failed()
    report = load_report(dest / "iso/report.json")
    status = {entry["source"]: entry["status"] for entry in report["images"]}
    assert {key for key, value in status.items() if value == "failed"} == (
        {"garden/c.jpg", "garden/deep/d.jpg"} | set(BAD))
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    failed = [run for run in task_runs if run.state.is_failed()]
    assert len(failed) == 2 and all(run.run_count == 2 for run in failed), [
        (run.name, run.run_count) for run in failed]


class _Marked(ThreadPoolTaskRunner):
    """Stands in for the Ray runner in the choice tests: no Ray is started to test a choice."""


@pytest.mark.parametrize(("images", "needs_ray", "expected", "reason"), [
    (0, None, "threads", "0 images to make on one machine, where threads are faster below 20"),
    (19, None, "threads", "19 images to make on one machine"),
    (20, None, "processes", "20 images to make on one machine, where a process per core is "
                            "faster than threads from 20"),
    (50, None, "processes", "50 images to make on one machine"),
    (51, None, "ray", "51 images to make, more than the 50"),
    (1, "the filter stage asks for GPUs", "ray", "the filter stage asks for GPUs"),
])
def test_auto_chooses_by_images_to_make_and_by_gpus(images, needs_ray, expected, reason):
    from flows.runners import AutoTaskRunner, runner_name

    made = []
    auto = AutoTaskRunner(lambda: made.append(_Marked(1)) or made[-1], crossover=50,
                          processes_from=20)
    with auto.duplicate() as runner:
        chosen = runner.choose(images, needs_ray)
        assert isinstance(chosen, _Marked) == (expected == "ray")
        assert expected == "ray" or runner_name(runner) == expected
        assert chosen._started and runner.reason.startswith(reason)
        assert runner.choose(10**6) is chosen  # the first choice stands
    assert not chosen._started  # leaving the auto runner stops the one it chose
    assert len(made) == (expected == "ray")


def test_auto_takes_ray_for_a_stage_that_asks_for_gpus(tmp_path, ray_cluster):
    """A GPU stage goes to Ray whatever the batch size (threads have no GPU to give), and
    its chunks ran with the (logical) GPU Ray assigned."""
    from flows.process_images import make_task_runner, process_images
    from pixelmill.spec import StageResources

    source = make_source(tmp_path / "src")
    state = process_images.with_options(task_runner=make_task_runner("auto"))(
        source=str(source), destination=str(tmp_path / "dest"), spec=SPEC, run_name="gpu",
        chunk_size=5, filter_resources=StageResources(num_cpus=1, num_gpus=1),
        return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert report.runner.name == "ray"
    assert report.runner.reason == "auto: the filter stage asks for GPUs"
    assert all(chunk.resources["filter"].get("GPU") == 1.0 for chunk in report.chunks)
