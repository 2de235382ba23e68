"""Several sizes and formats per image (renditions): from one decode, each in its folder, each
stamped, so a re-run makes only what the run folder lacks; the gallery's <picture> loads every
one in a real browser."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pixelmill import imageops, pipeline
from pixelmill.models import Job
from pixelmill.samples import jpeg_bytes, photo
from pixelmill.spec import PRESETS, PipelineSpec
from pixelmill.localstorage import LocalStorage
from tests.helpers import assert_image_similar, load_report

GPS_IFD = 0x8825


# --- the settings ---------------------------------------------------------------------------

def test_sizes_and_formats_repeat_in_order_without_repeats():
    spec = PipelineSpec(sizes=["100x100", "400x300", "100x100"], formats=["webp", "jpg", "webp"])
    assert spec.sizes == ((100, 100), (400, 300)) and spec.formats == ("webp", "jpeg")
    assert (spec.size, spec.format) == ((100, 100), "webp")  # the main rendition
    assert [(r.size, r.format, r.folder) for r in spec.renditions] == [
        ((100, 100), "webp", "resized"), ((100, 100), "jpeg", "resized"),
        ((400, 300), "webp", "resized-400x300"), ((400, 300), "jpeg", "resized-400x300")]
    # the report's spec reads back as the same spec (deployments pass it as a parameter)
    assert PipelineSpec.model_validate(json.loads(spec.model_dump_json())) == spec


def test_one_size_and_format_is_the_layout_it_always_was():
    spec = PipelineSpec(size="400x300", format="png")
    assert [(r.size, r.format, r.folder) for r in spec.renditions] == [
        ((400, 300), "png", "resized")]
    assert spec.more_sizes == () and spec.more_formats == ()


def test_a_deployment_parameter_of_several_sizes_passes_prefects_schema():
    """What the README gives for a deployment's `spec`: accepted by the parameter schema
    Prefect enforces on deployment runs, and read as the sizes and formats meant."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools import validate

    from flows.process_images import process_images

    spec = {"size": [1600, 1200], "more_sizes": [[400, 300], [100, 100]], "format": "jpeg",
            "more_formats": ["webp"]}
    schema = parameter_schema(process_images).model_dump_for_openapi()
    assert validate({"source": "a", "destination": "b", "spec": spec}, schema,
                    ignore_required=True) == []
    parsed = PipelineSpec.model_validate(spec)
    assert parsed.sizes == ((1600, 1200), (400, 300), (100, 100))
    assert parsed.formats == ("jpeg", "webp")


def test_presets_and_what_replaces_them():
    web = PipelineSpec(preset="web")
    assert web.sizes == ((480, 480), (960, 960), (1920, 1920))
    assert web.formats == ("jpeg", "webp", "avif")
    assert PipelineSpec(preset="thumbnails").renditions[0].size == (100, 100)
    mine = PipelineSpec(preset="web", sizes=["300x300"])  # sizes given replace the preset's
    assert mine.sizes == ((300, 300),) and mine.formats == web.formats
    with pytest.raises(ValueError, match="--preset 'huge': choose from thumbnails, web"):
        PipelineSpec(preset="huge")
    assert set(PRESETS) == {"thumbnails", "web"}


def test_the_command_line_repeats_size_and_format_and_names_a_bad_one(tmp_path):
    from typer.testing import CliRunner

    from cli.main import _spec, app

    spec = _spec(["100x100", "400x300"], "contain", None, ["avif", "jpeg"], 80)
    assert spec.sizes == ((100, 100), (400, 300)) and spec.formats == ("avif", "jpeg")
    assert _spec(None, "contain", None, None, 85) == PipelineSpec()
    assert _spec(None, "contain", None, None, 85, preset="web") == PipelineSpec(preset="web")
    (tmp_path / "src").mkdir()
    for args, said in ((["--preset", "huge"], "--preset 'huge': choose from"),
                       (["--format", "jpeg", "--format", "gif"], "--format 'gif': choose from"),
                       (["--size", "10x10", "--size", "big"], "--size 'big': expected")):
        result = CliRunner().invoke(app, ["run", str(tmp_path / "src"), str(tmp_path / "d"),
                                          *args])
        assert result.exit_code == 2, result.output
        assert said in result.output
    assert not (tmp_path / "d").exists()


