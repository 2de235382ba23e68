"""Unit tests of the gallery (index.html, contact sheet, report.json) on a tmp LocalStorage."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image

from pixelmill.gallery import build_gallery, render_index
from pixelmill.models import ImageResult, Job, RunReport
from pixelmill.spec import PipelineSpec
from pixelmill.localstorage import LocalStorage
from tests.helpers import decode, encode

RUN = "20261121T2230Z"
HOSTILE = "<img src=x onerror=alert(1)>.jpg"
AWKWARD = "trips/a #1?x=50% off.jpg"
RED, BLUE = (220, 20, 20), (20, 20, 220)
KEPT, GREEN = "zz/kept.jpg", (20, 200, 20)


class _Links(HTMLParser):
    """Every href / src / CSS url() in a page (in-page #anchors apart), and the ids."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.anchors: list[str] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("href", "src") and value:
                (self.anchors if value.startswith("#") else self.links).append(value)
            elif name == "style" and value:
                self.links += re.findall(r'url\("([^"]*)"\)', value)
            elif name == "id" and value:
                self.ids.add(value)


def _links(page: str) -> _Links:
    parser = _Links()
    parser.feed(page)
    return parser


@pytest.fixture
def dest(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "dest")


@pytest.fixture
def report(dest) -> RunReport:
    """A run with two ok images (resized files really written), one failure, and one image
    kept from an earlier run (status "skipped", its files in place)."""
    job = Job(source="/photos", destination=dest.uri, run=RUN,
              spec=PipelineSpec(size=(40, 30), filters=("blur",)))
    images = []
    for source, colour in [(AWKWARD, RED), (HOSTILE, BLUE)]:
        outputs = {"resized": f"resized/{source}", "blur": f"blur/{source}"}
        for path in outputs.values():
            dest.write(f"{RUN}/{path}", encode(Image.new("RGB", (40, 30), colour), "jpeg"),
                       "image/jpeg")
        images.append(ImageResult(source=source, status="ok", width=40, height=30,
                                  outputs=outputs))
    images.append(ImageResult(source="broken<b>.jpg", status="failed",
                              error="cannot decode JPEG: image file is truncated"))
    dest.write(f"{RUN}/resized/{KEPT}", encode(Image.new("RGB", (40, 30), GREEN), "jpeg"),
               "image/jpeg")
    images.append(ImageResult(source=KEPT, status="skipped", width=40, height=30,
                              outputs={"resized": f"resized/{KEPT}"}))
    return RunReport.build(job, discovered=4, images=images, duration_s=1.23456)


def test_render_index_escapes_hostile_names(report):
    page = render_index(report, [])
    assert "<img src=x" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in page
    # Only the tags we write: the hostile name did not add an element.
    assert set(_links(page).tags) <= {"html", "head", "meta", "title", "style", "body", "header",
                                      "h1", "div", "span", "a", "main", "h2", "table", "tr",
                                      "th", "td", "figure", "img", "figcaption", "p", "section"}
    assert _links(page).tags.count("img") == 3


def test_render_index_links_are_relative_and_quoted(report):
    page = render_index(report, ["gallery/contact-sheet-01.jpg"])
    assert 'href="../resized/trips/a%20%231%3Fx%3D50%25%20off.jpg"' in page
    assert 'src="../resized/trips/a%20%231%3Fx%3D50%25%20off.jpg"' in page
    assert 'href="../blur/trips/a%20%231%3Fx%3D50%25%20off.jpg"' in page
    assert 'href="contact-sheet-01.jpg"' in page
    for link in _links(page).links:
        parts = urlsplit(link)
        assert not parts.scheme and not parts.netloc, link
        assert not link.startswith("/"), link
        assert not parts.query and not parts.fragment, link  # '?' and '#' were quoted


def test_render_index_lists_failures_with_reasons(report):
    page = render_index(report, [])
    assert "Failed (1)" in page
    reason = "cannot decode JPEG: image file is truncated"
    assert f"<td>broken&lt;b&gt;.jpg</td><td>{reason}</td>" in page
    # the kept image is shown, marked as kept; the failed one is not an image of the grid
    grid = page.split("<h2>Images")[1]
    assert "broken&lt;b&gt;.jpg" not in grid
    kept_figure = grid.split(f'alt="{KEPT}"')[1].split("</figure>")[0]
    assert 'class="kept"' in kept_figure
    assert grid.count('class="kept"') == 1
    assert "2 made now" in page and "1 kept" in page and "1 failed" in page


def test_render_index_without_failures_has_no_failure_table(report):
    clean = report.model_copy(update={"images": [i for i in report.images if i.status == "ok"]})
    assert "Failed (" not in render_index(clean, [])


def test_build_gallery_writes_page_sheet_and_report(report, dest):
    index_key = build_gallery(report, dest)
    assert index_key == f"{RUN}/gallery/index.html"
    files = {info.key for info in dest.list()}
    assert {f"{RUN}/gallery/index.html", f"{RUN}/gallery/contact-sheet-01.jpg",
            f"{RUN}/report.json", f"{RUN}/images.jsonl"} <= files
    assert f"{RUN}/gallery/contact-sheet-02.jpg" not in files

    sheet = decode(dest.read(f"{RUN}/gallery/contact-sheet-01.jpg"))
    assert sheet.format == "JPEG" and sheet.mode == "RGB"
    assert sheet.size == (6 * 208, 1 * 178)  # one row of six 200x150 tiles with margins
    # The two ok images and the kept one are on it, in report order (sorted by source),
    # centred in their tiles.
    for slot, (_, colour) in enumerate(sorted([(AWKWARD, RED), (HOSTILE, BLUE),
                                               (KEPT, GREEN)])):
        pixel = sheet.getpixel((slot * 208 + 4 + 100, 4 + 75))
        assert all(abs(a - b) < 40 for a, b in zip(pixel, colour)), (slot, pixel)
    assert all(abs(a - b) < 20 for a, b in zip(sheet.getpixel((3 * 208 + 104, 79)), (32,) * 3))


def test_every_gallery_link_resolves_to_a_written_file(report, dest):
    build_gallery(report, dest)
    page = dest.read(f"{RUN}/gallery/index.html").decode("utf-8")
    links = _links(page).links
    assert len(links) >= 6
    for link in links:
        target = dest.root / RUN / "gallery" / unquote(link)
        assert target.resolve().is_file(), link


def test_report_json_follows_the_contract(report, dest):
    build_gallery(report, dest)
    data = json.loads(dest.read(f"{RUN}/report.json"))
    assert {"run", "source", "destination", "spec", "counts", "images_file", "failures",
            "duration_s"} <= set(data)
    assert "images" not in data  # the records are in images.jsonl, so the report stays small
    assert data["run"] == RUN and data["source"] == "/photos" and data["destination"] == dest.uri
    spec = data["spec"]
    assert {"size", "fit", "filters", "format", "quality"} <= set(spec)
    assert spec["size"] == [40, 30] and spec["fit"] == "contain" and spec["filters"] == ["blur"]
    assert spec["format"] == "jpeg" and spec["quality"] == 85
    assert data["counts"] == {"discovered": 4, "ok": 2, "failed": 1, "skipped": 1}
    assert data["duration_s"] == 1.235
    assert data["images_file"] == "images.jsonl"
    failure = {"source": "broken<b>.jpg", "status": "failed",
               "error": "cannot decode JPEG: image file is truncated"}
    assert data["failures"] == [failure]

    lines = dest.read(f"{RUN}/images.jsonl").decode("utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    by_source = {entry["source"]: entry for entry in records}
    assert [entry["source"] for entry in records] == sorted(by_source) and len(records) == 4
    ok = by_source[HOSTILE]
    assert ok == {"source": HOSTILE, "status": "ok", "width": 40, "height": 30,
                  "outputs": {"resized": f"resized/{HOSTILE}", "blur": f"blur/{HOSTILE}"}}
    for path in ok["outputs"].values():  # output paths are relative to the run folder
        assert dest.exists(f"{RUN}/{path}")
    assert by_source["broken<b>.jpg"] == failure
    assert by_source[KEPT] == {"source": KEPT, "status": "skipped", "width": 40, "height": 30,
                               "outputs": {"resized": f"resized/{KEPT}"}}


def test_report_json_is_the_summary_with_one_line_per_failure(report, dest):
    build_gallery(report, dest)
    text = dest.read(f"{RUN}/report.json").decode("utf-8")
    assert json.loads(text) == json.loads(json.dumps(report.to_json_dict()))
    lines = text.splitlines()
    for image in report.failures:  # each failure is one line, readable and greppable
        entry = json.dumps(image.report_entry(), separators=(", ", ": "))
        assert sum(line.strip().rstrip(",") == entry for line in lines) == 1, entry
    empty = RunReport.build(report.job, 0, [], 0.5)
    assert json.loads(empty.to_json()) == json.loads(json.dumps(empty.to_json_dict()))
    assert empty.to_jsonl() == ""


def test_a_report_of_many_failures_keeps_the_first_thousand_and_the_total(dest):
    job = Job(source="/photos", destination=dest.uri, run="bad")
    images = [ImageResult(source=f"f{number:05d}.jpg", status="failed", error="truncated")
              for number in range(1500)]
    images.append(ImageResult(source="ok.jpg", status="ok", width=4, height=3,
                              outputs={"resized": "resized/ok.jpg"}))
    report = RunReport.build(job, 1501, images, 2.0)
    data = json.loads(report.to_json())
    assert data["counts"]["failed"] == 1500
    assert [entry["source"] for entry in data["failures"]] == \
        [f"f{number:05d}.jpg" for number in range(1000)]
    records = [json.loads(line) for line in report.to_jsonl().splitlines()]
    assert len(records) == 1501 and sum(r["status"] == "failed" for r in records) == 1500


def test_a_shards_records_have_a_file_of_their_own(dest):
    job = Job(source="/photos", destination=dest.uri, run="s", shard_index=1, shard_count=3)
    report = RunReport.build(job, 1, [ImageResult(source="a.jpg", status="failed",
                                                  error="truncated")], 1.0)
    build_gallery(report, dest)
    data = json.loads(dest.read("s/report-shard-1-of-3.json"))
    assert data["images_file"] == "images-shard-1-of-3.jsonl"
    assert json.loads(dest.read("s/images-shard-1-of-3.jsonl")) == data["failures"][0]
    assert not dest.exists("s/images.jsonl")


def test_missing_resized_file_does_not_break_the_gallery(report, dest):
    (dest.root / RUN / "resized" / HOSTILE).unlink()
    build_gallery(report, dest)
    sheet = decode(dest.read(f"{RUN}/gallery/contact-sheet-01.jpg"))
    assert sheet.size == (6 * 208, 178)
    assert dest.exists(f"{RUN}/report.json")


def test_many_images_make_several_sheets(dest):
    job = Job(source="/photos", destination=dest.uri, run="many")
    tile = encode(Image.new("RGB", (20, 15), RED), "jpeg")
    images = []
    for number in range(49):  # one more than a 6 x 8 sheet holds
        path = f"resized/{number:02d}.jpg"
        dest.write(f"many/{path}", tile, "image/jpeg")
        images.append(ImageResult(source=f"{number:02d}.jpg", status="ok", width=20, height=15,
                                  outputs={"resized": path}))
    build_gallery(RunReport.build(job, 49, images, 0.5), dest)
    assert decode(dest.read("many/gallery/contact-sheet-01.jpg")).size == (6 * 208, 8 * 178)
    assert decode(dest.read("many/gallery/contact-sheet-02.jpg")).size == (6 * 208, 178)
    page = dest.read("many/gallery/index.html").decode()
    assert 'href="contact-sheet-02.jpg"' in page
    # a re-run after a source was deleted: one sheet left, and only it in the gallery
    build_gallery(RunReport.build(job, 48, images[:48], 0.5), dest)
    assert not dest.exists("many/gallery/contact-sheet-02.jpg")
    assert 'contact-sheet-02' not in dest.read("many/gallery/index.html").decode()
    assert dest.exists("many/gallery/contact-sheet-01.jpg")


def test_a_shard_drops_only_its_own_sheets_past_its_count(dest):
    job = Job(source="/photos", destination=dest.uri, run="many", shard_index=1,
              shard_count=2)
    tile = encode(Image.new("RGB", (20, 15), RED), "jpeg")
    images = []
    for number in range(49):
        path = f"resized/{number:02d}.jpg"
        dest.write(f"many/{path}", tile, "image/jpeg")
        images.append(ImageResult(source=f"{number:02d}.jpg", status="ok", width=20, height=15,
                                  outputs={"resized": path}))
    other = "many/gallery/contact-sheet-02-shard-2-of-2.jpg"  # the other shard's
    dest.write(other, tile, "image/jpeg")
    build_gallery(RunReport.build(job, 49, images, 0.5), dest)
    mine = "many/gallery/contact-sheet-02-shard-1-of-2.jpg"
    assert dest.exists(mine)
    build_gallery(RunReport.build(job, 48, images[:48], 0.5), dest)
    assert not dest.exists(mine)
    assert dest.exists("many/gallery/contact-sheet-01-shard-1-of-2.jpg") and dest.exists(other)


def test_a_contact_sheet_is_drawn_again_only_when_its_tiles_change(report, dest):
    build_gallery(report, dest)
    sheet = dest.root / RUN / "gallery/contact-sheet-01.jpg"
    first = sheet.stat().st_mtime_ns
    build_gallery(report, dest)  # a re-run with the same images: the sheet is kept
    assert sheet.stat().st_mtime_ns == first
    fewer = report.model_copy(update={"images": [i for i in report.images if i.source != KEPT]})
    build_gallery(fewer, dest)
    assert sheet.stat().st_mtime_ns != first
    assert decode(dest.read(f"{RUN}/gallery/contact-sheet-01.jpg")).getpixel(
        (2 * 208 + 104, 79)) == pytest.approx((32, 32, 32), abs=20)  # the third tile is gone


def test_prefect_does_not_walk_the_per_image_records_of_a_report(report):
    """A flow's return value is walked field by field for futures; the images are skipped,
    and nothing else changes: the report still serializes every image."""
    from prefect.utilities.collections import visit_collection

    seen = []
    visit_collection(report, lambda expr: seen.append(expr) or expr, return_data=False)
    assert not any(isinstance(expr, type(report.images[0])) for expr in seen)
    assert report.counts in seen
    assert len(report.model_dump()["images"]) == len(report.images) == 4


def test_the_ui_summary_counts_made_kept_and_failed(report):
    from pixelmill import summary

    text = summary.markdown(report, f"{RUN}/gallery/index.html")
    assert "**2 made**, **1 failed**, 1 kept from an earlier run, of 4 discovered" in text
    # a file:// link does not open from the UI: the command that serves the gallery does
    assert f"`pixelmill gallery {report.destination}/{RUN}`" in text
    assert "file://" not in text


def test_each_image_with_filters_has_a_side_by_side_view_without_script(report, dest):
    build_gallery(report, dest)
    page = dest.read(f"{RUN}/gallery/index.html").decode("utf-8")
    found = _links(page)
    assert found.anchors and all(anchor[1:] in found.ids for anchor in found.anchors)
    # the two images with a blur output get a view; the kept one (resized only) does not
    views = re.findall(r'<section id="(c\d+)" class="compare">(.*?)</section>', page)
    assert len(views) == 2
    for _, view in views:
        panels = re.findall(r'url\(&quot;\.\./([^&]+)&quot;\)"><span>([^<]+)</span>', view)
        assert [folder for _, folder in panels] == ["resized", "blur"]
        for path, _ in panels:
            assert (dest.root / RUN / unquote(path)).is_file()
    assert "<script" not in page and ".compare:target{display:block}" in page


def test_sheets_drawn_while_the_run_goes_on_are_final_and_kept_by_the_gallery(dest):
    """130 images in chunks of 20 (every 7th kept from an earlier run, two failed): a sheet is
    drawn once every image that sorts into it is decided, whatever order chunks finish in,
    and the gallery at the end rewrites none of them and draws only the last one."""
    from pixelmill.gallery import PER_SHEET, SheetsAhead
    from pixelmill.models import Chunk, ChunkItem

    job = Job(source="/photos", destination=dest.uri, run="ahead")
    tile = encode(Image.new("RGB", (20, 15), RED), "jpeg")
    kept, made, items = [], {}, []
    for number in range(130):
        source, path = f"{number:03d}.jpg", f"resized/{number:03d}.jpg"
        dest.write(f"ahead/{path}", tile, "image/jpeg")
        if number % 7 == 0:
            kept.append(ImageResult(source=source, status="skipped", width=20, height=15,
                                    outputs={"resized": path}))
            continue
        items.append(ChunkItem(source=source, output=f"{number:03d}.jpg"))
        made[source] = (ImageResult(source=source, status="failed", error="bad")
                        if number in (3, 50) else
                        ImageResult(source=source, status="ok", width=20, height=15,
                                    outputs={"resized": path}))
    chunks = [Chunk(index=n, items=tuple(items[start:start + 20]))
              for n, start in enumerate(range(0, len(items), 20))]
    sheets = dest.root / "ahead" / "gallery"
    with SheetsAhead(job, dest, kept, chunks) as ahead:
        for index in (1, 2, 0):  # chunk 0 last: nothing is final before it
            ahead.chunk_done(index, [made[item.source] for item in chunks[index].items])
            if index != 0:
                assert ahead.drawn == 0
        assert ahead.drawn == 1  # 0..2 decide images 000..069: 68 shown, one full sheet
        for index in range(3, len(chunks)):
            ahead.chunk_done(index, [made[item.source] for item in chunks[index].items])
    assert ahead.drawn == 2  # 128 shown: sheets 1 and 2 full, the third is the gallery's
    drawn = {path.name: path.stat().st_mtime_ns for path in sheets.glob("contact-sheet-*")}
    assert set(drawn) == {"contact-sheet-01.jpg", "contact-sheet-02.jpg"}
    report = RunReport.build(job, 130, [*kept, *made.values()], 1.0)
    assert len(report.shown) == 128 and 2 * PER_SHEET < 128
    build_gallery(report, dest)
    after = {path.name: path.stat().st_mtime_ns for path in sheets.glob("contact-sheet-*")}
    assert after["contact-sheet-01.jpg"] == drawn["contact-sheet-01.jpg"]
    assert after["contact-sheet-02.jpg"] == drawn["contact-sheet-02.jpg"]
    assert "contact-sheet-03.jpg" in after


def _many(dest: LocalStorage, run: str, count: int, filters: tuple[str, ...] = ()) -> RunReport:
    job = Job(source="/photos", destination=dest.uri, run=run,
              spec=PipelineSpec(size=(20, 15), filters=filters))
    tile = encode(Image.new("RGB", (20, 15), BLUE), "jpeg")
    images = []
    for number in range(count):
        source = f"{number:03d}-{HOSTILE}" if number == 4 else f"{number:03d}.jpg"
        outputs = {folder: f"{folder}/{source}" for folder in ("resized", *filters)}
        for path in outputs.values():
            dest.write(f"{run}/{path}", tile, "image/jpeg")
        images.append(ImageResult(source=source, status="ok", width=20, height=15,
                                  outputs=outputs))
    images.append(ImageResult(source="bad<i>.jpg", status="failed", error="truncated"))
    return RunReport.build(job, count + 1, images, 0.5)


def test_a_gallery_of_more_images_than_a_page_is_an_index_and_pages(dest):
    report = _many(dest, "paged", 7, ("blur",))
    build_gallery(report, dest, page_size=3)
    gallery = dest.root / "paged" / "gallery"
    index = (gallery / "index.html").read_text()
    assert "<figure" not in index and "Failed (1)" in index and "bad&lt;i&gt;.jpg" in index
    links = _links(index).links
    assert [link for link in links if link.startswith("page-")] == [
        "page-001.html", "page-002.html", "page-003.html"]
    figures, ids = [], set()
    for number in (1, 2, 3):
        page = (gallery / f"page-{number:03d}.html").read_text()
        parsed = _links(page)
        assert not ids & parsed.ids  # ids are unique across pages
        ids |= parsed.ids
        figures += re.findall(r'<span class="name">([^<]*)</span>', page)
        for link in parsed.links:  # every link of a page resolves to a written file
            assert (gallery / unquote(link)).resolve().is_file(), link
        assert {anchor[1:] for anchor in parsed.anchors} <= parsed.ids
        assert "<img src=x" not in page  # the hostile name is text
    assert len(figures) == 7 and figures[0] == "000.jpg"
    assert "next page" in (gallery / "page-001.html").read_text()
    assert "previous page" in (gallery / "page-003.html").read_text()
    before = {path.name: path.stat().st_mtime_ns for path in gallery.glob("page-*")}
    again = report.model_copy(update={"duration_s": 9.9})  # another run, the same images
    build_gallery(again, dest, page_size=3)  # no page is rewritten, the index is
    assert {path.name: path.stat().st_mtime_ns for path in gallery.glob("page-*")} == before
    assert "in 9.9 s" in (gallery / "index.html").read_text()
    # one image kept now instead of made: only its page is drawn again, with the mark
    images = list(again.images)
    images[4] = images[4].model_copy(update={"status": "skipped"})
    kept = again.model_copy(update={"images": images})
    build_gallery(kept, dest, page_size=3)
    after = {path.name: path.stat().st_mtime_ns for path in gallery.glob("page-*")}
    assert [name for name in sorted(after) if after[name] != before[name]] == ["page-002.html"]
    assert '<span class="kept"' in (gallery / "page-002.html").read_text()
    build_gallery(report, dest)  # all on one page again: the pages go
    assert not list(gallery.glob("page-*")) and "<figure" in (gallery / "index.html").read_text()


def test_a_page_of_500_images_stays_small(dest):
    from pixelmill.gallery import PAGE_SIZE, render_index, render_page

    report = _many(dest, "big", PAGE_SIZE + 1, ("blur", "sharpen", "emboss", "contour"))
    page = render_page(report, 1, 2, 0, report.shown[:PAGE_SIZE])
    assert page.count("<figure") == PAGE_SIZE and len(page.encode()) < 2_000_000
    assert render_index(report, []).count("<figure") == 0


def test_files_that_are_not_images_are_counted_by_extension_in_the_report(tmp_path):
    from pixelmill import pipeline, summary
    from pixelmill.samples import jpeg_bytes, photo
    from pixelmill.localstorage import LocalStorage

    source = tmp_path / "src"
    (source / "docs").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "c.TXT", "docs/readme", "docs/x.pdf"):
        (source / name).write_bytes(b"hello, not a picture")
    (source / "p.jpg").write_bytes(jpeg_bytes(photo(16, 12)))
    job = Job(source=str(source), destination=str(tmp_path / "dst"), run="r")
    plan = pipeline.discover(LocalStorage(source), LocalStorage(tmp_path / "dst"), job,
                             write_manifest=False)
    assert plan.not_images == {".txt": 3, "": 1, ".pdf": 1} and plan.discovered == 1
    report = RunReport.build(job, plan.discovered, list(plan.kept), 1.0,
                             not_images=plan.not_images)
    document = report.to_json_dict()
    assert document["not_images"] == {"total": 5, "by_extension": {".txt": 3, "": 1,
                                                                   ".pdf": 1}}
    assert list(document["not_images"]["by_extension"]) == [".txt", "", ".pdf"]  # most first
    line = "5 files not images: 3 .txt, 1 without an extension, 1 .pdf"
    assert report.not_images_line() == line
    assert line in summary.markdown(report, "r/gallery/index.html")
    assert RunReport.build(job, 0, [], 1.0).not_images_line() is None


@pytest.mark.parametrize("size", [(400, 300), (300, 200), (320, 240), (2000, 1500), (90, 60)])
def test_a_tile_decoded_small_still_fills_three_quarters_of_its_box(dest, size):
    """Tiles are decoded at a reduced JPEG scale (shrink-on-load), never so far that the
    tile comes out under 3/4 of its 200x150 box (or under the output's own size)."""
    job = Job(source="/photos", destination=dest.uri, run="tiles")
    dest.write("tiles/resized/a.jpg", encode(Image.new("RGB", size, RED), "jpeg"),
               "image/jpeg")
    image = ImageResult(source="a.jpg", status="ok", width=size[0], height=size[1],
                        outputs={"resized": "resized/a.jpg"})
    build_gallery(RunReport.build(job, 1, [image], 0.5), dest)
    sheet = decode(dest.read("tiles/gallery/contact-sheet-01.jpg"))
    slot = sheet.crop((4, 4, 4 + 200, 4 + 150)).convert("L")
    drawn = slot.point(lambda value: 255 if value > 50 else 0).getbbox()  # red is ~85 in L
    width, height = drawn[2] - drawn[0], drawn[3] - drawn[1]
    scale = min(200 / size[0], 150 / size[1], 1.0)
    assert width >= min(150, size[0] * scale) - 2 and height >= min(112, size[1] * scale) - 2
    assert width <= 200 and height <= 150


def test_the_records_come_before_the_gallery_and_the_report_last(report, dest, monkeypatch):
    """A run that dies while its gallery is written leaves no index newer than its records:
    images.jsonl first, then the sheets, pages and index, report.json (which names them) last."""
    written = []
    write = dest.write
    monkeypatch.setattr(dest, "write", lambda key, *args, **kwargs: written.append(
        key.rsplit("/", 1)[-1]) or write(key, *args, **kwargs))
    build_gallery(report, dest)
    assert written[0] == "images.jsonl" and written[-1] == "report.json"
    assert written.index("index.html") == len(written) - 2
    assert "contact-sheet-01.jpg" in written
