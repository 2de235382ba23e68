"""Hostile input end to end: every good image produced, every bad one reported with a
reason, exit status 1, nothing written outside the run folder, the gallery safe in a browser."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.hostile import GCS_ONLY, KINDS, XSS, build, expected
from tests.helpers import load_report, load_report_blob

pytestmark = pytest.mark.slow


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def check_report(report: dict, kinds: dict) -> None:
    entries = {entry["source"]: entry for entry in report["images"]}
    for key, (_, outcome) in kinds.items():
        status, words = expected(outcome)
        entry = entries[key.lstrip("/") if key.startswith("/") and key.lstrip("/") in entries
                        else key]
        if status == "failed":
            assert entry["status"] == "failed", (key, entry)
            assert words.lower() in entry["error"].lower(), (key, entry["error"])
        else:
            assert entry["status"] == "ok", (key, entry)
            assert set(entry["outputs"]) == {"resized", "blur"}
            if status == "ok-note":
                assert any(words in note for note in entry["notes"]), entry


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory, prefect_api):
    from tests.test_cli import pixelmill

    source = tmp_path_factory.mktemp("hostile-src")
    for key, data in build().items():
        (source / key).parent.mkdir(parents=True, exist_ok=True)
        (source / key).write_bytes(data)
    before = tree_digest(source)
    dest = tmp_path_factory.mktemp("hostile-dest")
    result = pixelmill("run", str(source), str(dest), "--run-name", "h", "--filter", "blur",
                       "--runner", "threads", "--chunk-size", "5")
    return {"source": source, "dest": dest, "before": before, "result": result}


def test_hostile_corpus_is_processed_or_reported(hostile_run):
    assert len(KINDS) >= 25
    result, dest = hostile_run["result"], hostile_run["dest"]
    assert result.returncode == 1, result.stderr
    report = load_report(dest / "h/report.json")
    check_report(report, KINDS)
    failed = sum(expected(outcome)[0] == "failed" for _, outcome in KINDS.values())
    assert report["counts"] == {"discovered": len(KINDS), "ok": len(KINDS) - failed,
                                "failed": failed, "skipped": 0}
    for entry in report["images"]:
        for path in entry.get("outputs", {}).values():
            with Image.open(dest / "h" / path) as image:
                image.load()
                assert image.size == (entry["width"], entry["height"])
    orientations = [e for e in report["images"] if e["source"].startswith("exif/")]
    assert {(e["width"], e["height"]) for e in orientations} == {(300, 200)}


def test_nothing_is_written_outside_the_run_folder_and_sources_untouched(hostile_run):
    dest = hostile_run["dest"]
    outside = [p for p in dest.rglob("*") if not p.is_relative_to(dest / "h")]
    assert outside == [dest / "h"] or outside == []
    assert not [p for p in dest.rglob(".pixelmill-tmp-*")]
    assert tree_digest(hostile_run["source"]) == hostile_run["before"]


def test_gallery_in_a_real_browser(hostile_run, artifacts_dir):
    """Headless Debian chromium: every image loads, no script from a name runs, no console
    errors; a screenshot is kept in test-artifacts/."""
    from playwright.sync_api import sync_playwright

    index = hostile_run["dest"] / "h/gallery/index.html"
    report = load_report(hostile_run["dest"] / "h/report.json")
    ok = [entry for entry in report["images"] if entry["status"] == "ok"]
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        page = browser.new_page(viewport={"width": 1280, "height": 6000})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                if m.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"),
                                          dialog.dismiss()))
        page.goto(index.as_uri())
        page.wait_for_load_state("load")
        page.wait_for_function("[...document.images].every(i => i.complete)", timeout=30000)
        sizes = page.eval_on_selector_all(
            "figure img", "images => images.map(i => [i.getAttribute('alt'), i.naturalWidth])")
        failure_rows = page.eval_on_selector_all("table tr td:first-child",
                                                 "cells => cells.map(c => c.textContent)")
        scripts = page.eval_on_selector_all("script", "s => s.length")
        injected = page.eval_on_selector_all("img[src='x']", "found => found.length")
        page.set_viewport_size({"width": 1280, "height": 1600})
        page.screenshot(path=str(artifacts_dir / "hostile-gallery.png"), full_page=False)
        browser.close()
    assert problems == []
    assert sorted(alt for alt, _ in sizes) == sorted(entry["source"] for entry in ok)
    assert all(width > 0 for _, width in sizes), sizes
    assert scripts == 0 and injected == 0
    assert XSS + ".jpg" in [alt for alt, _ in sizes]  # shown as text, not as markup
    assert set(failure_rows) == {e["source"] for e in report["images"] if e["status"] == "failed"}


def test_a_paged_gallery_in_a_real_browser(hostile_run):
    """The same run's gallery in pages of 2 images: every page loads its images in chromium,
    runs no script from a name and links on to the next; the index lists the failures."""
    from playwright.sync_api import sync_playwright

    from pixelmill.gallery import build_gallery
    from pixelmill.models import ImageResult, Job, RunReport
    from pixelmill.spec import PipelineSpec
    from pixelmill.localstorage import LocalStorage

    dest = hostile_run["dest"]
    original = (dest / "h/report.json").read_bytes()
    data = load_report(dest / "h/report.json")
    job = Job(source=data["source"], destination=data["destination"], run=data["run"],
              spec=PipelineSpec(**data["spec"]))
    report = RunReport.build(job, data["counts"]["discovered"],
                             [ImageResult(**entry) for entry in data["images"]],
                             data["duration_s"])
    shown = sorted(entry["source"] for entry in data["images"] if entry["status"] == "ok")
    try:
        build_gallery(report, LocalStorage(dest), page_size=2)
        seen, problems = [], []
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page()
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("dialog", lambda dialog: (problems.append(dialog.message), dialog.dismiss()))
            page.goto((dest / "h/gallery/index.html").as_uri())
            failures = page.eval_on_selector_all("table tr td:first-child",
                                                 "cells => cells.map(c => c.textContent)")
            page.click("ol.pages a")  # the first page
            while True:
                page.wait_for_function("[...document.images].every(i => i.complete)",
                                       timeout=30000)
                seen += page.eval_on_selector_all(
                    "figure img", "images => images.map(i => [i.alt, i.naturalWidth])")
                assert page.eval_on_selector_all("script", "s => s.length") == 0
                following = page.query_selector("a:text('next page')")
                if following is None:
                    break
                following.click()
            browser.close()
        assert problems == []
        assert sorted(alt for alt, _ in seen) == shown and all(width > 0 for _, width in seen)
        assert set(failures) == {e["source"] for e in data["images"] if e["status"] == "failed"}
    finally:  # the run's own gallery and report again
        build_gallery(report, LocalStorage(dest))
        (dest / "h/report.json").write_bytes(original)


def test_hostile_keys_in_a_bucket_stay_inside_the_destination(gcs, prefect_api):
    from flows.process_images import make_task_runner, process_images
    from pixelmill.spec import PipelineSpec

    src, dst = gcs.bucket(gcs.unique("hsrc")), gcs.bucket(gcs.unique("hdst"))
    kinds = {**GCS_ONLY, **{k: v for k, v in KINDS.items() if "same" in k or XSS in k
                            or k.startswith(("bomb", "empty", "notes"))}}
    for key, (builder, _) in kinds.items():
        src.blob(key).upload_from_string(builder(), content_type="image/jpeg")
    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    state = flow(source=f"gs://{src.name}", destination=f"gs://{dst.name}/out",
                 spec=PipelineSpec(size=(80, 60), filters=("blur",)), run_name="h",
                 return_state=True)
    assert state.is_completed()
    names = [blob.name for blob in gcs.client.list_blobs(dst.name)]
    assert names and all(name.startswith("out/h/") for name in names), names
    assert not any(".." in name.split("/") or "//" in name for name in names), names
    report = load_report_blob(dst, "out/h/report.json")
    entries = {entry["source"]: entry for entry in report["images"]}
    for key in GCS_ONLY:
        entry = entries[key]
        assert entry["status"] == "ok", entry
        with Image.open(io.BytesIO(dst.blob(f"out/h/{entry['outputs']['resized']}")
                                   .download_as_bytes())) as image:
            assert image.size == (80, 60)
    assert [name for name in names if "escape" in name] == [
        "out/h/blur/__/escape.jpg", "out/h/resized/__/escape.jpg"]
