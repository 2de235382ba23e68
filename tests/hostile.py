"""A hostile corpus, made in code: every kind of bad, odd or dangerous input we have met.

`KINDS` maps a source key to (content builder, expected outcome). Outcomes: "ok", "ok-note"
(processed, with a note in the report), or "failed:<words the reason must contain>".
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable

from PIL import Image, ImageCms

from pixelmill.samples import jpeg_bytes, photo

XSS = '<img src=x onerror=alert(1)>'


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _small(seed: int = 0) -> Image.Image:
    return photo(240, 180, seed=seed)


def _bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A 100-byte PNG that declares 30000x30000 pixels (900 MP)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _animated(fmt: str) -> bytes:
    frames = [_small(seed).convert("RGB" if fmt == "WEBP" else "P") for seed in range(3)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def _palette_with_transparency() -> bytes:
    image = _small(3).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return _save(image, "PNG", transparency=0)


def _huge_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60000  # ImageDescription: 60 kB of EXIF
    exif[0x0112] = 1
    return _save(_small(4), "JPEG", exif=exif.tobytes(), quality=85)


def _huge_icc() -> bytes:
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    padded = profile + b"\x00" * 300_000  # a 300 kB profile block
    return _save(_small(5), "JPEG", icc_profile=padded)


def _cmyk() -> bytes:
    return _save(_small(6).convert("CMYK"), "JPEG", quality=90)


def _gray16() -> bytes:
    gradient = Image.linear_gradient("L").resize((256, 64)).convert("I")
    return _save(gradient.point(lambda v: v * 257).convert("I;16"), "PNG")


def _truncated(fmt: str) -> bytes:
    whole = _save(_small(7), fmt)
    return whole[: len(whole) // 2]


Builder = Callable[[], bytes]
GOOD_JPEG: Builder = lambda: jpeg_bytes(_small(1))  # noqa: E731

KINDS: dict[str, tuple[Builder, str]] = {
    "empty.jpg": (lambda: b"", "failed:empty"),
    "truncated.jpg": (lambda: _truncated("JPEG"), "failed:truncated"),
    "truncated.png": (lambda: _truncated("PNG"), "failed:"),
    "notes.jpg": (lambda: b"just some text, not a picture\n", "failed:text"),
    "paper.png": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", "failed:PDF"),
    "zip.jpg": (lambda: b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(range(40)), "failed:not an image"),
    "really-a-jpeg.png": (GOOD_JPEG, "ok"),
    "bomb.png": (_bomb_png, "failed:MP"),
    "wide.png": (lambda: _save(Image.linear_gradient("L").resize((20000, 1)), "PNG"), "ok"),
    "cmyk.jpg": (_cmyk, "ok"),
    "gray16.png": (_gray16, "ok"),
    "palette-alpha.png": (_palette_with_transparency, "ok"),
    "la.png": (lambda: _save(_small(8).convert("LA"), "PNG"), "ok"),
    "animated.gif": (lambda: _animated("GIF"), "ok-note:first frame"),
    "animated.webp": (lambda: _animated("WEBP"), "ok-note:first frame"),
    "huge-exif.jpg": (_huge_exif, "ok"),
    "huge-icc.jpg": (_huge_icc, "ok"),
    "photo.avif": (lambda: _save(_small(10), "AVIF", quality=60), "ok"),
    "scan.tif": (lambda: _save(_small(11), "TIFF"), "ok"),
    "old.bmp": (lambda: _save(_small(12), "BMP"), "ok"),
    "with space and ünïcødé 日本.jpg": (GOOD_JPEG, "ok"),
    "hash#and?query%20.jpg": (GOOD_JPEG, "ok"),
    "quotes \"double\" 'single'.jpg": (GOOD_JPEG, "ok"),
    f"{XSS}.jpg": (GOOD_JPEG, "ok"),
    "trips/same.jpg": (GOOD_JPEG, "ok"),
    "family/same.jpg": (lambda: jpeg_bytes(_small(2)), "ok"),
    **{f"exif/orientation-{n}.jpg": ((lambda n=n: jpeg_bytes(photo(300, 200, seed=20 + n),
                                                          orientation=n)), "ok")
       for n in range(1, 9)},
}
# Object keys only a bucket can hold: they must never write outside the destination.
GCS_ONLY: dict[str, tuple[Builder, str]] = {
    "../escape.jpg": (GOOD_JPEG, "ok"),
    "/leading-slash.jpg": (GOOD_JPEG, "ok"),
    "deep/../../../up.jpg": (GOOD_JPEG, "ok"),
}


def expected(outcome: str) -> tuple[str, str]:
    status, _, words = outcome.partition(":")
    return status, words


def build() -> dict[str, bytes]:
    return {key: builder() for key, (builder, _) in KINDS.items()}
