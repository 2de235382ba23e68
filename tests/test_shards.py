"""Sharding for plain Cloud Run jobs: disjoint shards that cover every image exactly once."""

from __future__ import annotations

import json

import pytest

from pixelmill.layout import check_shard, in_shard
from pixelmill.models import Job
from pixelmill.pipeline import discover
from pixelmill.spec import PipelineSpec
from pixelmill.localstorage import LocalStorage
from tests.corpus import BAD, GOOD, make_source
from tests.helpers import load_report


@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_every_key_is_in_exactly_one_shard(count):
    keys = [f"album-{n % 7}/img-{n:04d}.jpg" for n in range(500)]
    for key in keys:
        assert sum(in_shard(key, index, count) for index in range(count)) == 1
    if count > 1:  # and the shards are not lopsided
        sizes = [sum(in_shard(key, index, count) for key in keys) for index in range(count)]
        assert min(sizes) > 500 / count / 2


@pytest.mark.parametrize(("index", "count"), [(0, 0), (3, 3), (-1, 2)])
def test_bad_shard_settings_are_refused(index, count):
    from pixelmill.errors import UsageError

    with pytest.raises(UsageError):
        check_shard(index, count)


def test_discover_shards_cover_the_source_once_with_the_same_output_names(tmp_path):
    source = LocalStorage(make_source(tmp_path / "src"))
    # x.png and x.jpg meet as x.jpg: the rule must not depend on which shard sees which
    (tmp_path / "src/x.jpg").write_bytes((tmp_path / "src/e.jpg").read_bytes())
    (tmp_path / "src/x.png").write_bytes((tmp_path / "src/e.jpg").read_bytes())
    destination = LocalStorage(tmp_path / "dst")
    whole = discover(source, destination, Job(source="s", destination="d", run="r"), 2)
    outputs = {item.source: item.output for chunk in whole.chunks for item in chunk.items}
    seen: dict[str, str] = {}
    rejected: list[str] = []
    for index in range(3):
        job = Job(source="s", destination="d", run="r", shard_index=index, shard_count=3)
        plan = discover(source, destination, job, 2)
        for chunk in plan.chunks:
            for item in chunk.items:
                assert item.source not in seen
                seen[item.source] = item.output
        rejected += [image.source for image in plan.rejected]
        manifest = json.loads((tmp_path / f"dst/r/manifest-shard-{index}-of-3.json").read_text())
        assert len(manifest["images"]) == sum(len(chunk.items) for chunk in plan.chunks)
    assert seen == outputs  # every image once, under the name the unsharded run gives it
    # image names are candidates from the listing alone: the PDF named .jpg and broken.jpg
    # are in the chunks and fail where they are decoded, with their reasons
    assert rejected == [] and {"garden/fake.jpg", "broken.jpg"} <= set(seen)
    assert outputs["x.jpg"] == "x.jpg" and outputs["x.png"] == "x.png.jpg"


@pytest.mark.slow
def test_cloud_run_task_variables_shard_a_flow_run(tmp_path, monkeypatch, prefect_api):
    from flows.process_images import make_task_runner, process_images

    source = make_source(tmp_path / "src")
    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    monkeypatch.setenv("CLOUD_RUN_EXECUTION", "pixelmill-job-abc12")
    monkeypatch.setenv("CLOUD_RUN_TASK_COUNT", "2")
    done: list[str] = []
    for index in range(2):
        monkeypatch.setenv("CLOUD_RUN_TASK_INDEX", str(index))
        state = flow(source=str(source), destination=str(tmp_path / "out"),
                     spec=PipelineSpec(size=(64, 64)), return_state=True)
        assert state.is_completed()
        run = tmp_path / "out/pixelmill-job-abc12"  # both shards: the execution's folder
        report = load_report(run / f"report-shard-{index}-of-2.json")
        assert report["shard"] == {"index": index, "count": 2}
        assert (run / f"gallery/index-shard-{index}-of-2.html").is_file()
        done += [entry["source"] for entry in report["images"]]
    assert sorted(done) == sorted([*GOOD, *BAD])
    assert not (run / "report.json").exists()
