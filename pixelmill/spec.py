"""What a run should produce: sizes, fit, filters, format. Small frozen pydantic models."""

from __future__ import annotations

import functools
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pixelmill.errors import UsageError

Fit = Literal["contain", "cover", "fill"]
OutputFormat = Literal["jpeg", "png", "webp", "avif"]
# Task runners: `auto` (the command line's default: threads, a process pool or Ray, whichever
# runs the batch faster), Ray, a thread pool, Prefect's process pool, or one thread (a baseline).
RUNNERS = ("auto", "ray", "threads", "processes", "sequential")

# Largest output side we accept; beyond this a "thumbnail pipeline" is a mistake, and a
# typo such as 40000x30000 would make every worker allocate gigabytes.
MAX_OUTPUT_SIDE = 16384

EXTENSIONS: dict[str, str] = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "avif": ".avif"}
CONTENT_TYPES: dict[str, str] = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "avif": "image/avif",
}


class Frozen(BaseModel):
    """The base of pixelmill's models: immutable (they travel between tasks and are cache
    keys) and strict (a misspelt field is an error, not ignored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")


# Images to make up to which `auto` runs a batch on one machine (threads or a process pool,
# below), and past which on Ray, which a batch that large also needs to spread over a
# cluster. On 2 cores Ray was never faster than threads or processes, up to 200,000 images
# (README, "Which runner `auto` takes").
CROSSOVER_IMAGES = 200_000
# Images to make from which `auto` takes a process per core instead of threads in the flow's
# own process. Pillow releases the GIL while it decodes, resizes and encodes, but between
# those calls two threads hand Python's lock back and forth: on small images that costs
# ~0.2 ms an image and made threads slower than one thread. A pool's workers take ~1.5 s to
# start, so below this threads finish first (measured on 2 cores: 6,000 small images even,
# 10,000 processes ahead by 0.2-1.7 s, 20,000 by 3.5-4 s; camera images even at any count).
PROCESSES_FROM = 10_000


def auto_runner(images: int, needs_ray: str | None = None,
                crossover: int = CROSSOVER_IMAGES,
                processes_from: int = PROCESSES_FROM) -> tuple[str, str]:
    """What `--runner auto` runs a batch of `images` to make on, and why: ("threads",
    "processes" or "ray", reason). `needs_ray` is a reason only Ray can serve (a stage that
    asks for GPUs)."""
    if needs_ray:
        return "ray", needs_ray
    if images > crossover:
        return "ray", (f"{images} images to make, more than the {crossover} up to which "
                       "one machine's threads or processes are faster")
    if images >= processes_from:
        return "processes", (f"{images} images to make on one machine, where a process per "
                             f"core is faster than threads from {processes_from}")
    return "threads", (f"{images} images to make on one machine, where threads are faster "
                       f"below {processes_from}")


def check_runner(runner: str) -> str:
    if runner not in RUNNERS:
        raise UsageError(f"--runner {runner!r}: choose from {', '.join(RUNNERS)}")
    return runner


def check_format(value: object) -> str:
    text = str(value).lower()
    text = "jpeg" if text == "jpg" else text
    if text not in EXTENSIONS:
        raise UsageError(f"--format {value!r}: choose from {' | '.join(EXTENSIONS)}")
    return text


def parse_size(text: str) -> tuple[int, int]:
    """Parse 'WxH' (e.g. '400x300') into (width, height) in pixels."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", str(text))
    if not match:
        raise UsageError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 400x300")
    width, height = int(match[1]), int(match[2])
    if not (1 <= width <= MAX_OUTPUT_SIDE and 1 <= height <= MAX_OUTPUT_SIDE):
        raise UsageError(
            f"--size {text!r}: each side must be between 1 and {MAX_OUTPUT_SIDE} pixels"
        )
    return width, height


def _as_size(value: object) -> tuple[int, int]:
    if isinstance(value, str):
        return parse_size(value)
    width, height = value  # type: ignore[misc]
    return parse_size(f"{int(width)}x{int(height)}")


def _listed(value: object) -> list:
    """One value or several: 'webp' and ['webp'] alike; a size given as [400, 300] is one."""
    if isinstance(value, (str, bytes)) or (
            isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(side, int) for side in value)):
        return [value]
    return list(value)  # type: ignore[call-overload]


# Named sets of renditions (`--preset`); the README's table documents them. `web`: boxes of
# 480, 960 and 1920 pixels (a landscape photo that wide), each in AVIF, WebP and a JPEG
# fallback, for a <picture> with a srcset.
PRESETS: dict[str, dict[str, list]] = {
    "thumbnails": {"sizes": ["100x100"], "formats": ["jpeg"]},
    "web": {"sizes": ["480x480", "960x960", "1920x1920"], "formats": ["jpeg", "webp", "avif"]},
}


