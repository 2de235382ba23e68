"""The small frozen models that travel between tasks, and the report.json contract."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, Field

from pixelmill.spec import Frozen, PipelineSpec, StageResources

Status = Literal["ok", "failed", "skipped"]


class Job(Frozen):
    """Where a run reads and writes, and what it makes. Small: it goes into every task."""

    source: str
    destination: str
    run: str
    spec: PipelineSpec = PipelineSpec()
    gcp_credentials_block: str | None = None  # a prefect-gcp GcpCredentials block, else ADC
    shard_index: int = Field(0, ge=0)
    shard_count: int = Field(1, ge=1)

    @property
    def sharded(self) -> bool:
        return self.shard_count > 1

    def run_file(self, name: str) -> str:
        """A run-level file of this shard: 'report.json' or 'report-shard-2-of-4.json'."""
        if not self.sharded:
            return f"{self.run}/{name}"
        stem, dot, ext = name.rpartition(".")
        return f"{self.run}/{stem}-shard-{self.shard_index}-of-{self.shard_count}{dot}{ext}"

    def without_filters(self) -> Job:
        """The job as the resize stage sees it (its cache key must not change with filters)."""
        return self.model_copy(update={"spec": self.spec.model_copy(update={"filters": ()})})



class RenditionResult(Frozen):
    """One output of an image in a run of several sizes or formats: the size asked for
    ("400x300"), the format, the pixel size made, and its path in the run folder."""

    size: str
    format: str
    width: int
    height: int
    output: str


class ChunkItem(Frozen):
    """One image of a chunk: its key under the source and its relative output path, and
    the outputs the destination already holds for it (found by discovery, to be kept)."""

    source: str
    output: str
    version: str = ""
    # The kept resized output's pixel size and notes: the resize stage does not redo it.
    kept_resized: tuple[int, int] | None = None
    kept_notes: tuple[str, ...] = ()
    # Folders of the kept filter outputs: the filter stage makes only the others.
    kept_filters: tuple[str, ...] = ()
    # The kept outputs of the other renditions (sizes and formats but the main one).
    kept_renditions: tuple[RenditionResult, ...] = ()


class Chunk(Frozen):
    index: int
    items: tuple[ChunkItem, ...]

    @property
    def label(self) -> str:
        return f"{self.index:03d}"


class ImageResult(Frozen):
    """What happened to one source image; paths are relative to the run folder."""

    source: str
    status: Status
    width: int | None = None
    height: int | None = None
    outputs: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    notes: tuple[str, ...] = ()
    # The source's version (GCS generation; a local file's "<mtime>-<ctime>"): carried so that
    # a later stage's stamps and cache key change with it.
    version: str = ""
    # In a run of several sizes or formats: every rendition made or kept, the main one first.
    renditions: tuple[RenditionResult, ...] = ()

    def report_entry(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"source": self.source, "status": self.status}
        if self.width is not None:
            entry["width"], entry["height"] = self.width, self.height
        if self.outputs:
            entry["outputs"] = dict(self.outputs)
        if self.error:
            entry["error"] = self.error
        if self.notes:
            entry["notes"] = list(self.notes)
        if self.renditions:
            entry["renditions"] = [rendition.model_dump() for rendition in self.renditions]
        return entry


class ChunkResult(Frozen):
    """A chunk after one stage: per image results, and the resources Ray gave the task and
    the Ray node it ran on ("" off Ray)."""

    index: int
    images: tuple[ImageResult, ...]
    resources: dict[str, float] = Field(default_factory=dict)
    node: str = ""


class PartRef(Frozen):
    """One part of a run planned in parts: where its plan is (relative to the run folder)
    and what it holds."""

    number: int
    plan: str
    images: int  # to make
    kept: int = 0
    rejected: int = 0
    item_bytes: int = 0  # listed bytes of the images to make

    @property
    def label(self) -> str:
        return f"{self.number:04d}"


class Plan(Frozen):
    """What discovery found: the chunks to process, the images whose outputs are all kept
    from an earlier run, and the objects refused up front; or, for a run too big for one
    flow run, its `parts` (each one's plan is in the run folder)."""

    discovered: int
    chunks: tuple[Chunk, ...]
    rejected: tuple[ImageResult, ...] = ()
    kept: tuple[ImageResult, ...] = ()
    chunk_size: int
    ignored: int = 0  # objects that are not images (listed in manifest.json)
    parts: tuple[PartRef, ...] = ()
    # those objects by their extension ("" for none), for the report and the summary
    not_images: dict[str, int] = Field(default_factory=dict)


class ChunkSummary(Frozen):
    """Per chunk: its final state and the resources each stage ran with (report.json)."""

    index: int
    state: str
    images: int
    resources: dict[str, dict[str, float]] = Field(default_factory=dict)
    nodes: dict[str, str] | None = None  # the Ray node id each stage ran on (on Ray only)
    error: str | None = None
    finished_s: float | None = None  # seconds from the flow's start to this chunk's end
    part: int | None = None  # the part it belongs to, in a run planned in parts


class Counts(BaseModel):
    discovered: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0

    @classmethod
    def of(cls, statuses: Iterable[str], discovered: int | None = None) -> Counts:
        """The counts of these images' statuses (`discovered`: default, how many)."""
        tally = Counter(statuses)
        return cls(discovered=sum(tally.values()) if discovered is None else discovered,
                   ok=tally["ok"], failed=tally["failed"], skipped=tally["skipped"])

    def __add__(self, other: Counts) -> Counts:
        return Counts(**{name: getattr(self, name) + getattr(other, name)
                         for name in type(self).model_fields})


class PartSummary(Frozen):
    """What a part's child flow run did: its counts and chunks, its first failures, and the
    file of its per-image records (JSON lines by source, relative to the run folder)."""

    number: int
    records: str
    counts: Counts
    chunks: tuple[ChunkSummary, ...] = ()
    failures: tuple[ImageResult, ...] = ()
    state: str = "Completed"


class RunnerChoice(BaseModel):
    """Which task runner ran a flow's chunks, and why (`--runner auto` says why it chose)."""

    name: str
    reason: str = ""


# The per-image records of a run, one JSON object a line, next to report.json.
IMAGES_FILE = "images.jsonl"
# Failed records repeated in report.json; all of them are in the images file.
MAX_REPORT_FAILURES = 1000
# One per-image record of images.jsonl (one encoder: `json.dumps` sets one up per call).
RECORD_ENCODER = json.JSONEncoder(separators=(", ", ": "))


class RunReport(BaseModel):
    """report.json and images.jsonl (the README documents both): other tools read them."""

    job: Job = Field(exclude=True)
    run: str
    source: str
    destination: str
    spec: PipelineSpec
    counts: Counts
    images: list[ImageResult]
    duration_s: float
    chunks: list[ChunkSummary] = Field(default_factory=list)
    started_at: str | None = None  # UTC ISO time the flow started (duration_s counts from it)
    runner: RunnerChoice | None = None
    # A run planned in parts: how many, and `images` holds only (the first) failures; the
    # records are written from the parts' files (`gallery.build_gallery_of_parts`).
    parts: int = 0
    # Listed files that are not images (not counted as discovered), by extension ("" none).
    not_images: dict[str, int] = Field(default_factory=dict)

    @classmethod
    def build(
        cls,
        job: Job,
        discovered: int,
        images: list[ImageResult],
        duration_s: float,
        chunks: list[ChunkSummary] | None = None,
        started_at: str | None = None,
        runner: RunnerChoice | None = None,
        counts: Counts | None = None,
        parts: int = 0,
        not_images: dict[str, int] | None = None,
    ) -> RunReport:
        images = sorted(images, key=lambda image: image.source)
        if counts is None:
            counts = Counts.of((image.status for image in images), discovered)
        return cls(
            job=job,
            run=job.run,
            source=job.source,
            destination=job.destination,
            spec=job.spec,
            counts=counts,
            images=images,
            duration_s=round(duration_s, 3),
            chunks=chunks or [],
            started_at=started_at,
            runner=runner,
            parts=parts,
            not_images=dict(sorted((not_images or {}).items(),
                                   key=lambda pair: (-pair[1], pair[0]))),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """report.json: the run's summary. Per-image records are in `images_file`
        (`to_jsonl`); the failed ones are also here, the first MAX_REPORT_FAILURES by source
        (`counts.failed` is the total)."""
        failures = [image.report_entry() for image in self.failures[:MAX_REPORT_FAILURES]]
        return {
            "run": self.run,
            "source": self.source,
            "destination": self.destination,
            "spec": self.spec.model_dump(mode="json"),
            "counts": self.counts.model_dump(),
            "images_file": self.images_file,
            "duration_s": self.duration_s,
            "started_at": self.started_at,
            "chunks": [chunk.model_dump(mode="json", exclude_none=True) for chunk in self.chunks],
            **({"runner": self.runner.model_dump()} if self.runner else {}),
            **({"shard": {"index": self.job.shard_index, "count": self.job.shard_count}}
               if self.job.sharded else {}),
            **({"parts": self.parts} if self.parts else {}),
            "not_images": {"total": sum(self.not_images.values()),
                           "by_extension": self.not_images},
            "failures": failures,
        }

    def not_images_line(self, shown: int = 5) -> str | None:
        """'331 files not images: 300 .txt, 20 without an extension, ...' (None if none)."""
        return not_images_line(self.not_images, shown)


    @property
    def images_file(self) -> str:
        """The per-image records' file, relative to the run folder: 'images.jsonl' (or
        'images-shard-2-of-4.jsonl')."""
        return self.job.run_file(IMAGES_FILE).split("/", 1)[1]

    def to_json(self) -> str:
        """report.json's text: indented, with one line per failure (json's C encoder; an
        indented dump of many records goes through the pure-Python one)."""
        document = self.to_json_dict()
        failures = document.pop("failures")
        head = json.dumps({**document, "failures": []}, indent=2)
        if not failures:
            return head
        lines = ",\n    ".join(json.dumps(entry, separators=(", ", ": "))
                               for entry in failures)
        # the key's own text: a string value cannot hold it (its quotes would be escaped)
        before, _, after = head.partition('"failures": []')
        return f'{before}"failures": [\n    {lines}\n  ]{after}'

    def to_jsonl(self) -> str:
        """images.jsonl's text: one record per image, sorted by source (report.json's
        summary names this file)."""
        return "".join(self.jsonl_lines())

    def jsonl_lines(self) -> list[str]:
        """images.jsonl's lines, one per image of `images`, in order."""
        encode = RECORD_ENCODER.encode
        return [encode(image.report_entry()) + "\n" for image in self.images]

    def __iter__(self):  # type: ignore[override]
        """(field, value) pairs without the per-image records. Prefect walks a flow's return
        value this way looking for futures; a report holds none, and walking 20,000 records
        cost the flow about a second. Serialization (`model_dump`) is not affected."""
        for name, value in super().__iter__():
            if name != "images":
                yield name, value

    @property
    def failures(self) -> list[ImageResult]:
        return [image for image in self.images if image.status == "failed"]

    @property
    def shown(self) -> list[ImageResult]:
        """The images the run folder holds: made now (ok) or kept from earlier (skipped)."""
        return [image for image in self.images if image.status != "failed"]


def not_images_line(by_extension: dict[str, int], shown: int = 5) -> str | None:
    """Listed files that are not images, by extension, most first, in a line (None if
    none)."""
    total = sum(by_extension.values())
    if not total:
        return None
    ordered = sorted(by_extension.items(), key=lambda pair: (-pair[1], pair[0]))
    kinds = [f"{count} {extension or 'without an extension'}"
             for extension, count in ordered[:shown]]
    more = len(ordered) - shown
    return (f"{total} {'file' if total == 1 else 'files'} not images: {', '.join(kinds)}"
            + (f" and {more} more kinds" if more > 0 else ""))

__all__ = [
    "not_images_line",
    "Chunk", "ChunkItem", "ChunkResult", "ChunkSummary", "Counts", "ImageResult", "Job",
    "PartRef", "PartSummary", "PipelineSpec", "Plan", "RunnerChoice", "RunReport",
    "StageResources",
]
