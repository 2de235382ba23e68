"""Synthetic, photo-like sample images for the demo, the tests and the benchmarks."""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

# (width, height, EXIF orientation) of the demo set: landscape, portrait, square, panorama,
# small (no upscaling), and sideways-stored camera shots that only EXIF turns upright.
DEMO_SHAPES: list[tuple[int, int, int]] = [
    (1600, 1200, 1), (1200, 1600, 1), (2400, 1600, 1), (1000, 1000, 1), (3000, 1000, 1),
    (640, 480, 1), (1600, 1200, 6), (1600, 1200, 8), (1600, 1200, 3), (1200, 900, 2),
    (1200, 900, 5), (1200, 900, 7), (1200, 900, 4), (300, 200, 1), (2000, 1500, 1),
    (1500, 2000, 1), (1800, 1200, 1), (1024, 768, 6), (800, 1200, 1), (1600, 900, 1),
    (900, 1600, 1), (2048, 1536, 1), (1280, 720, 1),
]
_PALETTES = [
    ((255, 183, 94), (80, 40, 120)),   # sunset
    ((120, 200, 255), (20, 70, 40)),   # sky over forest
    ((250, 240, 200), (30, 90, 140)),  # beach
    ((200, 220, 255), (90, 90, 110)),  # mountains
    ((255, 220, 230), (120, 40, 60)),  # blossom
]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: a sky gradient, hills, a sun, soft shapes and sensor noise."""
    rng = random.Random(seed)
    top, bottom = _PALETTES[seed % len(_PALETTES)]
    gradient = Image.linear_gradient("L").resize((width, height))
    image = Image.composite(Image.new("RGB", (width, height), bottom),
                            Image.new("RGB", (width, height), top), gradient)
    draw = ImageDraw.Draw(image)
    sun_r = max(4, min(width, height) // 10)
    sun_x, sun_y = rng.randint(sun_r, width - sun_r), rng.randint(sun_r, height // 2)
    draw.ellipse((sun_x - sun_r, sun_y - sun_r, sun_x + sun_r, sun_y + sun_r), fill=(255, 245, 210))
    for layer in range(3):
        shade = tuple(max(0, c - 40 * layer) for c in bottom)
        base = height * (0.55 + 0.12 * layer)
        points = [(0, height)]
        for step in range(0, 11):
            points.append((width * step / 10, base + rng.uniform(-0.12, 0.12) * height))
        points.append((width, height))
        draw.polygon(points, fill=shade)
    for _ in range(12):
        x, y = rng.randint(0, width), rng.randint(0, height)
        r = rng.randint(max(2, width // 80), max(3, width // 25))
        colour = tuple(rng.randint(40, 255) for _ in range(3))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(max(1, width // 800)))
    noise = Image.effect_noise((width, height), 12).convert("RGB")
    return Image.blend(image, noise, 0.06)


def jpeg_bytes(image: Image.Image, quality: int = 90, orientation: int = 1) -> bytes:
    """Encode as JPEG; with an EXIF orientation the pixels are stored turned so that the
    orientation tag is what makes them upright (as a camera does)."""
    stored = _store_for_orientation(image, orientation)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


_INVERSE = {
    2: [Image.Transpose.FLIP_LEFT_RIGHT],
    3: [Image.Transpose.ROTATE_180],
    4: [Image.Transpose.FLIP_TOP_BOTTOM],
    5: [Image.Transpose.TRANSPOSE],
    6: [Image.Transpose.ROTATE_90],
    7: [Image.Transpose.TRANSVERSE],
    8: [Image.Transpose.ROTATE_270],
}


def _store_for_orientation(upright: Image.Image, orientation: int) -> Image.Image:
    """The stored pixels whose EXIF orientation `orientation` displays as `upright`."""
    stored = upright
    for step in _INVERSE.get(orientation, []):
        stored = stored.transpose(step)
    return stored


def alpha_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG with a transparent background and a soft-edged subject."""
    image = photo(width, height, seed).convert("RGBA")
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).ellipse((width * 0.1, height * 0.1, width * 0.9, height * 0.9), fill=255)
    image.putalpha(mask.filter(ImageFilter.GaussianBlur(max(2, width // 60))))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_demo_set(folder: Path) -> list[Path]:
    """Write the demo's 24 photos (23 JPEGs in sub-folders, some EXIF-rotated, one alpha PNG)."""
    paths = []
    for number, (width, height, orientation) in enumerate(DEMO_SHAPES):
        album = ("trips", "family", "garden")[number % 3]
        path = folder / album / f"photo-{number:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(photo(width, height, seed=number), orientation=orientation))
        paths.append(path)
    logo = folder / "logo-with-alpha.png"
    logo.write_bytes(alpha_png(900, 900, seed=99))
    paths.append(logo)
    return paths
