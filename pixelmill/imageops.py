"""Pure image operations: sniff, open safely, shrink-on-load resize, filter, encode.

Everything takes bytes or a PIL image plus keyword options and returns new objects;
nothing here touches storage, Prefect or Ray.
"""

from __future__ import annotations

import functools
import io
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from pixelmill.errors import ImageError
from pixelmill.filters import apply_filter, filter_folder
from pixelmill.spec import Fit, OutputFormat, PipelineSpec, Rendition

# Refuse images above this many pixels before decoding a single row: 150 MP covers the
# largest camera sensors (~100 MP) while a decompression bomb (a small PNG declaring
# 30000x30000 = 900 MP) would need gigabytes per worker. Below Pillow's own hard limit (178 MP).
MAX_PIXELS = 150_000_000
# Bytes needed to recognise every format we accept (ISO-BMFF brands sit at offset 8..12).
SNIFF_BYTES = 32
# Pillow: downscale in integer steps on the way to LANCZOS when the factor exceeds this;
# 3 is visually identical to a single LANCZOS pass (51 dB PSNR) and much faster.
REDUCING_GAP = 3.0
# Colour under transparent pixels when an output format has no alpha (JPEG).
MATTE = (255, 255, 255)

# EXIF kept by `keep_metadata` (tag numbers): capture date, camera and copyright. Never the
# GPS block, serial numbers or maker notes; never the orientation (pixels are made upright).
KEPT_EXIF = {0x010F: "Make", 0x0110: "Model", 0x0132: "DateTime", 0x013B: "Artist",
             0x8298: "Copyright"}
KEPT_EXIF_IFD = {0x9003: "DateTimeOriginal", 0x9004: "DateTimeDigitized",
                 0x9010: "OffsetTime", 0x9011: "OffsetTimeOriginal",
                 0x9012: "OffsetTimeDigitized", 0xA434: "LensModel"}
_EXIF_IFD = 0x8769

_WORKING_MODES = {"RGB", "RGBA", "L", "LA"}
_ISOBMFF_IMAGE_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF",
                         b"heim": "HEIF", b"heis": "HEIF", b"hevc": "HEIF", b"hevx": "HEIF",
                         b"mif1": "HEIF", b"msf1": "HEIF"}

# HEIC/HEIF (phones' photos) through pillow-heif, which orients them as shown (the container's
# rotation applied) and keeps their ICC profile, as a JPEG's.
pillow_heif.register_heif_opener()

# Formats Pillow knows but pixelmill does not read: EPS runs Ghostscript on the input; MPEG
# and the BUFR/GRIB/HDF5 stubs cannot decode pixels; WMF needs Windows; IPTC is metadata.
NOT_READ = frozenset({"EPS", "MPEG", "BUFR", "GRIB", "HDF5", "WMF", "IPTC"})
# Signatures too short to tell an image from other bytes (a text file starting "P1", two
# bytes of PCX): such files are taken by their name only (layout.IMAGE_EXTENSIONS).
BY_NAME_ONLY = frozenset({"PCX", "PPM", "XBM", "XPM", "TGA", "MSP", "SUN", "PIXAR", "SGI",
                          "GBR", "MCIDAS", "CUR", "ICO"})  # GBR's check matches a git index


# Formats with a signature of their own, told apart by `sniff` before any plugin is loaded.
_SIGNED = frozenset({"JPEG", "PNG", "GIF", "WEBP", "AVIF", "HEIF", "TIFF", "BMP"})


@functools.cache
def _signature_checks() -> tuple[tuple[str, Callable[[bytes], object]], ...]:
    """(format, its plugin's check of the first bytes) of every other format the installed
    Pillow (with pillow-heif) reads: not NOT_READ, not BY_NAME_ONLY. Loaded once."""
    Image.init()
    return tuple((name, accept) for name, (_, accept) in Image.OPEN.items()
                 if name not in NOT_READ and name not in BY_NAME_ONLY and accept is not None)


