"""The gallery of a run: gallery/index.html, contact sheet JPEGs, report.json and images.jsonl."""

from __future__ import annotations

import hashlib
import html
import io
import json
import logging
import os
import re
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from urllib.parse import quote

from PIL import Image, ImageDraw, ImageFont

from pixelmill import provenance
from pixelmill.models import (
    IMAGES_FILE, RECORD_ENCODER, Chunk, ImageResult, Job, RenditionResult, RunReport,
)
from pixelmill.overlap import threaded_map
from pixelmill.pipeline import read_records
from pixelmill.storage import Storage

log = logging.getLogger("pixelmill")

# Contact sheet geometry: 6 x 8 tiles of 200x150 keeps one sheet near 1200x1400 pixels.
SHEET_COLUMNS = 6
SHEET_ROWS = 8
TILE = (200, 150)
# A tile is decoded at the smallest JPEG scale that is still this big (shrink-on-load), then
# fitted into TILE: a 400x267 output decodes at 200x134 and needs no resize (0.34 ms a tile
# instead of 1.65 ms decoded whole and shrunk), and no tile comes out under 3/4 of TILE.
TILE_DECODE = (TILE[0] * 3 // 4, TILE[1] * 3 // 4)
LABEL_HEIGHT = 20
# A gallery of more images than this is an index page and pages of this many images each,
# so that no page is too big for a browser to open quickly.
PAGE_SIZE = 500
PER_SHEET = SHEET_COLUMNS * SHEET_ROWS
# Sheets are built in the flow's process from the resized outputs; beyond this many tiles
# (10 sheets) the pages are the better overview and the driver stays fast and small.
MAX_SHEET_TILES = PER_SHEET * 10
# Bump when sheets are drawn differently, so that sheets kept from earlier runs are redrawn.
SHEET_VERSION = 2


# Characters that URL quoting and HTML escaping both leave as they are.
_PLAIN = re.compile(r"[A-Za-z0-9_.~/-]*").fullmatch
_MARKUP = re.compile(r"[&<>\"']").search


def _href(path: str) -> str:
    """A relative link from gallery/ to a run-folder path, URL-quoted then HTML-escaped
    (most paths need neither: they are taken as they are)."""
    if _PLAIN(path):
        return "../" + path
    return html.escape("../" + quote(path), quote=True)


def _text(value: object) -> str:
    text = str(value)
    return html.escape(text, quote=True) if _MARKUP(text) else text


def _label(text: str, width: int = 30) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _sheet_stamp(job: Job, tiles: list[ImageResult]) -> str:
    """What a sheet shows: its tiles' sources, versions, sizes and the settings."""
    spec = job.spec.model_dump(mode="json", exclude={"filters"})
    text = json.dumps([SHEET_VERSION, spec, [(tile.source, tile.version, tile.outputs["resized"],
                                              tile.width, tile.height) for tile in tiles]])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _sheet(job: Job, destination: Storage, number: int,
           tiles: list[ImageResult], held: dict[str, str]) -> str:
    """Write contact sheet `number` of `tiles` unless the run folder holds it already, drawn
    from the same tiles (`held`: key -> stamp); returns its run-relative path."""
    key = job.run_file(f"gallery/contact-sheet-{number:02d}.jpg")
    stamp = _sheet_stamp(job, tiles)
    if held.get(key) == stamp:
        return key.removeprefix(f"{job.run}/")
    font = ImageFont.load_default(size=12)  # one per sheet: a FreeType face is not thread-safe
    rows = -(-len(tiles) // SHEET_COLUMNS)
    cell_w, cell_h = TILE[0] + 8, TILE[1] + LABEL_HEIGHT + 8
    sheet = Image.new("RGB", (SHEET_COLUMNS * cell_w, rows * cell_h), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for slot, image in enumerate(tiles):
        left, top = (slot % SHEET_COLUMNS) * cell_w + 4, (slot // SHEET_COLUMNS) * cell_h + 4
        try:
            data = destination.read(f"{job.run}/{image.outputs['resized']}")
            with Image.open(io.BytesIO(data)) as thumb:
                thumb.draft("RGB", TILE_DECODE)
                # a tile is a small preview: one cheap 2x reduction, alpha only where it
                # exists, and no copy of pixels that are in the right mode already
                mode = ("RGBA" if "A" in thumb.getbands() or "transparency" in thumb.info
                        else "RGB")
                thumb = thumb.convert(mode) if thumb.mode != mode else thumb
                thumb.thumbnail(TILE, Image.Resampling.BILINEAR, reducing_gap=2.0)
                offset = (left + (TILE[0] - thumb.width) // 2,
                          top + (TILE[1] - thumb.height) // 2)
                sheet.paste(thumb, offset, thumb if thumb.mode == "RGBA" else None)
        except (OSError, KeyError):
            draw.rectangle((left, top, left + TILE[0], top + TILE[1]), outline=(160, 40, 40))
        draw.text((left, top + TILE[1] + 4), _label(image.source), fill=(230, 230, 230),
                  font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, "JPEG", quality=85)
    destination.write(key, buffer.getvalue(), "image/jpeg", {provenance.MADE: stamp})
    return key.removeprefix(f"{job.run}/")


def contact_sheets(report: RunReport, destination: Storage,
                   held: dict[str, str] | None = None,
                   shown: list[ImageResult] | None = None) -> list[str]:
    """Write labelled contact sheets of the images shown (default: the report's); returns
    their run-relative paths.

    Sheets are drawn on one thread per core (Pillow releases the GIL while decoding and
    resizing): the gallery is built after the last chunk, when the cores are free."""
    sheets = _sheets_of(report.shown if shown is None else shown)
    if held is None:
        held = _held_gallery(destination, report.run)
    return threaded_map(lambda sheet: _sheet(report.job, destination, *sheet, held), sheets,
                        max(1, min(len(sheets), os.cpu_count() or 1)))


def _held_gallery(destination: Storage, run: str) -> dict[str, str]:
    """key -> stamp of what the run's gallery folder holds."""
    return {info.key: info.metadata.get(provenance.MADE, "")
            for info in destination.list(f"{run}/gallery/")}


def _sheets_of(shown: list[ImageResult]) -> list[tuple[int, list[ImageResult]]]:
    """(number, tiles) of each contact sheet of the images shown, in order."""
    done = shown[:MAX_SHEET_TILES]
    return [(number, done[start : start + PER_SHEET])
            for number, start in enumerate(range(0, len(done), PER_SHEET), start=1)]


class SheetsAhead:
    """Contact sheets drawn while the run goes on, on one thread of the flow's process, so
    that the gallery at the end has only the last sheets (if any) left to draw.

    Chunks hold the images to make in source order, so once chunks 0..k have finished, every
    image up to chunk k's last source is decided (made, failed or kept) and no later one can
    sort before it: each sheet that lies entirely in that prefix is final. A sheet is written
    with its stamp, and `contact_sheets` at the end keeps what is already right."""

    def __init__(self, job: Job, destination: Storage, kept: Sequence[ImageResult],
                 chunks: Sequence[Chunk]) -> None:
        self.job, self.destination = job, destination
        # the sheets show the first MAX_SHEET_TILES images in source order: no kept image
        # beyond that many can be on one
        self.kept = sorted((image for image in kept if image.status != "failed"),
                           key=lambda image: image.source)[:MAX_SHEET_TILES]
        self.kept_sources = [image.source for image in self.kept]
        self.ends = [chunk.items[-1].source for chunk in chunks if chunk.items]
        self.finished: dict[int, list[ImageResult]] = {}
        self.decided = 0  # chunks 0..decided-1 have all finished
        self.drawn = 0  # sheets handed to the thread
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="pixelmill-sheets")
        self.futures: list[Future[str]] = []

    def chunk_done(self, index: int, images: Sequence[ImageResult]) -> None:
        """Note chunk `index`'s images; draw the sheets that are now final."""
        self.finished[index] = [image for image in images if image.status != "failed"]
        while self.decided in self.finished:
            self.decided += 1
        if not self.decided or self.drawn * PER_SHEET >= MAX_SHEET_TILES:
            return
        last = self.ends[self.decided - 1]
        made = [image for number in range(self.decided) for image in self.finished[number]]
        kept = self.kept[:bisect_right(self.kept_sources, last)]
        shown = sorted(made[:MAX_SHEET_TILES] + kept, key=lambda image: image.source)
        for number, tiles in _sheets_of(shown)[self.drawn:]:
            if len(tiles) < PER_SHEET:
                break  # its last slots may still be taken
            args = (self.job, self.destination, number, tiles, {})
            self.futures.append((self.pool.submit(_sheet, *args), args))
            self.drawn = number

    def __enter__(self) -> SheetsAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Draw the sheets still waiting on every core (the chunks are done: nothing else
        needs them) and wait for them; a sheet that failed is drawn again at the end."""
        waiting = [args for future, args in self.futures if future.cancel()]
        errors = threaded_map(lambda args: _drawn(*args), waiting,
                              max(1, min(len(waiting), os.cpu_count() or 1)))
        self.pool.shutdown(wait=True)
        errors += [future.exception() for future, _ in self.futures if not future.cancelled()]
        for error in errors:
            if error is not None:
                log.warning("contact sheet drawn early failed (drawn again with the gallery): "
                            "%s", error)


def _drawn(*args) -> BaseException | None:
    """`_sheet(*args)`; what it raised, if anything."""
    try:
        _sheet(*args)
    except Exception as exc:  # noqa: BLE001 - reported by the caller, drawn again later
        return exc
    return None


# <picture> sources, the most compact first; the <img> holds the main format.
_SOURCE_ORDER = ("avif", "webp", "png", "jpeg")
_TYPES = {"avif": "image/avif", "webp": "image/webp", "png": "image/png", "jpeg": "image/jpeg"}
# How wide a figure shows: the grid's columns are 220 px or more, a phone's one column.
_SIZES = "(max-width: 480px) 100vw, 300px"


def _srcset(renditions: Sequence[RenditionResult]) -> str:
    """One candidate per width (two sizes of a small source may come out the same)."""
    widths = {rendition.width: rendition.output for rendition in reversed(renditions)}
    return ", ".join(f"{_href(path)} {width}w" for width, path in sorted(widths.items()))


def _picture(image: ImageResult) -> str:
    """The image: the main output, or in a run of several sizes and formats a <picture>
    whose browser picks the format it reads and the width the page needs."""
    img = (f' alt="{_text(image.source)}" width="{image.width}" height="{image.height}"'
           ' loading="lazy" decoding="async">')
    main = image.outputs["resized"]
    if not image.renditions:
        return f'<img src="{_href(main)}"{img}'
    main_format = image.renditions[0].format
    by_format: dict[str, list[RenditionResult]] = {}
    for rendition in image.renditions:
        by_format.setdefault(rendition.format, []).append(rendition)
    sources = "".join(
        f'<source type="{_TYPES[fmt]}" srcset="{_srcset(by_format[fmt])}" sizes="{_SIZES}">'
        for fmt in _SOURCE_ORDER if fmt in by_format and fmt != main_format)
    return (f'<picture>{sources}<img src="{_href(main)}" '
            f'srcset="{_srcset(by_format[main_format])}" sizes="{_SIZES}"{img}</picture>')


def _figure(image: ImageResult, number: int) -> str:
    resized = image.outputs["resized"]
    links = " ".join(
        f'<a href="{_href(path)}">{_text(folder)}</a>'
        for folder, path in image.outputs.items() if folder != "resized"
    )
    if len(image.outputs) > 1:
        links += f' <a class="compare-link" href="#c{number}">side by side</a>'
    if image.renditions:
        links += (f' <details class="renditions"><summary>{len(image.renditions)} '
                  "renditions</summary>" + " ".join(
                      f'<span class="r"><a href="{_href(r.output)}">{_text(r.size)} '
                      f'{_text(r.format)}</a> <span class="muted">{r.width}x{r.height}</span>'
                      "</span>" for r in image.renditions) + "</details>")
    notes = "".join(f'<p class="note">{_text(note)}</p>' for note in image.notes)
    kept = ('<span class="kept" title="made by an earlier run, verified present">kept</span>'
            if image.status == "skipped" else "")
    return (
        f'<figure id="f{number}" class="{_text(image.status)}"><a href="{_href(resized)}">'
        f"{_picture(image)}</a>"
        f"<figcaption><span class=\"name\">{_text(image.source)}</span>"
        f'<span class="links">{links}{kept}</span>{notes}</figcaption></figure>'
    )


def _compare(image: ImageResult, number: int) -> str:
    """The resized image and each filter's output side by side, shown when the page's URL
    ends in #cN (CSS :target: no script). Panels are CSS backgrounds, loaded only when
    shown, so a page of thousands of images does not load them all."""
    panels = "".join(
        f'<a class="panel" href="{_href(path)}" style="background-image:url(&quot;'
        f'{_href(path)}&quot;)"><span>{_text(folder)}</span></a>'
        for folder, path in image.outputs.items())
    return (f'<section id="c{number}" class="compare"><p><a href="#f{number}">back to the '
            f'gallery</a> · {_text(image.source)}</p><div class="panels">{panels}</div>'
            "</section>")


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#111;color:#eee}
header{padding:16px 24px;background:#1d1d1d;border-bottom:1px solid #333}
h1{font-size:20px;margin:0 0 6px} a{color:#8cf} .muted{color:#aaa}
main{padding:16px 24px}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:14px}
figure{margin:0;background:#1b1b1b;border:1px solid #2c2c2c;padding:8px}
figure img{width:100%;height:auto;max-height:200px;object-fit:contain;display:block;background:#000}
figcaption{margin-top:6px;word-break:break-all}.links a{margin-right:8px;font-size:12px}
.name{display:block}.note{color:#fc6;font-size:12px;margin:4px 0 0}
table{border-collapse:collapse;width:100%}.nav{margin:8px 0}.pages li{margin:4px 0}td,th{border:1px solid #333;padding:4px 8px;text-align:left}
.failed{color:#f88}.kept{color:#9c9;font-size:12px}
.renditions{font-size:12px;word-break:normal}.renditions .r{display:inline-block;white-space:nowrap;margin-right:8px}
.compare{display:none;position:fixed;inset:0;overflow:auto;padding:16px 24px;background:#111}
.compare:target{display:block}
.panels{display:grid;grid-template-columns:repeat(auto-fit,minmax(280px,1fr));gap:12px}
.panel{display:block;height:70vh;background:#000 center/contain no-repeat;position:relative}
.panel span{position:absolute;left:8px;top:6px;background:#000a;padding:2px 6px}
"""


def _images_html(images: Sequence[ImageResult], offset: int) -> str:
    """The figures of `images` (numbered from `offset`, so ids are unique across pages) and
    their side-by-side views."""
    grid = "".join(_figure(image, offset + n) for n, image in enumerate(images))
    compares = "".join(_compare(image, offset + n) for n, image in enumerate(images)
                       if len(image.outputs) > 1)
    return f'<div class="grid">{grid}</div>\n{compares}'


def _document(report: RunReport, title: str, header: str, body: str,
              this_run: bool = True) -> str:
    """A page of the gallery. `this_run` False leaves out what changes with every run
    (counts, duration), so that a page of images is the same until its images change."""
    counts = report.counts
    spec = report.spec
    stats = (f"""{counts.ok} made now · {counts.skipped} kept from earlier runs ·
 <span class="failed">{counts.failed} failed</span> of {counts.discovered} discovered in {report.duration_s:.1f} s ·
 """ if this_run else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pixelmill · {_text(report.run)}{title}</title><style>{_STYLE}</style></head>
<body><header><h1>pixelmill run {_text(report.run)}{title}</h1>
<div class="muted">{_text(report.source)} → {_text(report.destination)}</div>
<div>{stats}{_text(spec.sizes_text)} {_text(spec.fit)} · {_text(spec.formats_text)} q{spec.quality} ·
 filters: {_text(", ".join(spec.filters) or "none")}</div>
{header}</header><main>{body}
</main></body></html>
"""


def _pages(shown: list[ImageResult], page_size: int) -> list[tuple[int, int, list[ImageResult]]]:
    """(number, offset, images) of each page when the images do not fit on the index page."""
    if len(shown) <= page_size:
        return []
    return [(number, start, shown[start : start + page_size])
            for number, start in enumerate(range(0, len(shown), page_size), start=1)]


def _page_name(number: int) -> str:
    return f"page-{number:03d}.html"


def render_index(report: RunReport, sheets: list[str], page_size: int = PAGE_SIZE) -> str:
    """The gallery page: relative links only, every name escaped, failures with reasons
    first; the images themselves, or links to pages of `page_size` images when there are
    more."""
    shown = report.shown
    pages = [(number, len(part), part[0].source, part[-1].source)
             for number, _, part in _pages(shown, page_size)]
    return _index(report, sheets, report.failures, len(shown), None if pages else shown, pages)


def _index(report: RunReport, sheets: list[str], failed: Sequence[ImageResult],
           shown_total: int, inline: Sequence[ImageResult] | None,
           pages: Sequence[tuple[int, int, str, str]]) -> str:
    """The index page: the failures (`failed`; `report.counts.failed` of them in all), then
    the images `inline`, or the `pages` as (number, images, first source, last source)."""
    rows = "".join(
        f"<tr><td>{_text(image.source)}</td><td>{_text(image.error)}</td></tr>" for image in failed
    )
    more = report.counts.failed - len(failed)
    if more > 0:
        rows += (f'<tr><td colspan="2">… and {more} more in '
                 f'<a href="{_href(report.images_file)}">'
                 f"{_text(report.images_file)}</a></td></tr>")
    failures = (
        f'<h2 class="failed">Failed ({report.counts.failed})</h2><table><tr><th>source</th>'
        f"<th>reason</th></tr>{rows}</table>" if failed else ""
    )
    sheet_links = " ".join(
        f'<a href="{_text(quote(name.removeprefix("gallery/")))}">sheet {number}</a>'
        for number, name in enumerate(sheets, start=1)
    )
    report_file = report.job.run_file("report.json").split("/", 1)[1]
    header = (f'<div>contact sheets: {sheet_links or "none"} · <a href="{_href(report_file)}">'
              f'report.json</a> · <a href="{_href(report.images_file)}">'
              f"{_text(report.images_file)}</a></div>")
    if inline is not None:
        images = _images_html(inline, 0)
    else:
        images = '<ol class="pages">' + "".join(
            f'<li><a href="{_page_name(number)}">page {number}</a>: {count} images, '
            f"{_text(first)} … {_text(last)}</li>"
            for number, count, first, last in pages) + "</ol>"
    return _document(report, "", header,
                     f"{failures}\n<h2>Images ({shown_total})</h2>{images}")


def render_page(report: RunReport, number: int, count: int, offset: int,
                images: Sequence[ImageResult], total: int | None = None) -> str:
    """Page `number` of `count`: its images, with links to the index and its neighbours.
    `total`: the images shown in the whole gallery (default: the report's)."""
    links = ['<a href="index.html">index</a>']
    if number > 1:
        links.append(f'<a href="{_page_name(number - 1)}">previous page</a>')
    if number < count:
        links.append(f'<a href="{_page_name(number + 1)}">next page</a>')
    nav = f'<div class="nav">{" · ".join(links)}</div>'
    total = len(report.shown) if total is None else total
    return _document(report, f" · page {number} of {count}", nav,
                     f"<h2>Images {offset + 1}–{offset + len(images)} of "
                     f"{total}</h2>{_images_html(images, offset)}\n{nav}",
                     this_run=False)


# What a page is drawn with besides its images: this module's code (a change to how pages
# are drawn redraws them all).
with open(__file__, "rb") as _source:
    _CODE = hashlib.sha256(_source.read()).hexdigest()


def _page_stamp(report: RunReport, number: int, count: int, offset: int, total: int,
                records: Sequence[str]) -> str:
    """A digest of everything a page is drawn from: the run's names and settings, its place
    among the pages, and its images' records (images.jsonl's lines: every field a figure
    shows). Equal stamps, equal pages: an unchanged page is neither drawn nor written."""
    head = [_CODE, report.run, report.source, report.destination,
            report.spec.model_dump_json(), str(number), str(count), str(offset), str(total)]
    digest = hashlib.sha256("\0".join(head).encode("utf-8", "surrogatepass"))
    for record in records:
        digest.update(record.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def _write_page(report: RunReport, destination: Storage, held: dict[str, str], number: int,
                count: int, offset: int, images: Sequence[ImageResult], total: int,
                records: Sequence[str]) -> None:
    """Write a page unless the run folder holds it made from the same things (its stamp).
    `records`: the images' lines in images.jsonl."""
    key = report.job.run_file(f"gallery/{_page_name(number)}")
    stamp = _page_stamp(report, number, count, offset, total, records)
    if held.get(key) != stamp:
        page = render_page(report, number, count, offset, images, total).encode("utf-8")
        destination.write(key, page, "text/html; charset=utf-8", {provenance.MADE: stamp})


def _drop_beyond(destination: Storage, held: dict[str, str], job: Job, pages: int,
                 sheets: int) -> None:
    """Delete this run's (or shard's) pages and contact sheets past today's counts (left by a
    run of more images): the gallery folder holds only what the index links."""
    limits = []
    for name, count in (("page-{n}.html", pages), ("contact-sheet-{n}.jpg", sheets)):
        pattern = re.escape(job.run_file(f"gallery/{name}")).replace(re.escape("{n}"), r"(\d+)")
        limits.append((re.compile(pattern), count))
    for key in held:
        for pattern, count in limits:
            found = pattern.fullmatch(key)
            if found and int(found.group(1)) > count:
                destination.delete(key)


def build_gallery_of_parts(report: RunReport, destination: Storage, records: Sequence[str],
                           page_size: int = PAGE_SIZE) -> str:
    """The gallery, images.jsonl and (last) report.json of a run planned in parts, from the
    parts' record files (run-relative keys, in order): read one at a time, one page of
    images held at a time. `report.images` holds the first failures, `report.counts` all."""
    job = report.job
    destination.tidy(report.run)
    held = _held_gallery(destination, report.run)
    shown_total = report.counts.ok + report.counts.skipped
    inline: list[ImageResult] | None = [] if shown_total <= page_size else None
    count = 0 if inline is not None else -(-shown_total // page_size)
    pages: list[tuple[int, int, str, str]] = []
    page: list[ImageResult] = []
    page_records: list[str] = []
    tiles: list[ImageResult] = []

    def flush() -> None:
        nonlocal page, page_records
        _write_page(report, destination, held, len(pages) + 1, count,
                    len(pages) * page_size, page, shown_total, page_records)
        pages.append((len(pages) + 1, len(page), page[0].source, page[-1].source))
        page, page_records = [], []

    def lines() -> Iterator[bytes]:
        """images.jsonl a part at a time; the pages are written on the way."""
        for key in records:
            part = []
            for image in read_records(destination, job, key):
                record = RECORD_ENCODER.encode(image.report_entry()) + "\n"
                part.append(record)
                if image.status == "failed":
                    continue
                if len(tiles) < MAX_SHEET_TILES:
                    tiles.append(image)
                if inline is not None:
                    inline.append(image)
                    continue
                page.append(image)
                page_records.append(record)
                if len(page) == page_size:
                    flush()
            yield "".join(part).encode("utf-8")

    # the records first: report.json, written last, names them
    destination.write_stream(job.run_file(IMAGES_FILE), lines(), "application/x-ndjson")
    if page:
        flush()
    sheet_keys = contact_sheets(report, destination, held, tiles)
    _drop_beyond(destination, held, job, len(pages), len(sheet_keys))
    index_key = job.run_file("gallery/index.html")
    destination.write(index_key, _index(report, sheet_keys, report.failures, shown_total,
                                        inline, pages).encode("utf-8"),
                      "text/html; charset=utf-8")
    destination.write(job.run_file("report.json"), report.to_json().encode("utf-8"),
                      "application/json")
    return index_key


def build_gallery(report: RunReport, destination: Storage, page_size: int = PAGE_SIZE) -> str:
    """Write images.jsonl, contact sheets, the pages, index.html and (last) report.json;
    returns the index key. A page or sheet already there with the same content (its stamp)
    is not rewritten; pages beyond the count go. Leftovers of writers killed in earlier runs
    (a worker lost to the OOM killer) go first.

    The order is that of a run in parts (`build_gallery_of_parts`): the records, then what
    shows them, then the report that names them. A run that dies on the way leaves no
    gallery newer than its records."""
    destination.tidy(report.run)
    records = report.jsonl_lines()
    destination.write(report.job.run_file(IMAGES_FILE), "".join(records).encode("utf-8"),
                      "application/x-ndjson")
    held = _held_gallery(destination, report.run)
    shown = report.shown
    shown_records = [record for image, record in zip(report.images, records)
                     if image.status != "failed"]
    sheets = contact_sheets(report, destination, held, shown)
    pages = _pages(shown, page_size)
    for number, offset, images in pages:
        _write_page(report, destination, held, number, len(pages), offset, images, len(shown),
                    shown_records[offset:offset + len(images)])
    _drop_beyond(destination, held, report.job, len(pages), len(sheets))
    index_key = report.job.run_file("gallery/index.html")
    destination.write(index_key, render_index(report, sheets, page_size).encode("utf-8"),
                      "text/html; charset=utf-8")
    destination.write(report.job.run_file("report.json"),
                      report.to_json().encode("utf-8"),
                      "application/json")
    return index_key
