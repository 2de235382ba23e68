"""The plan a part at a time: listings in key order, parts cut where no two outputs can meet,
the run folder read forward once, and a dry run's counts (on real local folders)."""

from __future__ import annotations

import itertools
import json

import pytest
from PIL import Image

from pixelmill import pipeline
from pixelmill.layout import assign_outputs, output_group
from pixelmill.models import Job
from pixelmill.spec import PipelineSpec
from pixelmill.localstorage import LocalStorage
from tests.helpers import encode

JPEG = encode(Image.new("RGB", (8, 6), (200, 30, 30)), "jpeg")
# Names whose outputs meet (x.png, x.jpg, x as JPEG), sort between each other ('-' < '.' <
# '/'), live in dotted folders, start with dots, or carry a backslash (a legal file name here,
# 'a/b' once made safe).
TRICKY = [
    "x", "x.jpg", "x.png", "x.jpeg", "x-1.jpg", "x.d/q.jpg", "x.png.jpg", "x0.jpg",
    "y/.hidden.jpg", "y/.hidden.png", "y/a.b.c.png", "y/a.b.jpg", "y/a/b.jpg", "y/a-b.jpg",
    "z\\w.jpg", "z/w.jpg", "z/w.png", "a/b.jpg", "a0.jpg", "aB.jpg", "a\\b.jpg",
    "notes.txt", "empty.jpg",
]


def _source(tmp_path, names=TRICKY):
    root = tmp_path / "src"
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = b"just words" if name.endswith(".txt") else b"" if name == "empty.jpg" else JPEG
        path.write_bytes(data)
    return LocalStorage(root)


def _job(tmp_path, **spec) -> Job:
    return Job(source=str(tmp_path / "src"), destination=str(tmp_path / "dst"), run="r",
               spec=PipelineSpec(size=(4, 3), **spec))


def test_a_local_listing_comes_in_key_order_as_a_bucket_lists(tmp_path):
    storage = _source(tmp_path)
    keys = [info.key for info in storage.list()]
    assert keys == sorted(keys) and len(keys) == len(TRICKY)
    assert [info.key for info in storage.list("y/")] == sorted(k for k in TRICKY
                                                               if k.startswith("y/"))


@pytest.mark.parametrize("part_images", [1, 2, 3, 5, 100])
def test_parts_give_every_image_the_output_one_plan_would(tmp_path, part_images):
    source = _source(tmp_path)
    job = _job(tmp_path)
    dest = LocalStorage(tmp_path / "dst")
    parts = list(pipeline.plan_parts(source, dest, job, part_images))
    entries = [entry for part in parts for entry in part.manifest]
    images = [name for name in TRICKY if name not in ("notes.txt", "empty.jpg")]
    assert sorted(entry["source"] for entry in entries) == sorted(images)
    outputs = {entry["source"]: entry["output"] for entry in entries}
    assert len(set(outputs.values())) == len(outputs)  # no two sources meet
    whole = assign_outputs(images, ".jpg")
    for name in images:
        if name != "a\\b.jpg":
            assert outputs[name] == whole[name], name
    # 'a\\b.jpg' is listed after 'aB.jpg' but made safe it is 'a/b.jpg', whose part may be
    # planned already: then it gets a name of its own, which meets no other output
    orphan = outputs["a\\b.jpg"]
    if part_images >= len(images):
        assert orphan == whole["a\\b.jpg"]
    elif part_images == 1:
        assert orphan.startswith("a/b~") and orphan.endswith(".jpg"), orphan
    else:
        assert orphan == whole["a\\b.jpg"] or orphan.startswith("a/b~"), orphan
    # sources that could meet are in one part; parts hold at least part_images but the last
    for part in parts:
        groups = {output_group(entry["source"]) for entry in part.manifest}
        for other in parts:
            if other is not part:
                assert not groups & {output_group(e["source"]) for e in other.manifest
                                     if e["source"] != "a\\b.jpg"}
    assert all(len(part.manifest) >= part_images for part in parts[:-1])
    assert [r.source for part in parts for r in part.rejected] == ["empty.jpg"]
    assert [key for part in parts for key in part.ignored] == ["notes.txt"]


def test_the_run_folder_is_read_forward_once_and_finds_what_each_part_made(tmp_path):
    names = [f"{folder}/p{number:03d}.jpg" for folder, number in
             itertools.product(["a", "a.b", "b"], range(20))] + ["a.jpg", "a.png", "b-1.png"]
    source = _source(tmp_path, names)
    job = _job(tmp_path, filters=("blur",))
    dest = LocalStorage(tmp_path / "dst")
    plan = pipeline.discover(source, dest, job)
    for chunk in plan.chunks:  # make everything, as the first run would
        made = pipeline.resize_images(chunk.items, job, source, dest)
        pipeline.filter_images(pipeline.ChunkResult(index=chunk.index, images=tuple(made)), job,
                               dest)
    listed = []
    original = dest.list
    dest.list = lambda prefix="": (listed.append(prefix), original(prefix))[1]
    parts = list(pipeline.plan_parts(source, dest, job, part_images=7))
    assert len(parts) >= 5
    assert sum(len(part.kept) for part in parts) == len(names)  # all kept: nothing to make
    assert not any(part.items for part in parts)
    assert sorted(listed) == ["r/blur/", "r/resized/"]  # each output folder listed once

    (tmp_path / "dst/r/blur/a.b/p007.jpg").unlink()  # one output gone: that image is made
    parts = list(pipeline.plan_parts(source, dest, job, part_images=7))
    todo = [item for part in parts for item in part.items]
    assert [item.source for item in todo] == ["a.b/p007.jpg"]
    assert todo[0].kept_resized is not None and todo[0].kept_filters == ()