def sniff(head: bytes) -> str | None:
    """The Pillow format name of an image from its first bytes, or None if it is no image
    (or one recognised by its name only, BY_NAME_ONLY)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in _ISOBMFF_IMAGE_BRANDS:
        return _ISOBMFF_IMAGE_BRANDS[head[8:12]]
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF, BigTIFF
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    if len(head) < 4:
        return None
    for name, accept in _signature_checks():  # the other formats' (JPEG 2000, PSD, DDS, ...)
        try:
            if accept(head):
                return name
        except Exception:  # noqa: BLE001  (a plugin's check on a short head)
            continue
    return None


def describe_non_image(head: bytes) -> str:
    """A reason a person understands for bytes that are not an image we read."""
    if not head:
        return "not an image (empty file)"
    if head.startswith(b"%PDF"):
        return "not an image (a PDF document)"
    if head[4:8] == b"ftyp":
        return f"not an image we read (an ISO media file, brand {head[8:12].decode('latin-1')!r})"
    text = _as_text(head)
    if text is not None:
        return f"not an image (text starting {text[:16].strip()!r})"
    return f"not an image (starts with bytes {head[:8].hex(' ')})"


def _as_text(head: bytes) -> str | None:
    """The head as text if it is printable UTF-8 (a character cut at the end is allowed)."""
    for cut in range(4):  # a UTF-8 character is at most 4 bytes
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text and all(char.isprintable() or char in "\t\r\n" for char in text):
            return text
        return None
    return None


@dataclass
class Opened:
    """A lazily decoded source image and what a person should know about it."""

    image: Image.Image
    format: str
    notes: list[str] = field(default_factory=list)


def _too_big(pixels: int, what: str = "") -> str:
    return (f"refused: {what}{pixels / 1e6:.0f} MP, above the {MAX_PIXELS / 1e6:.0f} MP limit "
            "(a decompression bomb or a scan too large to resize)")


_OBJECT = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def _reason(exc: Exception) -> str:
    """A decoder's error as a reason for the report: Pillow names the file object it was
    given ("cannot identify image file <_io.BytesIO object at 0x7f...>"), which tells a user
    nothing; it is left out."""
    if isinstance(exc, UnidentifiedImageError):
        return "its contents are not a picture Pillow can read (damaged, or another format)"
    return _OBJECT.sub("the data", str(exc)).strip() or type(exc).__name__


def format_by_name(name: str | None) -> str | None:
    """The format a file's extension names, if it is one taken by its name only
    (BY_NAME_ONLY, or one whose plugin has no signature check)."""
    if not name or "." not in name.rsplit("/", 1)[-1]:
        return None
    Image.init()
    found = Image.registered_extensions().get("." + name.rsplit(".", 1)[-1].lower())
    if found is None or found in NOT_READ or found not in Image.OPEN:
        return None
    return found if found in BY_NAME_ONLY or Image.OPEN[found][1] is None else None


def open_image(data: bytes, name: str | None = None) -> Opened:
    """Open image bytes after sniffing them; refuse bombs before any pixel is decoded.
    `name` (the source's key): a format without a signature (TGA) is read by its extension."""
    fmt = sniff(data[:SNIFF_BYTES])
    # a short signature of another format can match too (a TGA starts like a CUR): then
    # the name's format is tried after it
    by_name = format_by_name(name) if fmt not in _SIGNED else None
    if fmt is None and by_name is None:
        raise ImageError(describe_non_image(data[:SNIFF_BYTES]))
    formats = list(dict.fromkeys(found for found in (fmt, by_name) if found))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:  # above Pillow's own (higher) limit
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(declared[1]) if declared else MAX_PIXELS + 1
        raise ImageError(_too_big(pixels)) from None
    except Exception as exc:  # Pillow raises many types for a bad header
        if fmt is None:  # named like a format it is not
            raise ImageError(f"{describe_non_image(data[:SNIFF_BYTES])}; its name says "
                             f"{by_name}, which cannot read it") from None
        raise ImageError(f"cannot read {fmt} header: {_reason(exc)}") from None
    fmt = image.format or fmt or by_name
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageError(_too_big(width * height, f"{width}x{height} is "))
    opened = Opened(image=image, format=fmt)
    try:
        frames = getattr(image, "n_frames", 1)  # GIF and PSD parse every frame or layer
    except Exception as exc:  # noqa: BLE001  (a damaged frame or layer table)
        raise ImageError(f"cannot read {fmt} frames: {_reason(exc)}") from None
    if frames > 1:
        opened.notes.append(f"animated ({frames} frames): first frame used")
    return opened


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:
        return 1


def output_size(
    source: tuple[int, int], size: tuple[int, int], fit: Fit, upscale: bool = False
) -> tuple[int, int]:
    """The (width, height) the resized image will have, in display orientation."""
    src_w, src_h = source
    box_w, box_h = size
    if fit == "fill":
        return (box_w, box_h) if upscale else (min(box_w, src_w), min(box_h, src_h))
    if fit == "cover":
        if not upscale and (box_w > src_w or box_h > src_h):
            # Keep the box's aspect ratio at the source's own resolution.
            scale = min(src_w / box_w, src_h / box_h, 1.0)
            return max(1, round(box_w * scale)), max(1, round(box_h * scale))
        return box_w, box_h
    # contain
    if not upscale and src_w <= box_w and src_h <= box_h:
        return src_w, src_h
    if box_w / src_w <= box_h / src_h:
        return box_w, max(1, min(box_h, round(src_h * box_w / src_w)))
    return max(1, min(box_w, round(src_w * box_h / src_h))), box_h


def _cover_box(source: tuple[int, int], out: tuple[int, int]) -> tuple[float, float, float, float]:
    """The centred crop of `source` with the aspect ratio of `out`."""
    src_w, src_h = source
    out_w, out_h = out
    scale = max(out_w / src_w, out_h / src_h)
    crop_w, crop_h = out_w / scale, out_h / scale
    left, top = (src_w - crop_w) / 2, (src_h - crop_h) / 2
    return left, top, left + crop_w, top + crop_h


def _draft_request(image: Image.Image, wanted: tuple[int, int], orientation: int) -> None:
    """JPEG shrink-on-load to the smallest DCT scale that is still >= the wanted size."""
    if image.format != "JPEG":
        return
    want_w, want_h = wanted
    if orientation in (5, 6, 7, 8):  # stored sideways: the request is in stored orientation
        want_w, want_h = want_h, want_w
    mode = image.mode if image.mode in ("RGB", "L") else None
    image.draft(mode, (max(1, want_w), max(1, want_h)))


def to_working_mode(image: Image.Image) -> Image.Image:
    """Convert any mode into RGB, RGBA, L or LA, keeping transparency and colour."""
    mode = image.mode
    if mode in _WORKING_MODES:
        return image
    if mode == "1":
        return image.convert("L")
    if mode in ("P", "PA"):
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    if mode == "CMYK":
        icc = image.info.get("icc_profile")
        if icc:
            try:
                source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                srgb = ImageCms.createProfile("sRGB")
                converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
                if converted is not None:
                    converted.info.pop("icc_profile", None)
                    return converted
            except (ImageCms.PyCMSError, OSError):
                pass  # a broken profile: fall back to Pillow's naive conversion
        converted = image.convert("RGB")
        converted.info.pop("icc_profile", None)
        return converted
    if mode.startswith("I;16"):  # 16-bit by declaration: 0..65535 maps onto 0..255
        return image.convert("I").point(lambda value: value * (255.0 / 65535)).convert("L")
    if mode in ("I", "F"):  # unknown range: scale by what the values need
        low, high = image.getextrema()
        if mode == "F" and 0 <= low and high <= 1.0:
            top = 1.0
        elif high <= 255 and low >= 0:
            top = 255.0
        else:
            top = 65535.0 if 0 <= low and high <= 65535 else float(high)
        return image.point(lambda value: value * (255.0 / max(top, 1e-9))).convert("L")
    return image.convert("RGBA" if "A" in mode else "RGB")


def resize_image(
    image: Image.Image, size: tuple[int, int], fit: Fit = "contain", upscale: bool = False
) -> Image.Image:
    """Resize a PIL image (EXIF orientation applied first) with LANCZOS into `size` by `fit`.

    For a JPEG not yet loaded, decoding happens at the smallest DCT scale that is still at
    least the output size (shrink-on-load): a fraction of the pixels is decoded, and the
    output looks the same.
    """
    orientation = _orientation(image)
    shown = image.size[::-1] if orientation in (5, 6, 7, 8) else image.size
    out = output_size(shown, size, fit, upscale)
    wanted = out
    if fit == "cover":
        scale = max(out[0] / shown[0], out[1] / shown[1])
        wanted = (round(shown[0] * scale), round(shown[1] * scale))
    _draft_request(image, wanted, orientation)
    try:
        upright = ImageOps.exif_transpose(image)
        upright = to_working_mode(upright)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot decode {image.format or 'image'}: {_reason(exc)}") from None
    box = _cover_box(upright.size, out) if fit == "cover" else None
    if upright.size == out and box is None:
        return upright.copy()
    return upright.resize(out, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)


def _icc_for(icc: bytes | None, mode: str) -> bytes | None:
    """Keep an ICC profile only where its colour space matches the pixels written."""
    if not icc or len(icc) < 20:
        return None
    space = icc[16:20]
    if (space == b"RGB " and mode in ("RGB", "RGBA")) or (space == b"GRAY" and mode in ("L", "LA")):
        return icc
    return None


def flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite RGBA/LA onto the matte colour for formats without alpha."""
    if image.mode not in ("RGBA", "LA"):
        return image
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, MATTE + (255,))
    flat = Image.alpha_composite(background, rgba).convert("RGB" if image.mode == "RGBA" else "L")
    return flat.convert("L") if image.mode == "LA" else flat


def kept_exif(image: Image.Image) -> bytes | None:
    """The EXIF `keep_metadata` keeps of a source (KEPT_EXIF, KEPT_EXIF_IFD), as bytes to
    write with an output; None if it has none of them."""
    try:
        source = image.getexif()
        inner = source.get_ifd(_EXIF_IFD)
    except Exception:  # noqa: BLE001  (damaged EXIF: the pixels still count, the tags not)
        return None
    kept = Image.Exif()
    for tag in KEPT_EXIF:
        if tag in source:
            kept[tag] = source[tag]
    found = {tag: inner[tag] for tag in KEPT_EXIF_IFD if tag in inner}
    if found:
        kept.get_ifd(_EXIF_IFD).update(found)
    return kept.tobytes() if (len(kept) or found) else None


def encode(
    image: Image.Image, fmt: OutputFormat = "jpeg", quality: int = 85, icc: bytes | None = None,
    exif: bytes | None = None,
) -> bytes:
    """Encode a working-mode image in an output format; every working mode fits every format.
    Only `exif` is written as EXIF (none by default), and no XMP: a source's GPS position
    never reaches an output."""
    image = to_working_mode(image)
    if fmt == "jpeg":
        image = flatten_alpha(image)
    elif fmt in ("webp", "avif") and image.mode in ("L", "LA"):
        image = image.convert("RGBA" if image.mode == "LA" else "RGB")
    options: dict[str, object] = {}
    profile = _icc_for(icc, image.mode)
    if profile:
        options["icc_profile"] = profile
    if fmt in ("jpeg", "webp", "avif"):
        options["quality"] = quality
    # empty values also stop a plugin that would copy the image's own (its info)
    options["exif"] = exif or b""
    options["xmp"] = b""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **options)
    return buffer.getvalue()


def _full_frame_scale(shown: tuple[int, int], out: tuple[int, int], fit: Fit) -> float:
    """How much of the source's full frame an output of `out` needs (1.0: all of it)."""
    if fit == "contain":
        return min(out[0] / shown[0], out[1] / shown[1]) if out != shown else 1.0
    return max(out[0] / shown[0], out[1] / shown[1])  # cover crops, fill stretches


def resize_to_sizes(
    image: Image.Image, sizes: list[tuple[int, int]], fit: Fit = "contain",
    upscale: bool = False,
) -> dict[tuple[int, int], Image.Image]:
    """`resize_image` into several sizes from one decode: shrink-on-load (a JPEG) to what the
    largest output needs, one LANCZOS pass to that full frame, and every output from that
    frame, never from the source again. {size: image}."""
    if len(sizes) == 1:
        return {sizes[0]: resize_image(image, sizes[0], fit, upscale)}
    orientation = _orientation(image)
    shown = image.size[::-1] if orientation in (5, 6, 7, 8) else image.size
    outs = {size: output_size(shown, size, fit, upscale) for size in sizes}
    scale = min(1.0, max(_full_frame_scale(shown, out, fit) for out in outs.values()))
    frame = (max(1, round(shown[0] * scale)), max(1, round(shown[1] * scale)))
    _draft_request(image, frame, orientation)
    try:
        upright = to_working_mode(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot decode {image.format or 'image'}: {_reason(exc)}") from None
    base = (upright if upright.size == frame else
            upright.resize(frame, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP))
    made: dict[tuple[int, int], Image.Image] = {}
    for size, out in outs.items():
        box = _cover_box(base.size, out) if fit == "cover" else None
        made[size] = (base if base.size == out and box is None else
                      base.resize(out, Image.Resampling.LANCZOS, box=box,
                                  reducing_gap=REDUCING_GAP))
    return made


@dataclass
class Encoded:
    """One rendition of an image, encoded, and its pixel size."""

    rendition: Rendition
    data: bytes
    width: int
    height: int
    image: Image.Image  # its pixels, with the ICC profile and EXIF written in `info`


@dataclass
class Rendered:
    """The encoded resized image, its pixel size and pixels, and notes for the report."""

    data: bytes
    width: int
    height: int
    image: Image.Image
    notes: list[str] = field(default_factory=list)


def render_renditions(data: bytes, spec: PipelineSpec, renditions: Sequence[Rendition],
                      name: str | None = None) -> tuple[list[Encoded], list[str]]:
    """Source bytes -> each of `renditions` (sizes and formats of `spec`), encoded, from one
    decode (`resize_to_sizes`); and the notes for the report. `name`: the source's key
    (`open_image`)."""
    opened = open_image(data, name)
    icc = opened.image.info.get("icc_profile")
    exif = kept_exif(opened.image) if spec.keep_metadata else None
    try:
        images = resize_to_sizes(opened.image, list(dict.fromkeys(r.size for r in renditions)),
                                 spec.fit, spec.upscale)
        if opened.image.mode == "CMYK":
            icc = None  # converted to sRGB; the CMYK profile no longer describes the pixels
        encoded = [Encoded(rendition, encode(images[rendition.size], rendition.format,
                                             spec.quality, icc, exif),
                           *images[rendition.size].size, images[rendition.size])
                   for rendition in renditions]
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot decode {opened.format}: {_reason(exc)}") from None
    for image in images.values():
        image.info["icc_profile"], image.info["exif"] = icc, exif
    return encoded, opened.notes


def render_resized(data: bytes, spec: PipelineSpec, name: str | None = None) -> Rendered:
    """Source bytes -> the main rendition (first size, first format), encoded."""
    (main,), notes = render_renditions(data, spec, spec.renditions[:1], name)
    return Rendered(main.data, main.width, main.height, main.image, notes)


def render_filters(image: Image.Image, spec: PipelineSpec) -> dict[str, bytes]:
    """Every requested filter of one resized image, encoded: {folder: bytes}."""
    icc = image.info.get("icc_profile")
    # the resized output's EXIF is already only what `keep_metadata` keeps
    exif = image.info.get("exif") if spec.keep_metadata else None
    return {
        filter_folder(name): encode(apply_filter(image, name), spec.format, spec.quality, icc,
                                    exif)
        for name in spec.filters
    }


def decode(data: bytes) -> Image.Image:
    """Decode a (small, already resized) image fully, in a working mode."""
    opened = open_image(data)
    try:
        image = to_working_mode(ImageOps.exif_transpose(opened.image))
    except Exception as exc:
        raise ImageError(f"cannot decode {opened.format}: {_reason(exc)}") from None
    image.info["icc_profile"] = opened.image.info.get("icc_profile")
    # our own output's EXIF, as written (only what `keep_metadata` keeps, if anything)
    image.info["exif"] = opened.image.info.get("exif")
    return image
