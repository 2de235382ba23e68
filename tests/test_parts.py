"""A run planned in parts (more images than `part_size`): each part with images to make is its
own child flow run of a few task runs on the parent's runner; the parent writes one
images.jsonl, one report and one paged gallery; a re-run with a few images to make makes them
in the run's own flow run, and keeps everything else; a chunk that fails for good fails only
its own images."""

from __future__ import annotations

import itertools

import pytest
from PIL import Image

from pixelmill.spec import PipelineSpec
from tests.helpers import encode, load_report

pytestmark = pytest.mark.slow

SPEC = PipelineSpec(size=(16, 12), filters=("blur",))
PART_SIZE = 250
IMAGES = 620  # 3 parts; 620 shown images: a gallery of two pages (500 + 120)


def _source(folder):
    for number, name in zip(range(IMAGES), itertools.cycle(["a", "b", "c", "d"])):
        path = folder / name / f"p{number:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(Image.new("RGB", (24, 18), (number % 250, 80, 160)), "jpeg"))
    (folder / "c" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _flow_runs(parent_id):
    """The child flow runs of a flow run, with the names and states of their task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
        tasks = {child.name: client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[child.id]))) for child in children}
        own = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[parent_id])))
    return children, tasks, own


@pytest.fixture(scope="module")
def parted(tmp_path_factory, prefect_api):
    from flows.process_images import make_task_runner, process_images

    source = _source(tmp_path_factory.mktemp("src"))
    dest = tmp_path_factory.mktemp("dest")
    flow = process_images.with_options(task_runner=make_task_runner("threads"))

    def run():
        return flow(source=str(source), destination=str(dest), spec=SPEC, run_name="big",
                    part_size=PART_SIZE, return_state=True)

    first = run()
    first_report = load_report(dest / "big/report.json")
    second = run()
    page_mtime = (dest / "big/gallery/page-001.html").stat().st_mtime_ns
    return {"source": source, "dest": dest, "run": run, "first": first, "second": second,
            "first_report": first_report, "page_mtime": page_mtime}


def test_each_part_is_a_child_flow_run_of_few_task_runs(parted):
    first = parted["first"]
    assert first.is_completed(), first.message
    children, tasks, own = _flow_runs(first.state_details.flow_run_id)
    assert sorted(child.name for child in children) == [
        "big-part-0001", "big-part-0002", "big-part-0003"]
    assert all(child.state.is_completed() for child in children)
    for name, runs in tasks.items():
        names = {run.name for run in runs}
        assert names and all(n.startswith(("resize-chunk-", "filter-chunk-")) for n in names)
        assert len(runs) <= 300 and all(run.state.is_completed() for run in runs), name
    # the parent itself runs discovery and the gallery, and no chunk
    assert not any(run.name.startswith(("resize-chunk", "filter-chunk")) for run in own)
    made = sum(run.name.startswith("resize-chunk") for runs in tasks.values() for run in runs)
    assert made == sum(1 for chunk in parted["first_report"]["chunks"])


def test_one_report_one_images_file_and_every_output(parted):
    report, dest = parted["first_report"], parted["dest"]
    assert report["parts"] == 3
    assert report["counts"] == {"discovered": IMAGES + 1, "ok": IMAGES, "failed": 1,
                                "skipped": 0}
    assert [entry["source"] for entry in report["failures"]] == ["c/broken.jpg"]
    assert {chunk["part"] for chunk in report["chunks"]} == {1, 2, 3}
    for entry in report["images"]:
        if entry["status"] == "ok":
            for path in entry["outputs"].values():
                assert (dest / "big" / path).is_file(), path
    assert not list((dest / "big").glob(".pixelmill-plan/*"))  # the parts' files are gone
    manifest = (dest / "big/manifest.json").read_text()
    assert '"parts"' in manifest and '"kept"' in manifest


def test_the_gallery_of_a_parted_run_is_paged_with_every_image(parted):
    gallery = parted["dest"] / "big/gallery"
    index = (gallery / "index.html").read_text()
    assert "Images (620)" in index and "Failed (1)" in index and "c/broken.jpg" in index
    assert 'href="page-001.html"' in index and 'href="page-002.html"' in index
    shown = [(gallery / f"page-00{n}.html").read_text().count("<figure ") for n in (1, 2)]
    assert shown == [500, 120]
    assert not (gallery / "page-003.html").exists()
    assert (gallery / "contact-sheet-01.jpg").is_file()


def test_a_second_run_keeps_everything_and_starts_no_part(parted):
    second = parted["second"]
    assert second.is_completed(), second.message
    report = load_report(parted["dest"] / "big/report.json")
    assert report["counts"] == {"discovered": IMAGES + 1, "ok": 0, "failed": 1,
                                "skipped": IMAGES}
    children, _, own = _flow_runs(second.state_details.flow_run_id)
    # only the broken image is to make (it is tried again): too little for a child flow run,
    # its chunk runs in the run's own flow run
    assert children == []
    assert sorted(run.name for run in own if "chunk" in run.name) == [
        "filter-chunk-000", "resize-chunk-000"]
    assert [e["source"] for e in report["images"]] == \
        [e["source"] for e in parted["first_report"]["images"]]


def test_deleted_outputs_of_one_part_are_made_by_that_part_alone(parted):
    dest = parted["dest"]
    gone = sorted((dest / "big/blur/d").glob("*.jpg"))[-3:]
    for path in gone:
        path.unlink()
    state = parted["run"]()
    assert state.is_completed(), state.message
    report = load_report(dest / "big/report.json")
    assert report["counts"]["ok"] == 3 and report["counts"]["skipped"] == IMAGES - 3
    assert all(path.is_file() for path in gone)
    # the first page's images are as they were (kept): it is not written again
    page = dest / "big/gallery/page-001.html"
    assert page.stat().st_mtime_ns == parted["page_mtime"]
    children, _, _ = _flow_runs(state.state_details.flow_run_id)
    assert children == []  # four images to make, across two parts: one set of chunks here


def test_a_chunk_that_fails_for_good_fails_only_its_images(tmp_path, prefect_api, monkeypatch):
    import flows.process_images as module

    monkeypatch.setattr(module, "resize_chunk",
                        module.resize_chunk.with_options(retries=0, retry_delay_seconds=0))
    source = _source(tmp_path / "src")
    dest = tmp_path / "dest"
    (dest / "bad/resized").mkdir(parents=True)
    (dest / "bad/resized/d").write_text("a file where a folder must go")
    state = module.process_images.with_options(task_runner=module.make_task_runner("threads"))(
        source=str(source), destination=str(dest), spec=SPEC, run_name="bad",
        part_size=PART_SIZE, return_state=True)
    assert state.is_failed() and "chunks failed" in state.message, state.message
    report = load_report(dest / "bad/report.json")
    failed = {e["source"] for e in report["images"] if e["status"] == "failed"}
    # every d/ image failed with its chunks; a chunk that also held the last c/ images failed
    # them too; every a/ and b/ image (other chunks, other parts) was made
    assert {e["source"] for e in report["images"] if e["source"].startswith("d/")} <= failed
    assert not any(name.startswith(("a/", "b/")) for name in failed)
    assert "c/broken.jpg" in failed
    ok = {e["source"] for e in report["images"] if e["status"] == "ok"}
    assert len(ok) + len(failed) == IMAGES + 1 and len(ok) >= IMAGES // 2
    for name in ok:
        assert (dest / "bad/blur" / name).is_file()
    assert "Failed (" in (dest / "bad/gallery/index.html").read_text()


def test_a_parted_run_bucket_to_bucket_streams_its_records_file(gcs, prefect_api):
    """On GCS: the parts' files go, images.jsonl (a streamed upload) holds every record and
    the report names it."""
    from flows.process_images import make_task_runner, process_images
    from tests.helpers import load_report_blob

    src, dst = gcs.bucket(gcs.unique("psrc")), gcs.bucket(gcs.unique("pdst"))
    for number in range(9):
        src.blob(f"in/{'ab'[number % 2]}/p{number}.jpg").upload_from_string(
            encode(Image.new("RGB", (24, 18), (number * 20, 80, 160)), "jpeg"),
            content_type="image/jpeg")
    state = process_images.with_options(task_runner=make_task_runner("threads"))(
        source=f"gs://{src.name}/in", destination=f"gs://{dst.name}/out", spec=SPEC,
        run_name="g", part_size=2, return_state=True)
    assert state.is_completed(), state.message
    report = load_report_blob(dst, "out/g/report.json")
    assert report["parts"] >= 4
    assert report["counts"] == {"discovered": 9, "ok": 9, "failed": 0, "skipped": 0}
    names = {blob.name for blob in dst.list_blobs(prefix="out/g/")}
    assert not any(".pixelmill-plan" in name for name in names), names
    for entry in report["images"]:
        assert {f"out/g/{path}" for path in entry["outputs"].values()} <= names
    assert dst.get_blob("out/g/images.jsonl").content_type == "application/x-ndjson"


def test_an_unknown_part_deployment_is_refused_before_anything_is_written(tmp_path,
                                                                          prefect_api):
    from flows.process_images import make_task_runner, process_images

    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.jpg").write_bytes(encode(Image.new("RGB", (24, 18)), "jpeg"))
    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    state = flow(source=str(tmp_path / "src"), destination=str(tmp_path / "dst"), spec=SPEC,
                 run_name="x", part_deployment="nope/parts", return_state=True)
    assert state.is_failed()
    assert "part_deployment 'nope/parts': no such deployment" in state.message, state.message
    assert not (tmp_path / "dst/x/resized").exists()
