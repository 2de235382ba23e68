"""Named filters: one name, one Pillow operation. `gaussian-blur:3` carries a radius."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageFilter

from pixelmill.errors import UsageError

# Radii above this blur a 400x300 image into a flat colour and cost seconds per image.
MAX_RADIUS = 50.0
DEFAULT_RADIUS = 2.0

_KERNELS: dict[str, ImageFilter.Filter | type[ImageFilter.Filter]] = {
    "blur": ImageFilter.BLUR,
    "sharpen": ImageFilter.SHARPEN,
    "contour": ImageFilter.CONTOUR,
    "emboss": ImageFilter.EMBOSS,
    "detail": ImageFilter.DETAIL,
    "edge-enhance": ImageFilter.EDGE_ENHANCE,
    "smooth": ImageFilter.SMOOTH,
}
_WITH_RADIUS: dict[str, Callable[[float], ImageFilter.Filter]] = {
    "gaussian-blur": lambda radius: ImageFilter.GaussianBlur(radius),
    "unsharp-mask": lambda radius: ImageFilter.UnsharpMask(radius=radius),
}
FILTER_NAMES: tuple[str, ...] = (*_KERNELS, *_WITH_RADIUS)


def _split(spec: str) -> tuple[str, float | None]:
    name, _, radius_text = spec.strip().lower().partition(":")
    if name not in FILTER_NAMES:
        raise UsageError(
            f"--filter {spec!r}: unknown filter; choose from {', '.join(FILTER_NAMES)}"
        )
    if not radius_text:
        return name, None
    if name not in _WITH_RADIUS:
        raise UsageError(f"--filter {spec!r}: {name} takes no radius")
    try:
        radius = float(radius_text)
    except ValueError:
        raise UsageError(f"--filter {spec!r}: radius must be a number, e.g. {name}:3") from None
    if not 0 < radius <= MAX_RADIUS:
        raise UsageError(f"--filter {spec!r}: radius must be in (0, {MAX_RADIUS:g}]")
    return name, radius


def canonical_filter(spec: str) -> str:
    """Validate a filter spec and return its canonical spelling ('gaussian-blur:3')."""
    name, radius = _split(spec)
    return name if radius is None else f"{name}:{radius:g}"


def filter_folder(spec: str) -> str:
    """The output folder (and report key) of a filter: 'gaussian-blur:3' -> 'gaussian-blur-3'."""
    return canonical_filter(spec).replace(":", "-")


def make_filter(spec: str) -> ImageFilter.Filter | type[ImageFilter.Filter]:
    """The Pillow filter object for a spec."""
    name, radius = _split(spec)
    if name in _KERNELS:
        return _KERNELS[name]
    return _WITH_RADIUS[name](DEFAULT_RADIUS if radius is None else radius)


def apply_filter(image: Image.Image, spec: str) -> Image.Image:
    """Apply one named filter; alpha is kept unfiltered so edges do not bleed into it."""
    kernel = make_filter(spec)
    if image.mode in ("RGBA", "LA"):
        *colour, alpha = image.split()
        base = Image.merge("RGB" if image.mode == "RGBA" else "L", colour)
        filtered = base.filter(kernel)
        return Image.merge(image.mode, (*filtered.split(), alpha))
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return image.filter(kernel)