class _Encoded:
    """The file extension and content type of a model's `format` field."""

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


class Rendition(_Encoded, Frozen):
    """One output of each image: a size in a format, and the folder it is written to."""

    size: tuple[int, int]
    format: OutputFormat
    folder: str  # "resized" for the first size, "resized-<W>x<H>" for each other

    @property
    def size_text(self) -> str:
        """The size as written on the command line and in the records: "400x300"."""
        return f"{self.size[0]}x{self.size[1]}"


@functools.lru_cache(maxsize=64)
def _renditions(spec: PipelineSpec) -> tuple[Rendition, ...]:
    return tuple(
        Rendition(size=size, format=fmt,
                  folder="resized" if n == 0 else f"resized-{size[0]}x{size[1]}")
        for n, size in enumerate(spec.sizes) for fmt in spec.formats)


class PipelineSpec(_Encoded, Frozen):
    """The settings of one run; part of report.json and of every chunk's cache key.

    Every size is written in every format (`renditions`), all from one decode. The first size
    in the first format is the run's main output: `resized/`, the gallery's picture, and what
    the filters apply to; each further size has a folder of its own (`resized-<W>x<H>/`), so a
    run of one size has the layout it always had and a size added later leaves the others
    where they are. `sizes` / `formats` (lists) or `preset` may be given instead of `size`,
    `more_sizes`, `format` and `more_formats`."""

    size: tuple[int, int] = (400, 300)
    more_sizes: tuple[tuple[int, int], ...] = ()
    fit: Fit = "contain"
    filters: tuple[str, ...] = ()
    format: OutputFormat = "jpeg"
    more_formats: tuple[OutputFormat, ...] = ()
    quality: int = Field(85, ge=1, le=100)
    upscale: bool = False
    # Outputs carry no EXIF unless asked; then only capture date, camera and copyright
    # (imageops.KEPT_EXIF), never a GPS position.
    keep_metadata: bool = False

    @model_validator(mode="before")
    @classmethod
    def _lists(cls, data: object) -> object:
        """`preset`, `sizes` and `formats` into the fields; repeats dropped, order kept."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset = data.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise UsageError(f"--preset {preset!r}: choose from {', '.join(PRESETS)}")
            for name, value in PRESETS[preset].items():
                data.setdefault(name, value)
        for one, more, many, parse in (("size", "more_sizes", "sizes", _as_size),
                                       ("format", "more_formats", "formats", check_format)):
            values = _listed(data.pop(many)) if many in data else [
                *([data[one]] if one in data else []), *_listed(data.get(more, ()))]
            if not values:
                continue
            unique = list(dict.fromkeys(parse(value) for value in values))
            data[one], data[more] = unique[0], tuple(unique[1:])
        return data

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return _as_size(value)

    @field_validator("more_sizes", mode="before")
    @classmethod
    def _more_sizes(cls, value: object) -> object:
        return tuple(_as_size(size) for size in _listed(value))

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, value: object) -> object:
        from pixelmill.filters import canonical_filter

        if isinstance(value, str):
            value = [value]
        names = [canonical_filter(str(name)) for name in value]  # type: ignore[union-attr]
        return tuple(dict.fromkeys(names))  # keep order, drop repeats

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        return (self.size, *self.more_sizes)

    @property
    def formats(self) -> tuple[OutputFormat, ...]:
        return (self.format, *self.more_formats)

    @property
    def renditions(self) -> tuple[Rendition, ...]:
        """Every size in every format, the main one (first size, first format) first
        (worked out once per spec: a plan asks for each image)."""
        return _renditions(self)

    @property
    def sizes_text(self) -> str:
        return ", ".join(f"{width}x{height}" for width, height in self.sizes)

    @property
    def formats_text(self) -> str:
        return " + ".join(self.formats)

    @property
    def rendition_folders(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(rendition.folder for rendition in self.renditions))


class StageResources(Frozen):
    """What one chunk task of a stage asks Ray for: CPUs, GPUs, memory."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_mb: int | None = Field(None, ge=1)

    def ray_options(self) -> dict[str, float | int]:
        """Keyword arguments for `prefect_ray.context.remote_options` / `ray.remote`."""
        options: dict[str, float | int] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.memory_mb:
            options["memory"] = self.memory_mb * 1024 * 1024
        return options