def test_a_dry_run_survey_counts_what_discover_plans(tmp_path):
    source = _source(tmp_path)
    job = _job(tmp_path)
    dest = LocalStorage(tmp_path / "dst")
    plan = pipeline.discover(source, dest, job, write_manifest=False)
    found = pipeline.survey(source, dest, job, part_images=2)
    assert found.parts >= 3
    assert (found.discovered, found.kept, found.rejected, found.ignored) == (
        plan.discovered, len(plan.kept), len(plan.rejected), plan.ignored)
    assert found.to_make == sum(len(chunk.items) for chunk in plan.chunks)
    assert [image.source for image in found.first_rejected] == ["empty.jpg"]
    assert not (tmp_path / "dst").exists()


def test_discover_writes_the_same_manifest_as_the_parts(tmp_path):
    source = _source(tmp_path)
    job = _job(tmp_path)
    dest = LocalStorage(tmp_path / "dst")
    pipeline.discover(source, dest, job)
    manifest = json.loads((tmp_path / "dst/r/manifest.json").read_text())
    parts = list(pipeline.plan_parts(source, dest, job, part_images=2))
    assert sorted(e["source"] for e in manifest["images"]) == sorted(
        e["source"] for part in parts for e in part.manifest)


def test_a_streamed_write_appears_whole_or_not_at_all(tmp_path):
    storage = LocalStorage(tmp_path)

    def broken():
        yield b'{"source": "a"}\n'
        raise RuntimeError("the records stopped")

    with pytest.raises(RuntimeError):
        storage.write_stream("r/images.jsonl", broken(), "application/x-ndjson")
    assert not (tmp_path / "r/images.jsonl").exists()
    assert list((tmp_path / "r").iterdir()) == []  # no temp file left
    storage.write_stream("r/images.jsonl", iter([b"one\n", b"two\n"]), "application/x-ndjson")
    assert storage.read("r/images.jsonl") == b"one\ntwo\n"


def _parts_of(keys, part_images):
    """`_in_parts` over image keys alone: the parts' keys and every key's output."""
    from pixelmill.layout import orphan_output
    from pixelmill.pipeline import _in_parts
    from pixelmill.storage import ObjectInfo

    classified = [("image", (ObjectInfo(key, 1), None)) for key in sorted(keys)]
    parts, outputs = [], {}
    for part in _in_parts(classified, part_images):
        normal = assign_outputs([value[0].key for _, value, orphan in part if not orphan],
                                ".jpg")
        for _, value, orphan in part:
            key = value[0].key
            outputs[key] = orphan_output(key, ".jpg") if orphan else normal[key]
        parts.append([value[0].key for _, value, _ in part])
    return parts, outputs


def test_keys_whose_safe_form_sorts_later_never_meet_another_output():
    # 'a//z.jpg' is 'a/z.jpg' made safe: it waits for its place, beside 'a/z.png'
    parts, outputs = _parts_of(["a//z.jpg", "a//zz.jpg", "a/b.jpg", "a/z.png"], 1)
    assert len(set(outputs.values())) == len(outputs), outputs
    assert any({"a//z.jpg", "a/z.png"} <= set(part) for part in parts), parts


def test_a_file_beside_a_folder_of_its_name_does_not_hold_the_folder_in_one_part():
    parts, _ = _parts_of(["photos.jpg"] + [f"photos/{n:03d}.jpg" for n in range(50)], 10)
    assert max(len(part) for part in parts) <= 11, [len(part) for part in parts]


def test_a_key_behind_its_place_in_the_first_part_is_not_an_orphan():
    _, outputs = _parts_of(["a/c.jpg", "a\\b.jpg"], 1)
    assert outputs == {"a/c.jpg": "a/c.jpg", "a\\b.jpg": "a/b.jpg"}


def test_a_small_last_part_joins_the_one_before():
    # 10 + 2 images: the 2 (under a quarter of the part size) join the first part
    parts, _ = _parts_of([f"a/{n:02d}.jpg" for n in range(12)], 10)
    assert [len(part) for part in parts] == [12]
    # 10 + 3: a quarter or more stays a part of its own
    parts, _ = _parts_of([f"a/{n:02d}.jpg" for n in range(13)], 10)
    assert [len(part) for part in parts] == [10, 3]
    # only the last part is joined: 10 + 10 + 1 is two parts, the second of 11
    parts, _ = _parts_of([f"a/{n:02d}.jpg" for n in range(21)], 10)
    assert [len(part) for part in parts] == [10, 11]