# --- one decode -----------------------------------------------------------------------------

@pytest.mark.parametrize("fit", ["contain", "cover", "fill"])
def test_every_size_from_one_decode_looks_like_its_own_resize(fit):
    source = photo(1200, 800, seed=3)
    data = jpeg_bytes(source, quality=92)
    sizes = [(600, 600), (200, 150), (64, 64)]
    made = imageops.resize_to_sizes(Image.open(io.BytesIO(data)), sizes, fit)
    for size in sizes:
        alone = imageops.resize_image(Image.open(io.BytesIO(data)), size, fit)
        assert made[size].size == alone.size == imageops.output_size((1200, 800), size, fit)
        assert_image_similar(made[size], alone, 30)


def test_one_decode_at_the_scale_the_largest_rendition_needs(monkeypatch):
    """Six renditions open the source once, and a JPEG is decoded at the smallest DCT scale
    that still serves the largest size (3000x2000 -> 400 wide needs 1/4: 750x500)."""
    data = jpeg_bytes(photo(3000, 2000, seed=1))
    opened, decoded = [], []
    real_open, real_transpose = imageops.open_image, imageops.ImageOps.exif_transpose
    monkeypatch.setattr(imageops, "open_image",
                        lambda *args: opened.append(1) or real_open(*args))
    monkeypatch.setattr(imageops.ImageOps, "exif_transpose",
                        lambda image: decoded.append(image.size) or real_transpose(image))
    spec = PipelineSpec(sizes=["100x100", "400x300", "200x200"], formats=["jpeg", "webp"])
    encoded, _ = imageops.render_renditions(data, spec, spec.renditions)
    assert len(opened) == 1 and decoded == [(750, 500)]
    assert [(e.rendition.size, e.rendition.format, e.width, e.height) for e in encoded] == [
        ((100, 100), "jpeg", 100, 67), ((100, 100), "webp", 100, 67),
        ((400, 300), "jpeg", 400, 267), ((400, 300), "webp", 400, 267),
        ((200, 200), "jpeg", 200, 133), ((200, 200), "webp", 200, 133)]
    for output in encoded:
        with Image.open(io.BytesIO(output.data)) as image:
            assert image.format == output.rendition.format.upper()
            assert image.size == (output.width, output.height)


# --- the run folder -------------------------------------------------------------------------

def _gps_photo(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)})
    buffer = io.BytesIO()
    photo(640, 480, seed=seed).save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _source(folder: Path) -> LocalStorage:
    (folder / "trips").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(_gps_photo(1))
    (folder / "trips" / "b.png").write_bytes(
        (lambda b: (photo(300, 500, seed=2).save(b, "PNG"), b.getvalue())[1])(io.BytesIO()))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    return LocalStorage(folder)


def _run(source: LocalStorage, dest: LocalStorage, spec: PipelineSpec):
    """Plan, resize and filter as the flow's tasks do, in one chunk; (plan, results)."""
    job = Job(source=source.uri, destination=dest.uri, run="r", spec=spec)
    plan = pipeline.discover(source, dest, job)
    items = tuple(item for chunk in plan.chunks for item in chunk.items)
    resized = pipeline.resize_images(items, job.without_filters(), source, dest)
    from pixelmill.models import ChunkResult

    results = pipeline.filter_images(ChunkResult(index=0, images=tuple(resized)), job, dest)
    return plan, items, results


def _written(root: Path) -> dict[str, int]:
    return {str(path.relative_to(root)): path.stat().st_mtime_ns
            for path in sorted(root.rglob("*")) if path.is_file()
            and not path.name.endswith((".json", ".jsonl")) and ".pixelmill" not in str(path)}


