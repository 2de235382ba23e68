"""Unit tests of the pure image operations (pixelmill.imageops, filters, spec); no Prefect."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image, ImageCms, ImageFile, ImageFilter, ImageOps, ImageStat, JpegImagePlugin
from pydantic import ValidationError

from tests.helpers import (
    ALPHA_MODES, HIGH_BIT_MODES, assert_image_similar, decode, encode, gradient16,
    grey_gradient, make_image, png_declaring, psnr,
)
from pixelmill import imageops
from pixelmill.errors import ImageError, UsageError
from pixelmill.filters import FILTER_NAMES, apply_filter, canonical_filter, filter_folder
from pixelmill.imageops import open_image, output_size, render_resized, resize_image, sniff
from pixelmill.samples import jpeg_bytes, photo
from pixelmill.spec import PipelineSpec, parse_size

FITS = ("contain", "cover", "fill")
FORMATS = ("jpeg", "png", "webp", "avif")
LANCZOS = Image.Resampling.LANCZOS


def _reference(upright: Image.Image, out: tuple[int, int], fit: str) -> Image.Image:
    """What a correct resize of the upright image looks like, made with Pillow alone."""
    if fit == "cover":
        return ImageOps.fit(upright, out, method=LANCZOS)
    return upright.resize(out, LANCZOS)


# --- output_size: every fit for landscape / portrait / square ------------------------------

@pytest.mark.parametrize(
    ("source", "box", "fit", "expected"),
    [
        ((300, 200), (100, 100), "contain", (100, 67)),
        ((200, 300), (100, 100), "contain", (67, 100)),
        ((250, 250), (100, 100), "contain", (100, 100)),
        ((300, 200), (120, 60), "contain", (90, 60)),
        ((200, 300), (120, 60), "contain", (40, 60)),
        ((250, 250), (120, 60), "contain", (60, 60)),
        ((300, 200), (100, 100), "cover", (100, 100)),
        ((200, 300), (100, 100), "cover", (100, 100)),
        ((250, 250), (120, 60), "cover", (120, 60)),
        ((300, 200), (100, 100), "fill", (100, 100)),
        ((200, 300), (120, 60), "fill", (120, 60)),
        ((250, 250), (120, 60), "fill", (120, 60)),
    ],
)
def test_output_size_per_fit_and_shape(source, box, fit, expected):
    assert output_size(source, box, fit) == expected


@pytest.mark.parametrize(
    ("source", "fit", "upscale", "expected"),
    [
        # A small source is never enlarged unless asked to.
        ((40, 30), "contain", False, (40, 30)),
        ((40, 30), "contain", True, (100, 75)),
        # cover keeps the box's aspect ratio at the source's own resolution.
        ((40, 30), "cover", False, (30, 30)),
        ((40, 30), "cover", True, (100, 100)),
        ((40, 30), "fill", False, (40, 30)),
        ((40, 30), "fill", True, (100, 100)),
        # Larger than the box on one side only.
        ((200, 50), "contain", False, (100, 25)),
        ((200, 50), "cover", False, (50, 50)),
        ((200, 50), "fill", False, (100, 50)),
    ],
)
def test_output_size_never_upscales_unless_asked(source, fit, upscale, expected):
    assert output_size(source, (100, 100), fit, upscale) == expected


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("shape", [(150, 100), (100, 150), (120, 120)], ids=str)
def test_resize_image_size_and_content_per_fit(shape, fit):
    upright = photo(*shape, seed=2)
    source = Image.open(io.BytesIO(encode(upright, "png")))
    out = resize_image(source, (80, 60), fit)
    assert out.size == output_size(shape, (80, 60), fit)
    assert_image_similar(out, _reference(upright, out.size, fit), 30)


# --- EXIF orientation 1-8 ------------------------------------------------------------------

@pytest.fixture(scope="module")
def upright() -> Image.Image:
    return photo(120, 80, seed=3)


@pytest.mark.parametrize("fit", FITS)
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_upright_output(upright, orientation, fit):
    data = jpeg_bytes(upright, orientation=orientation)
    rendered = render_resized(data, PipelineSpec(size=(60, 60), fit=fit, format="png"))
    expected_size = output_size(upright.size, (60, 60), fit)
    assert (rendered.width, rendered.height) == expected_size
    out = decode(rendered.data)
    assert out.size == expected_size
    reference = _reference(upright, expected_size, fit)
    assert_image_similar(out, reference, 30)
    # The check can tell orientations apart: the mirror image is far below the threshold.
    assert psnr(out, reference.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) < 30


def test_exif_orientation_with_default_jpeg_output(upright):
    rendered = render_resized(jpeg_bytes(upright, orientation=6), PipelineSpec(size=(60, 60)))
    out = decode(rendered.data)
    assert out.size == (60, 40)
    assert_image_similar(out, upright.resize((60, 40), LANCZOS), 30)


# --- no upscaling --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("fit", "upscale", "expected"),
    [
        ("contain", False, (40, 30)), ("contain", True, (100, 75)),
        ("cover", False, (30, 30)), ("cover", True, (100, 100)),
        ("fill", False, (40, 30)), ("fill", True, (100, 100)),
    ],
)
def test_small_source_is_upscaled_only_when_asked(fit, upscale, expected):
    small = photo(40, 30, seed=4)
    spec = PipelineSpec(size=(100, 100), fit=fit, upscale=upscale, format="png")
    rendered = render_resized(encode(small, "png"), spec)
    assert (rendered.width, rendered.height) == expected
    assert decode(rendered.data).size == expected
    if expected == small.size:
        assert_image_similar(decode(rendered.data), small, 50)


# --- every input mode x every output format -------------------------------------------------

INPUT_CASES = [
    ("RGB", "jpeg"), ("RGB", "png"), ("RGBA", "png"), ("RGBA", "webp"), ("L", "jpeg"),
    ("L", "png"), ("LA", "png"), ("P", "png"), ("P", "gif"), ("P-transparent", "png"),
    ("P-transparent", "gif"), ("CMYK", "jpeg"), ("CMYK", "tiff"), ("I;16", "png"),
    ("I;16", "tiff"), ("I", "tiff"), ("1", "png"), ("1", "tiff"), ("F", "tiff"),
]
CASE_IDS = [f"{mode}-{container}" for mode, container in INPUT_CASES]


@pytest.fixture(scope="module")
def source_bytes() -> dict[tuple[str, str], bytes]:
    return {(mode, container): encode(make_image(mode), container)
            for mode, container in INPUT_CASES}


@pytest.mark.parametrize("out_format", FORMATS)
@pytest.mark.parametrize(("mode", "container"), INPUT_CASES, ids=CASE_IDS)
def test_every_mode_to_every_format(source_bytes, mode, container, out_format):
    data = source_bytes[(mode, container)]
    expected_mode = "P" if mode == "P-transparent" else mode
    assert Image.open(io.BytesIO(data)).mode == expected_mode  # the input is real
    rendered = render_resized(data, PipelineSpec(size=(32, 32), format=out_format))
    assert (rendered.width, rendered.height) == (32, 24)
    out = decode(rendered.data)
    assert out.format == out_format.upper()
    assert out.size == (32, 24)
    if out_format == "jpeg":
        assert out.mode in ("RGB", "L")
        assert "transparency" not in out.info
    elif mode in ALPHA_MODES:
        assert "A" in out.getbands(), out.mode
        low, high = out.getchannel("A").getextrema()
        assert low <= 10 and high >= 245, (low, high)
    if mode in HIGH_BIT_MODES:
        # A full-range gradient lands mid-grey, not clipped to white or crushed to black.
        mean = ImageStat.Stat(out.convert("L")).mean[0]
        assert 100 <= mean <= 155, mean


@pytest.mark.parametrize(("mode", "container"), INPUT_CASES, ids=CASE_IDS)
def test_png_output_content_matches_pillow_reference(source_bytes, mode, container):
    data = source_bytes[(mode, container)]
    out = decode(render_resized(data, PipelineSpec(size=(32, 32), format="png")).data)
    if mode in HIGH_BIT_MODES:
        reference = grey_gradient().resize(out.size, LANCZOS)
    else:
        target = "RGBA" if mode in ALPHA_MODES else ("L" if mode in ("L", "1") else "RGB")
        reference = decode(data).convert(target).resize(out.size, LANCZOS)
    assert_image_similar(out, reference, 30)


def test_sixteen_bit_grey_full_range_is_mid_grey():
    rendered = render_resized(encode(gradient16((64, 48), 65535), "png"),
                              PipelineSpec(size=(32, 32), format="png"))
    assert 120 <= ImageStat.Stat(rendered.image).mean[0] <= 135


def test_sixteen_bit_grey_dark_image_stays_dark():
    # 0..255 out of 65535 is < 0.4 % of full scale: must come out (nearly) black.
    rendered = render_resized(encode(gradient16((64, 48), 255), "png"),
                              PipelineSpec(size=(32, 32), format="png"))
    assert ImageStat.Stat(rendered.image).mean[0] < 5


# --- shrink-on-load -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_photo() -> Image.Image:
    return photo(3000, 2000, seed=5)


@pytest.mark.parametrize("orientation", [1, 6])
def test_shrink_on_load_matches_full_decode(big_photo, orientation, monkeypatch):
    data = jpeg_bytes(big_photo, orientation=orientation)
    calls: list[tuple[tuple[int, int], tuple[int, int], object]] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, self.size, result))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    rendered = render_resized(data, PipelineSpec(size=(400, 300), format="png"))
    monkeypatch.undo()
    assert (rendered.width, rendered.height) == (400, 267)

    assert len(calls) == 1
    requested, decoded_size, result = calls[0]
    target = (400, 267) if orientation == 1 else (267, 400)  # stored orientation
    stored = (3000, 2000) if orientation == 1 else (2000, 3000)
    assert result is not None, "draft did not reduce the decode"
    assert requested[0] >= target[0] and requested[1] >= target[1]
    assert target[0] <= decoded_size[0] < stored[0] and target[1] <= decoded_size[1] < stored[1]

    full = ImageOps.exif_transpose(decode(data)).convert("RGB")
    reference = full.resize((400, 267), LANCZOS)
    assert_image_similar(decode(rendered.data), reference, 40)


def test_no_draft_for_non_jpeg(monkeypatch):
    called = []
    monkeypatch.setattr(Image.Image, "draft", lambda self, *args: called.append(args))
    render_resized(encode(photo(120, 80), "png"), PipelineSpec(size=(30, 30)))
    assert called == []


# --- filters ------------------------------------------------------------------------------

PILLOW_FILTERS = {
    "blur": ImageFilter.BLUR,
    "sharpen": ImageFilter.SHARPEN,
    "contour": ImageFilter.CONTOUR,
    "emboss": ImageFilter.EMBOSS,
    "detail": ImageFilter.DETAIL,
    "edge-enhance": ImageFilter.EDGE_ENHANCE,
    "smooth": ImageFilter.SMOOTH,
    "gaussian-blur": ImageFilter.GaussianBlur(2),
    "unsharp-mask": ImageFilter.UnsharpMask(radius=2),
}


def test_every_filter_name_has_a_reference():
    assert set(FILTER_NAMES) == set(PILLOW_FILTERS)


@pytest.mark.parametrize("name", FILTER_NAMES)
def test_filter_equals_pillow(name):
    image = photo(48, 32, seed=6)
    out = apply_filter(image, name)
    expected = image.filter(PILLOW_FILTERS[name])
    assert out.mode == "RGB" and out.size == image.size
    assert out.tobytes() == expected.tobytes()
    assert out.tobytes() != image.tobytes()  # the filter does something


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("gaussian-blur:3", ImageFilter.GaussianBlur(3)),
        ("unsharp-mask:1.5", ImageFilter.UnsharpMask(radius=1.5)),
    ],
)
def test_filter_radius(spec, expected):
    image = photo(48, 32, seed=6)
    assert apply_filter(image, spec).tobytes() == image.filter(expected).tobytes()
    assert apply_filter(image, spec).tobytes() != apply_filter(image, spec.split(":")[0]).tobytes()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_filter_keeps_alpha_unfiltered(mode):
    image = make_image(mode)
    out = apply_filter(image, "blur")
    assert out.mode == mode
    assert out.getchannel("A").tobytes() == image.getchannel("A").tobytes()
    colour = image.convert("RGB" if mode == "RGBA" else "L")
    assert out.convert(colour.mode).tobytes() == colour.filter(ImageFilter.BLUR).tobytes()


def test_unknown_filter_lists_valid_names():
    with pytest.raises(UsageError) as error:
        apply_filter(photo(16, 16), "sepia")
    message = str(error.value)
    assert "'sepia'" in message
    for name in FILTER_NAMES:
        assert name in message


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("blur:3", "takes no radius"),
        ("emboss:1", "takes no radius"),
        ("gaussian-blur:abc", "must be a number"),
        ("gaussian-blur:0", "radius must be in"),
        ("unsharp-mask:51", "radius must be in"),
    ],
)
def test_bad_filter_radius_is_usage_error(spec, fragment):
    with pytest.raises(UsageError, match=fragment) as error:
        canonical_filter(spec)
    assert repr(spec) in str(error.value)


@pytest.mark.parametrize(
    ("spec", "folder"),
    [("gaussian-blur:3", "gaussian-blur-3"), ("Gaussian-Blur:3.0", "gaussian-blur-3"),
     ("unsharp-mask:1.5", "unsharp-mask-1.5"), ("blur", "blur"), (" Emboss ", "emboss")],
)
def test_filter_folder(spec, folder):
    assert filter_folder(spec) == folder


def test_render_filters_encodes_every_variant():
    spec = PipelineSpec(filters=("blur", "gaussian-blur:3"), format="png")
    image = photo(40, 30)
    variants = imageops.render_filters(image, spec)
    assert set(variants) == {"blur", "gaussian-blur-3"}
    assert decode(variants["gaussian-blur-3"]).tobytes() == \
        image.filter(ImageFilter.GaussianBlur(3)).tobytes()


# --- sniff / describe / refusing bad input --------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "AVIF", "TIFF", "BMP"])
def test_sniff_detects_formats(fmt):
    data = encode(photo(32, 24), fmt)
    assert sniff(data[: imageops.SNIFF_BYTES]) == fmt
    assert open_image(data).format == fmt


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "not an image (a PDF document)"),
        (b"hello, world\nsecond line", "not an image (text starting 'hello, world\\nsec')"),
        (b"", "not an image (empty file)"),
        (bytes([0x8B, 0xFF, 0x00, 0x12, 0x9C, 0xFE, 0x01, 0x80, 0x55]),
         "not an image (starts with bytes 8b ff 00 12 9c fe 01 80)"),
        (b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00", "an ISO media file, brand 'mp42'"),
    ],
    ids=["pdf", "text", "empty", "random", "mp4"],
)
def test_non_images_are_refused_with_a_reason(head, reason):
    assert sniff(head) is None
    assert reason in imageops.describe_non_image(head[: imageops.SNIFF_BYTES])
    with pytest.raises(ImageError) as error:
        open_image(head)
    assert reason in str(error.value)


@pytest.mark.parametrize("head", [b"PK\x03\x04\x14\x00\x00\x00\x08\x00",
                                  b"\x00\x00\x01\x00\x01\x00\x10\x10\x00\x00"], ids=["zip", "ico"])
def test_binary_ascii_range_header_is_not_called_text(head):
    assert "text starting" not in imageops.describe_non_image(head)


def test_utf8_text_cut_mid_character_is_still_text():
    head = ("a" + "é" * 20).encode("utf-8")[: imageops.SNIFF_BYTES]
    assert "text starting" in imageops.describe_non_image(head)


def _heic(orientation: int = 1, size: tuple[int, int] = (64, 48)) -> bytes:
    """A HEIC (made with pillow-heif's HEVC encoder) with a red top-left corner, an sRGB
    profile and, in EXIF, an orientation and a GPS position."""
    image = Image.new("RGB", size, (20, 160, 60))
    image.paste((255, 0, 0), (0, 0, size[0] // 4, size[1] // 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif.get_ifd(0x8825)[2] = (52.0, 31.0, 12.0)
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    image.save(buffer, "HEIF", quality=90, exif=exif.tobytes(), icc_profile=profile)
    return buffer.getvalue()


def test_heic_is_read_oriented_with_its_profile_like_a_jpeg():
    data = _heic(orientation=6)  # rotated 90 degrees: shown 48 wide, 64 high
    assert sniff(data[:32]) == "HEIF"
    rendered = render_resized(data, PipelineSpec(size=(24, 32), format="png"))
    out = Image.open(io.BytesIO(rendered.data))
    assert (rendered.width, rendered.height) == (24, 32) == out.size
    assert out.info.get("icc_profile")  # the profile is carried over
    assert not dict(out.getexif().get_ifd(0x8825))  # and the GPS position is not
    red = out.convert("RGB").getpixel((out.width - 2, 1))  # rotated: the red corner is top right
    assert red[0] > 200 and red[1] < 80, red


def test_a_heic_named_jpg_is_recognised_by_its_bytes(tmp_path):
    from pixelmill import pipeline
    from pixelmill.models import ChunkItem, Job
    from pixelmill.localstorage import LocalStorage

    (tmp_path / "src").mkdir()
    (tmp_path / "src/phone.jpg").write_bytes(_heic())
    source, dest = LocalStorage(tmp_path / "src"), LocalStorage(tmp_path / "dst")
    job = Job(source=source.uri, destination=dest.uri, run="r", spec=PipelineSpec(size=(32, 24)))
    [made] = pipeline.resize_images((ChunkItem(source="phone.jpg", output="phone.jpg"),), job,
                                    source, dest)
    assert (made.status, made.width, made.height) == ("ok", 32, 24), made
    assert Image.open(tmp_path / "dst/r/resized/phone.jpg").format == "JPEG"


def _written(fmt: str, **options) -> bytes:
    image = Image.new("RGB", (40, 30), (200, 80, 20))
    if fmt in ("MSP", "XBM"):
        image = image.convert("1")
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt,name,options", [
    ("TIFF", "big.tif", {"big_tiff": True}), ("JPEG2000", "scan.jp2", {}),
    ("PPM", "frame.ppm", {}), ("TGA", "sprite.tga", {}), ("PCX", "old.pcx", {}),
    ("ICO", "favicon.ico", {}), ("DDS", "texture.dds", {}), ("QOI", "shot.qoi", {}),
    ("SGI", "icon.sgi", {}), ("MSP", "paint.msp", {}), ("XBM", "glyph.xbm", {}),
])
def test_every_format_pillow_reads_is_read(fmt, name, options):
    data = _written(fmt, **options)
    rendered = render_resized(data, PipelineSpec(size=(20, 20)), name)
    assert Image.open(io.BytesIO(rendered.data)).format == "JPEG"
    assert rendered.width == 20
    from pixelmill.layout import IMAGE_EXTENSIONS

    assert "." + name.rsplit(".", 1)[1] in IMAGE_EXTENSIONS


def test_discovery_takes_every_readable_format_and_leaves_lookalikes_alone(tmp_path):
    """Common image names are taken by name; the rarer ones (names other files use too)
    by their first bytes, or by name where the format has no signature; a Garmin `.fit`,
    a git index and a text file are left alone as not images."""
    from pixelmill import pipeline
    from pixelmill.models import Job
    from pixelmill.localstorage import LocalStorage

    source = tmp_path / "src"
    source.mkdir()
    files = {"sprite.tga": _written("TGA"), "old.pcx": _written("PCX"),
             "paint.msp": _written("MSP"), "icon.sgi": _written("SGI"),
             "glyph.xbm": _written("XBM"), "scan.jp2": _written("JPEG2000"),
             "big.tif": _written("TIFF", big_tiff=True),
             "ride.fit": b"\x0e\x10\x43\x08\x78\x06\x00\x00.FIT" + b"\x00" * 40,
             "index": b"DIRC\x00\x00\x00\x02\x00\x00\x00\x10" + b"\x00" * 40,
             "notes.txt": b"P1 is the first point\n"}
    for name, data in files.items():
        (source / name).write_bytes(data)
    job = Job(source=str(source), destination=str(tmp_path / "dst"), run="r",
              spec=PipelineSpec(size=(20, 20)))
    plan = pipeline.discover(LocalStorage(source), LocalStorage(tmp_path / "dst"), job,
                             write_manifest=False)
    taken = sorted(item.source for chunk in plan.chunks for item in chunk.items)
    assert taken == ["big.tif", "glyph.xbm", "icon.sgi", "old.pcx", "paint.msp", "scan.jp2",
                     "sprite.tga"]
    assert plan.not_images == {".fit": 1, "": 1, ".txt": 1}
    made = pipeline.resize_images(tuple(item for chunk in plan.chunks for item in chunk.items),
                                  job, LocalStorage(source), LocalStorage(tmp_path / "dst"))
    assert [image.status for image in made] == ["ok"] * 7, made


def test_a_format_known_only_by_its_name_is_not_read_from_other_bytes():
    # a TGA has no signature: only a .tga name lets Pillow try it, and a PDF named .tga
    # says what it is
    tga = _written("TGA")
    assert sniff(tga[:32]) in (None, "CUR")  # its first bytes could be a cursor's
    with pytest.raises(ImageError):
        render_resized(tga, PipelineSpec(size=(20, 20)), "sprite.jpg")
    with pytest.raises(ImageError, match=r"a PDF document\); its name says TGA"):
        render_resized(b"%PDF-1.7\n1 0 obj", PipelineSpec(size=(20, 20)), "sprite.tga")


def test_the_extensions_of_every_format_pillow_reads_are_image_names():
    """layout.IMAGE_EXTENSIONS is written out (no plugin loading when a command starts):
    this fails when the installed Pillow reads an extension it lacks."""
    from pixelmill.layout import IMAGE_EXTENSIONS

    Image.init()
    readable = {extension for extension, fmt in Image.registered_extensions().items()
                if fmt in Image.OPEN and fmt not in imageops.NOT_READ}
    assert readable <= IMAGE_EXTENSIONS, sorted(readable - IMAGE_EXTENSIONS)
    for extension in IMAGE_EXTENSIONS:  # and nothing Pillow does not read
        assert Image.registered_extensions().get(extension) in set(Image.OPEN) - imageops.NOT_READ, extension


class _Decoded(BaseException):
    """Raised if pixels are decoded; a BaseException so no `except Exception` hides it."""


@pytest.fixture
def no_decoding(monkeypatch):
    def load(self, *args, **kwargs):
        raise _Decoded(f"{self.format} {self.size} was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_decompression_bomb_refused_before_decoding(no_decoding):
    started = time.perf_counter()
    with pytest.raises(ImageError, match="refused") as error:
        open_image(png_declaring(30000, 30000))
    assert time.perf_counter() - started < 1.0
    assert "decompression bomb" in str(error.value)
    with pytest.raises(ImageError, match="refused"):
        render_resized(png_declaring(30000, 30000), PipelineSpec())


def test_image_above_pixel_limit_refused_in_megapixels(no_decoding):
    # 16000 x 10000 = 160 MP: above pixelmill's limit, below Pillow's own error threshold.
    with pytest.raises(ImageError, match=r"160 MP, above the 150 MP limit"):
        open_image(png_declaring(16000, 10000))


def test_bomb_message_names_megapixels(no_decoding):
    with pytest.raises(ImageError, match="MP"):
        open_image(png_declaring(30000, 30000))


def test_hand_written_png_header_is_well_formed():
    # The bomb tests mean something only if the same header with a sane size opens.
    image = Image.open(io.BytesIO(png_declaring(8, 8)))
    assert (image.format, image.size, image.mode) == ("PNG", (8, 8), "L")


@pytest.mark.parametrize("keep", [0.5, 0.1])
def test_truncated_jpeg_is_image_error(keep):
    data = jpeg_bytes(photo(64, 48))
    with pytest.raises(ImageError, match="JPEG"):
        render_resized(data[: int(len(data) * keep)], PipelineSpec(size=(32, 32)))


def test_animated_gif_uses_first_frame_with_a_note():
    frames = [photo(40, 30, seed=seed).convert("P") for seed in range(3)]
    data = encode(frames[0], "gif", save_all=True, append_images=frames[1:], duration=100)
    rendered = render_resized(data, PipelineSpec(size=(20, 20), format="png"))
    assert (rendered.width, rendered.height) == (20, 15)
    assert any("first frame" in note for note in rendered.notes), rendered.notes
    assert "3 frames" in " ".join(rendered.notes)
    first = frames[0].convert("RGB").resize((20, 15), LANCZOS)
    assert_image_similar(decode(rendered.data), first, 30)


def test_still_image_has_no_notes():
    assert render_resized(jpeg_bytes(photo(40, 30)), PipelineSpec(size=(20, 20))).notes == []


# --- ICC profiles ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


@pytest.mark.parametrize("out_format", FORMATS)
def test_rgb_icc_profile_is_carried(srgb_icc, out_format):
    data = encode(photo(64, 48), "jpeg", icc_profile=srgb_icc)
    out = decode(render_resized(data, PipelineSpec(size=(32, 32), format=out_format)).data)
    assert out.info.get("icc_profile") == srgb_icc


def test_cmyk_jpeg_without_profile_becomes_rgb_without_icc():
    data = encode(photo(64, 48).convert("CMYK"), "jpeg")
    assert decode(data).mode == "CMYK"
    out = decode(render_resized(data, PipelineSpec(size=(32, 32))).data)
    assert out.mode == "RGB"
    assert not out.info.get("icc_profile")


def test_cmyk_jpeg_with_mismatched_rgb_profile_drops_it(srgb_icc):
    # The pixels are converted to RGB without the (unusable) profile: it must not be carried.
    data = encode(photo(64, 48).convert("CMYK"), "jpeg", icc_profile=srgb_icc)
    assert decode(data).info.get("icc_profile") == srgb_icc
    out = decode(render_resized(data, PipelineSpec(size=(32, 32))).data)
    assert out.mode == "RGB"
    assert not out.info.get("icc_profile")


def test_rgb_profile_dropped_for_grey_pixels(srgb_icc):
    data = encode(photo(64, 48).convert("L"), "jpeg", icc_profile=srgb_icc)
    out = decode(render_resized(data, PipelineSpec(size=(32, 32))).data)
    assert out.mode == "L"
    assert not out.info.get("icc_profile")


# --- parse_size / PipelineSpec --------------------------------------------------------------

@pytest.mark.parametrize(("text", "size"),
                         [("400x300", (400, 300)), (" 64 X 48 ", (64, 48)),
                          ("1x16384", (1, 16384))])
def test_parse_size_ok(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["abc", "0x10", "400", "99999x1", "400x-3", ""])
def test_parse_size_rejects_naming_the_input(text):
    with pytest.raises(UsageError) as error:
        parse_size(text)
    assert repr(text) in str(error.value)


def test_pipeline_spec_rejects_quality_zero():
    with pytest.raises(ValidationError, match="quality"):
        PipelineSpec(quality=0)


@pytest.mark.parametrize("kwargs", [{"size": "0x10"}, {"fit": "stretch"}, {"format": "gif"},
                                    {"filters": ["sepia"]}, {"quality": 101}])
def test_pipeline_spec_rejects_bad_settings(kwargs):
    with pytest.raises(ValidationError):
        PipelineSpec(**kwargs)


def test_pipeline_spec_normalises_filters_and_size():
    spec = PipelineSpec(size="200x100", filters=["Blur", "gaussian-blur:3.0", "blur"])
    assert spec.size == (200, 100)
    assert spec.filters == ("blur", "gaussian-blur:3")


@pytest.mark.parametrize(("data", "fmt"), [
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "PNG"),
    (b"GIF89a" + b"\x01" * 100, "GIF"),
    (b"II*\x00" + b"\x00" * 100, "TIFF"),
])
def test_a_damaged_header_is_a_reason_not_a_python_object(data, fmt):
    """Pillow's "cannot identify image file <_io.BytesIO object at 0x...>" names its file
    object; the report says what is wrong with the file instead."""
    with pytest.raises(ImageError) as caught:
        render_resized(data, PipelineSpec())
    reason = str(caught.value)
    assert reason.startswith(f"cannot read {fmt} header: ") and "object at 0x" not in reason
    assert "not a picture Pillow can read" in reason


def _with_gps(fmt: str) -> bytes:
    """A source with camera, date, copyright and a GPS position in EXIF, and the position
    again in XMP."""
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x8298] = "Canon", "EOS R5", "(c) Ada"
    exif[0x0112] = 6  # rotated: the outputs are upright, with no orientation tag
    exif.get_ifd(0x8769)[0x9003] = "2024:05:01 10:00:00"
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2] = "N", (52.0, 31.0, 12.0)
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF><exif:GPSLatitude>52,31.2N'
           b"</exif:GPSLatitude></rdf:RDF></x:xmpmeta>")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 60, 40)).save(buffer, fmt, exif=exif.tobytes(), xmp=xmp)
    return buffer.getvalue()


@pytest.mark.parametrize("source_format", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("keep", [False, True])
def test_no_output_of_any_format_carries_the_source_gps_position(tmp_path, source_format,
                                                                   keep):
    from pixelmill import pipeline
    from pixelmill.models import ChunkItem, ChunkResult, Job
    from pixelmill.localstorage import LocalStorage

    (tmp_path / "src").mkdir()
    (tmp_path / "src/p.img").write_bytes(_with_gps(source_format))
    source, dest = LocalStorage(tmp_path / "src"), LocalStorage(tmp_path / "dst")
    outputs = []
    for fmt in ("jpeg", "png", "webp", "avif"):
        # 48x64 is the upright size itself: the image is copied, not resampled
        for size in ((48, 64), (30, 30)):
            spec = PipelineSpec(size=size, format=fmt, filters=("blur", "emboss"),
                                keep_metadata=keep)
            job = Job(source=source.uri, destination=dest.uri, run=f"{fmt}-{size[0]}",
                      spec=spec)
            made = pipeline.resize_images((ChunkItem(source="p.img", output="p.img"),), job,
                                          source, dest)
            pipeline.filter_images(ChunkResult(index=0, images=tuple(made)), job, dest)
            outputs += [path for path in (tmp_path / "dst" / job.run).rglob("p.img")]
    assert len(outputs) == 4 * 2 * 3
    for path in outputs:
        data = path.read_bytes()
        assert b"GPSLat" not in data and b"52,31" not in data, path
        exif = Image.open(io.BytesIO(data)).getexif()
        assert not dict(exif.get_ifd(0x8825)), path  # no GPS block
        assert 0x0112 not in exif, path  # no orientation: the pixels are upright
        if keep:
            assert (exif[0x010F], exif[0x0110], exif[0x8298]) == ("Canon", "EOS R5",
                                                                  "(c) Ada"), path
            assert exif.get_ifd(0x8769)[0x9003] == "2024:05:01 10:00:00", path
        else:
            assert not len(exif), (path, dict(exif))


def test_keeping_metadata_is_a_setting_of_its_own_and_leaves_older_stamps_alone():
    from pixelmill import provenance

    plain, kept = PipelineSpec(), PipelineSpec(keep_metadata=True)
    assert provenance.resized_stamp("a.jpg", "1", plain) != provenance.resized_stamp(
        "a.jpg", "1", kept)
    assert '"keep-metadata"' not in provenance._settings("resized", plain)


def test_a_bomb_in_a_format_known_by_its_name_is_refused_before_decoding(no_decoding):
    header = bytes([0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]) + (30000).to_bytes(2, "little") * 2
    tga = header + bytes([24, 0x20]) + b"\0" * 64
    with pytest.raises(ImageError, match="900 MP, above the 150 MP limit"):
        render_resized(tga, PipelineSpec(size=(20, 20)), "huge.tga")
