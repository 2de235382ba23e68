"""The process-images flow on a real local Ray against a real local Prefect server."""

from __future__ import annotations


import pytest
from PIL import Image

from pixelmill.spec import PipelineSpec, StageResources
from tests.corpus import BAD, GOOD, block_the_garden_folder, make_source
from tests.helpers import load_report

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, ray_cluster):
    """One flow run over 3 chunks: resize on CPU, filters tagged with the logical GPU."""
    from flows.process_images import process_images

    source = make_source(tmp_path_factory.mktemp("src"))
    dest = tmp_path_factory.mktemp("dest")
    spec = PipelineSpec(size=(200, 150), filters=("blur", "emboss"))
    state = process_images(
        source=str(source), destination=str(dest), spec=spec, run_name="ray-test",
        chunk_size=3, filter_resources=StageResources(num_cpus=1, num_gpus=1),
        return_state=True,
    )
    return state, dest / "ray-test"


def test_flow_completes_and_writes_every_output(ray_run):
    state, run = ray_run
    assert state.is_completed(), state.message
    report = load_report(run / "report.json")
    assert report["counts"] == {"discovered": 9, "ok": 7, "failed": 2, "skipped": 0}
    by_source = {entry["source"]: entry for entry in report["images"]}
    assert set(by_source) == set(GOOD) | set(BAD)
    for key in GOOD:
        entry = by_source[key]
        assert entry["status"] == "ok"
        assert set(entry["outputs"]) == {"resized", "blur", "emboss"}
        for path in entry["outputs"].values():
            with Image.open(run / path) as image:
                assert image.size == (entry["width"], entry["height"])
                assert image.format == "JPEG"
    # sizes: contain in 200x150, EXIF applied, never upscaled
    assert (by_source["trips/a.jpg"]["width"], by_source["trips/a.jpg"]["height"]) == (200, 150)
    assert (by_source["trips/b.jpg"]["width"], by_source["trips/b.jpg"]["height"]) == (112, 150)
    # stored 480x640 with EXIF 6: upright it is 640x480, so 200x150 (not 112x150)
    rotated = by_source["family/rotated.jpg"]
    assert (rotated["width"], rotated["height"]) == (200, 150)
    assert (by_source["garden/c.jpg"]["width"], by_source["garden/c.jpg"]["height"]) == (200, 133)
    # same file name in two folders: both kept under their sub-paths
    assert (run / "resized/trips/a.jpg").is_file() and (run / "resized/family/a.jpg").is_file()


def test_bad_files_are_reported_not_fatal(ray_run):
    _, run = ray_run
    report = load_report(run / "report.json")
    failed = {e["source"]: e["error"] for e in report["images"] if e["status"] == "failed"}
    assert set(failed) == set(BAD)
    assert "PDF" in failed["garden/fake.jpg"]
    assert "truncated" in failed["broken.jpg"].lower()
    assert not (run / "resized/broken.jpg").exists()
    assert "notes.txt" not in {e["source"] for e in report["images"]}
    gallery = (run / "gallery/index.html").read_text()
    assert "broken.jpg" in gallery and "PDF" in gallery
    assert (run / "gallery/contact-sheet-01.jpg").is_file()


def test_gpu_tagged_stage_ran_with_the_logical_gpu(ray_run):
    _, run = ray_run
    chunks = load_report(run / "report.json")["chunks"]
    assert len(chunks) >= 2
    for chunk in chunks:
        assert chunk["resources"]["filter"].get("GPU") == 1.0, chunk
        assert "GPU" not in chunk["resources"]["resize"], chunk
        assert chunk["resources"]["resize"].get("CPU") == 1.0
        assert set(chunk["nodes"]) == {"resize", "filter"} and all(chunk["nodes"].values())


def test_server_api_shows_the_flow_run_and_its_task_runs(ray_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state, _ = ray_run
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert flow_run.state.is_completed()
    names = {run.name: run.state.type.value for run in task_runs}
    chunks = {f"{n:03d}" for n in range(3)}
    assert {f"resize-chunk-{c}" for c in chunks} <= set(names)
    assert {f"filter-chunk-{c}" for c in chunks} <= set(names)
    assert all(names[f"resize-chunk-{c}"] == "COMPLETED" for c in chunks)
    assert any(name.startswith("discover") for name in names)
    # lineage: each filter chunk's input is its own resize chunk (the UI draws the edge)
    by_id = {run.id: run.name for run in task_runs}
    for run in task_runs:
        if run.name.startswith("filter-chunk-"):
            upstream = {by_id.get(item.id) for item in run.task_inputs["resized"]}
            assert run.name.replace("filter", "resize") in upstream, (run.name, upstream)


def test_a_chunk_that_fails_for_good_fails_only_itself(tmp_path, ray_cluster, monkeypatch):
    """A destination problem in one chunk (a file where its folder must go): that chunk fails
    after its retries, the others finish, and the flow ends Failed with a full report."""
    import flows.process_images as module

    monkeypatch.setattr(module, "resize_chunk",
                        module.resize_chunk.with_options(retries=1, retry_delay_seconds=0))
    source = make_source(tmp_path / "src")
    dest = tmp_path / "dest"
    block_the_garden_folder(dest, "iso")
    state = module.process_images(
        source=str(source), destination=str(dest), spec=PipelineSpec(size=(100, 100)),
        run_name="iso", chunk_size=1, return_state=True,
    )
    assert state.is_failed()
    report = load_report(dest / "iso/report.json")
    by_source = {entry["source"]: entry for entry in report["images"]}
    for key in GOOD:
        if key.startswith("garden/"):
            assert by_source[key]["status"] == "failed"
            assert "chunk" in by_source[key]["error"]
        else:
            assert by_source[key]["status"] == "ok", by_source[key]
            assert (dest / "iso" / by_source[key]["outputs"]["resized"]).is_file()
    failed_chunks = [c for c in report["chunks"] if c["state"] != "Completed"]
    assert len(failed_chunks) == 2  # garden/c.jpg and garden/deep/d.jpg, one image a chunk
