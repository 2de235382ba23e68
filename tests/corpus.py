"""Small input folders made in code for flow and CLI tests."""

from __future__ import annotations

from pathlib import Path

from pixelmill.samples import jpeg_bytes, photo

GOOD = {
    "trips/a.jpg": (640, 480, 1),
    "trips/b.jpg": (480, 640, 1),
    "family/a.jpg": (800, 400, 1),     # same name as trips/a.jpg: both must survive
    "family/rotated.jpg": (640, 480, 6),  # upright 640x480, stored sideways + EXIF 6
    "garden/c.jpg": (300, 200, 1),     # smaller than the box: not upscaled
    "garden/deep/d.jpg": (1000, 1000, 1),
    "e.jpg": (700, 500, 1),
}
BAD = {
    "broken.jpg": "truncated",         # a JPEG cut in half
    "garden/fake.jpg": "pdf",          # a PDF with an image name
}
IGNORED = ["notes.txt"]


def make_source(folder: Path) -> Path:
    for number, (key, (width, height, orientation)) in enumerate(sorted(GOOD.items())):
        path = folder / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(photo(width, height, seed=number), orientation=orientation))
    whole = jpeg_bytes(photo(640, 480, seed=50))
    (folder / "broken.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "garden" / "fake.jpg").write_bytes(b"%PDF-1.4\n% not a photo\n")
    (folder / "notes.txt").write_text("not an image, not named like one\n")
    return folder


def block_the_garden_folder(dest: Path, run: str) -> None:
    """A file where run `run`'s resized/garden folder must go: the chunks of garden/c.jpg and
    garden/deep/d.jpg fail for good (a destination problem), every other chunk is fine."""
    (dest / run / "resized").mkdir(parents=True)
    (dest / run / "resized" / "garden").write_text("a file where a folder must go")