def test_a_run_of_several_sizes_and_formats_writes_each_in_its_folder(tmp_path):
    source, dest = _source(tmp_path / "src"), LocalStorage(tmp_path / "dst")
    spec = PipelineSpec(sizes=["120x120", "60x60"], formats=["jpeg", "webp"],
                        filters=["sharpen"])
    _, _, results = _run(source, dest, spec)
    by_source = {image.source: image for image in results}
    assert by_source["broken.jpg"].status == "failed"
    b = by_source["trips/b.png"]
    assert b.status == "ok" and (b.width, b.height) == (72, 120)
    assert [(r.size, r.format, r.width, r.height, r.output) for r in b.renditions] == [
        ("120x120", "jpeg", 72, 120, "resized/trips/b.jpg"),
        ("120x120", "webp", 72, 120, "resized/trips/b.webp"),
        ("60x60", "jpeg", 36, 60, "resized-60x60/trips/b.jpg"),
        ("60x60", "webp", 36, 60, "resized-60x60/trips/b.webp")]
    # the filter applies to the main rendition, in the main format
    assert b.outputs == {"resized": "resized/trips/b.jpg", "sharpen": "sharpen/trips/b.jpg"}
    run = tmp_path / "dst" / "r"
    assert sorted(_written(run)) == sorted(
        [f"{folder}/{name}.{ext}" for folder in ("resized", "resized-60x60")
         for name in ("a", "trips/b") for ext in ("jpg", "webp")]
        + ["sharpen/a.jpg", "sharpen/trips/b.jpg"])
    for image in (by_source["a.jpg"], b):
        for rendition in image.renditions:
            with Image.open(run / rendition.output) as made:
                assert made.size == (rendition.width, rendition.height)
                assert made.format == rendition.format.upper()
                assert GPS_IFD not in made.getexif()  # no position in any output
                assert not made.getexif()  # and no EXIF at all by default
        entry = image.report_entry()
        assert [r["output"] for r in entry["renditions"]] == [
            r.output for r in image.renditions]
    # the per-image records read back the same (a run in parts merges them)
    assert pipeline.from_record(pipeline.record(b)) == b.model_copy(update={"version": b.version})


def test_a_size_or_format_added_later_makes_only_the_new_renditions(tmp_path):
    source, dest = _source(tmp_path / "src"), LocalStorage(tmp_path / "dst")
    run = tmp_path / "dst" / "r"
    _run(source, dest, PipelineSpec(size="120x120", filters=["sharpen"]))
    before = _written(run)
    assert sorted(before) == ["resized/a.jpg", "resized/trips/b.jpg", "sharpen/a.jpg",
                              "sharpen/trips/b.jpg"]

    more = PipelineSpec(sizes=["120x120", "60x60"], formats=["jpeg", "avif"],
                        filters=["sharpen"])
    plan, items, results = _run(source, dest, more)
    after = _written(run)
    assert {key: after[key] for key in before} == before  # nothing made before is rewritten
    assert sorted(set(after) - set(before)) == [
        "resized-60x60/a.avif", "resized-60x60/a.jpg", "resized-60x60/trips/b.avif",
        "resized-60x60/trips/b.jpg", "resized/a.avif", "resized/trips/b.avif"]
    assert all(item.kept_resized is not None and item.kept_filters == ("sharpen",)
               for item in items if item.source != "broken.jpg")
    ok = [image for image in results if image.status == "ok"]
    assert len(ok) == 2 and all(len(image.renditions) == 4 for image in ok)

    # everything there: the images are kept, with every rendition listed
    plan, items, _ = _run(source, dest, more)
    assert [item.source for item in items] == ["broken.jpg"]
    assert sorted(image.source for image in plan.kept) == ["a.jpg", "trips/b.png"]
    assert all(len(image.renditions) == 4 for image in plan.kept)

    # one rendition deleted: only it is made again
    (run / "resized-60x60/trips/b.avif").unlink()
    kept = _written(run)
    _run(source, dest, more)
    again = _written(run)
    assert sorted(key for key in again if again[key] != kept.get(key)) == [
        "resized-60x60/trips/b.avif"]


# --- the gallery ----------------------------------------------------------------------------

