"""Shared test helpers: PSNR similarity, encoding, and test images in every Pillow mode."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageStat

from pixelmill.samples import photo

# Modes the factory makes; "P-transparent" is a palette image with a tRNS index in use.
MODES = ("RGB", "RGBA", "L", "LA", "P", "P-transparent", "CMYK", "I;16", "I", "1", "F")
# Modes whose pixels have (some) transparency.
ALPHA_MODES = {"RGBA", "LA", "P-transparent"}
# Modes with more than 8 bits per sample; the factory fills them with a full-range gradient.
HIGH_BIT_MODES = {"I;16", "I", "F"}
SIZE = (64, 48)


def _common_mode(a: Image.Image, b: Image.Image) -> str:
    if "A" in a.getbands() or "A" in b.getbands():
        return "RGBA"
    if a.mode == b.mode == "L":
        return "L"
    return "RGB"


def psnr(a: Image.Image, b: Image.Image) -> float:
    """Peak signal-to-noise ratio in dB between two same-size 8-bit images (inf if equal)."""
    if a.size != b.size:
        raise AssertionError(f"sizes differ: {a.size} != {b.size}")
    mode = _common_mode(a, b)
    diff = ImageChops.difference(a.convert(mode), b.convert(mode))
    stat = ImageStat.Stat(diff)
    mse = sum(stat.sum2) / (len(stat.sum2) * a.width * a.height)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def assert_image_similar(a: Image.Image, b: Image.Image, min_psnr: float) -> None:
    """Fail unless `a` and `b` have the same size and a PSNR of at least `min_psnr` dB."""
    assert a.size == b.size, f"sizes differ: {a.size} != {b.size}"
    value = psnr(a, b)
    assert value >= min_psnr, f"PSNR {value:.1f} dB < {min_psnr} dB"


def encode(image: Image.Image, fmt: str, **opts: object) -> bytes:
    """`image` saved in Pillow format `fmt` ('png', 'JPEG', ...) with save options."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **opts)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """Fully decoded image from bytes (Pillow's own reader, no pixelmill code)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def grey_gradient(size: tuple[int, int] = SIZE) -> Image.Image:
    """An 8-bit vertical black-to-white gradient (mean ~127)."""
    return Image.linear_gradient("L").resize(size)


def gradient16(size: tuple[int, int], top: int) -> Image.Image:
    """An I;16 horizontal gradient from 0 to `top` (inclusive)."""
    width, height = size
    row = [x * top // (width - 1) for x in range(width)]
    return Image.frombytes("I;16", size, struct.pack(f"<{width * height}H", *(row * height)))


def make_image(mode: str, size: tuple[int, int] = SIZE, seed: int = 0) -> Image.Image:
    """A test image in `mode` (see MODES); photo-like for colour modes, a gradient for >8 bit."""
    base = photo(*size, seed=seed)
    if mode == "RGB":
        return base
    if mode in ("RGBA", "LA"):
        rgba = base.convert("RGBA")
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).ellipse((size[0] // 4, 0, size[0] - 1, size[1] - 1), fill=255)
        rgba.putalpha(mask)
        return rgba if mode == "RGBA" else rgba.convert("LA")
    if mode == "L":
        return base.convert("L")
    if mode == "P":
        return base.quantize(colors=64)
    if mode == "P-transparent":
        image = base.quantize(colors=16)
        image.putpalette(image.getpalette()[: 16 * 3] + [0, 255, 0])
        ImageDraw.Draw(image).rectangle((0, 0, size[0] // 2 - 1, size[1] - 1), fill=16)
        image.info["transparency"] = 16
        return image
    if mode == "CMYK":
        return base.convert("CMYK")
    if mode == "1":
        return base.convert("1")
    grey = grey_gradient(size)
    if mode == "I;16":
        return grey.convert("I").point(lambda value: value * 257).convert("I;16")
    if mode == "I":
        return grey.convert("I").point(lambda value: value * 257)
    if mode == "F":
        return grey.convert("F").point(lambda value: value * 257.0)
    raise ValueError(f"no factory for mode {mode!r}")


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk: length, type, payload, CRC-32 of type + payload."""
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, hand-written 8-bit grey PNG whose header declares width x height."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def _with_images(report: dict, records: bytes) -> dict:
    """`report` with its per-image records (images.jsonl) under "images", checked against the
    contract: one record a line sorted by source, and the failed ones repeated in
    report.json's "failures"."""
    lines = records.decode("utf-8").splitlines()
    images = [json.loads(line) for line in lines]
    assert [image["source"] for image in images] == sorted(image["source"] for image in images)
    failed = [image for image in images if image["status"] == "failed"]
    assert report["failures"] == failed[: len(report["failures"])]
    assert len(report["failures"]) == min(len(failed), 1000)
    assert len(images) == sum(report["counts"][k] for k in ("ok", "failed", "skipped"))
    return {**report, "images": images}


def load_report(path: Path) -> dict:
    """A local run's report.json (`path`) with its per-image records under "images"."""
    report = json.loads(path.read_text())
    return _with_images(report, (path.parent / report["images_file"]).read_bytes())


def load_report_blob(bucket, name: str) -> dict:
    """The same for a report in a bucket (a google.cloud.storage Bucket)."""
    report = json.loads(bucket.blob(name).download_as_bytes())
    folder = name.rpartition("/")[0]
    return _with_images(report, bucket.blob(f"{folder}/{report['images_file']}")
                        .download_as_bytes())
