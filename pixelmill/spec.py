"""What a run should produce: sizes, fit, filters, format. Small frozen pydantic models."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pixelmill.errors import UsageError

Fit = Literal["contain", "cover", "fill"]
OutputFormat = Literal["jpeg", "png", "webp", "avif"]
# Task runners: `auto` (the command line's default: threads or Ray, whichever one machine runs
# the batch faster), Ray, a thread pool, Prefect's process pool, or one thread (a baseline).
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
    model_config = ConfigDict(frozen=True, extra="forbid")


# Images to make up to which `auto` runs a batch on threads in the flow's own process.
# Pillow releases the GIL while it decodes, resizes and encodes, so a thread per core keeps
# the cores busy without Ray's per-command cost (connecting, workers that import Prefect,
# shutting down). Threads were as fast as Ray or faster at every size measured on 2 cores,
# up to 200,000 images (README, "Which runner `auto` takes"); past that Ray, which a batch
# that large also needs to spread over a cluster.
CROSSOVER_IMAGES = 200_000


def auto_runner(images: int, needs_ray: str | None = None,
                crossover: int = CROSSOVER_IMAGES) -> tuple[str, str]:
    """What `--runner auto` runs a batch of `images` to make on, and why: ("threads" or
    "ray", reason). `needs_ray` is a reason only Ray can serve (a stage that asks for GPUs)."""
    if needs_ray:
        return "ray", needs_ray
    if images > crossover:
        return "ray", (f"{images} images to make, more than the {crossover} up to which "
                       "threads are faster on one machine")
    return "threads", (f"{images} images to make on one machine, where threads are faster "
                       f"up to {crossover}")


def check_runner(runner: str) -> str:
    if runner not in RUNNERS:
        raise UsageError(f"--runner {runner!r}: choose from {', '.join(RUNNERS)}")
    return runner


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


class PipelineSpec(Frozen):
    """The settings of one run; part of report.json and of every chunk's cache key."""

    size: tuple[int, int] = (400, 300)
    fit: Fit = "contain"
    filters: tuple[str, ...] = ()
    format: OutputFormat = "jpeg"
    quality: int = Field(85, ge=1, le=100)
    upscale: bool = False
    # Outputs carry no EXIF unless asked; then only capture date, camera and copyright
    # (imageops.KEPT_EXIF), never a GPS position.
    keep_metadata: bool = False

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_size(value)
        return value

    @field_validator("size")
    @classmethod
    def _size_range(cls, value: tuple[int, int]) -> tuple[int, int]:
        return parse_size(f"{value[0]}x{value[1]}")

    @field_validator("filters", mode="before")
    @classmethod
    def _filters(cls, value: object) -> object:
        from pixelmill.filters import canonical_filter

        if isinstance(value, str):
            value = [value]
        names = [canonical_filter(str(name)) for name in value]  # type: ignore[union-attr]
        return tuple(dict.fromkeys(names))  # keep order, drop repeats

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


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