def test_the_gallery_picture_offers_every_format_and_width():
    from pixelmill.gallery import _figure
    from pixelmill.models import ImageResult, RenditionResult

    stem = '"><img src=x onerror=alert(1)>'
    name = stem + ".jpg"
    renditions = tuple(
        RenditionResult(size=size, format=fmt, width=width, height=width // 2,
                        output=f"{folder}/{stem}.{ext}")
        for size, width, folder in (("200x200", 200, "resized"),
                                    ("80x80", 80, "resized-80x80"))
        for fmt, ext in (("jpeg", "jpg"), ("avif", "avif")))
    image = ImageResult(source=name, status="ok", width=200, height=100,
                        outputs={"resized": f"resized/{name}"}, renditions=renditions)
    html = _figure(image, 0)
    assert "<img src=x" not in html and "&quot;&gt;&lt;img" in html
    assert html.count("<source ") == 1 and 'type="image/avif"' in html
    assert ("resized-80x80/%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.avif 80w, "
            "../resized/%22%3E%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E.avif 200w") in html
    assert "4 renditions" in html and html.count("<a href=") == 5  # the image and each


@pytest.mark.slow
def test_a_flow_run_of_renditions_and_its_gallery_in_a_real_browser(tmp_path, prefect_api,
                                                                    artifacts_dir):
    """The flow on threads: every rendition in the report and on disk; the gallery in
    chromium loads each image's <picture> in AVIF and every rendition it links to; a second
    run with a format more makes only that format."""
    from playwright.sync_api import sync_playwright

    from flows.process_images import make_task_runner, process_images

    source = _source(tmp_path / "src")
    dest = tmp_path / "dst"
    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    spec = PipelineSpec(sizes=["160x160", "80x80"], formats=["jpeg", "webp"],
                        filters=["blur"])
    state = flow(source=source.uri, destination=str(dest), spec=spec, run_name="r",
                 return_state=True)
    assert state.is_completed(), state.message
    report = load_report(dest / "r/report.json")
    assert report["counts"] == {"discovered": 3, "ok": 2, "failed": 1, "skipped": 0}
    images = [json.loads(line) for line in (dest / "r/images.jsonl").read_text().splitlines()]
    for entry in images:
        if entry["status"] == "ok":
            assert [(r["size"], r["format"]) for r in entry["renditions"]] == [
                ("160x160", "jpeg"), ("160x160", "webp"), ("80x80", "jpeg"), ("80x80", "webp")]
            assert all((dest / "r" / r["output"]).is_file() for r in entry["renditions"])

    spec = spec.model_copy(update={"more_formats": ("webp", "avif")})
    before = _written(dest / "r")
    state = flow(source=source.uri, destination=str(dest), spec=spec, run_name="r",
                 return_state=True)
    assert state.is_completed(), state.message
    after = _written(dest / "r")
    assert sorted(set(after) - set(before)) == [
        "resized-80x80/a.avif", "resized-80x80/trips/b.avif", "resized/a.avif",
        "resized/trips/b.avif"]
    assert all(after[key] == before[key] for key in before if not key.startswith("gallery/"))

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update"])
        page = browser.new_page(viewport={"width": 1280, "height": 2000})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.goto((dest / "r/gallery/index.html").as_uri())
        page.wait_for_function("[...document.images].every(i => i.complete)", timeout=30000)
        shown = page.eval_on_selector_all(
            "figure picture img", "images => images.map(i => [i.alt, i.currentSrc, "
            "i.naturalWidth])")
        links = page.eval_on_selector_all(".renditions a", "links => links.map(a => a.href)")
        loaded = page.evaluate("""hrefs => Promise.all(hrefs.map(href => new Promise(done => {
            const image = new Image();
            image.onload = () => done([href, image.naturalWidth]);
            image.onerror = () => done([href, 0]);
            image.src = href;
        })))""", links)
        page.screenshot(path=str(artifacts_dir / "renditions-gallery.png"))
        browser.close()
    assert problems == []
    assert sorted(alt for alt, _, _ in shown) == ["a.jpg", "trips/b.png"]
    assert all(src.endswith(".avif") and width > 0 for _, src, width in shown), shown
    assert len(links) == 2 * 6 and all(width > 0 for _, width in loaded), loaded
