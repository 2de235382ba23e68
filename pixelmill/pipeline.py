"""The work of each stage on plain storage objects; tasks/ wraps these for Prefect."""

from __future__ import annotations

import heapq
import itertools
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pixelmill import provenance
from pixelmill.errors import ImageError
from pixelmill.filters import filter_folder
from pixelmill.imageops import (
    SNIFF_BYTES, decode, describe_non_image, format_by_name, render_filters, render_renditions,
    sniff,
)
from pixelmill.layout import (
    MAX_CHUNKS, PART_IMAGES, RAMP_DIVISOR, assign_outputs, cap_chunk_size, choose_chunk_size, in_shard,
    is_image_candidate, make_chunks, orphan_output, output_group, ramp_chunks, rendition_output,
)
from pixelmill.models import (
    Chunk, ChunkItem, ChunkResult, ImageResult, Job, PartRef, PartSummary, Plan,
    RenditionResult,
)
from pixelmill.overlap import PREFETCH, Writer, prefetched, threaded_map
from pixelmill.spec import PipelineSpec, Rendition
from pixelmill.storage import ObjectInfo, Storage, safe_key

log = logging.getLogger("pixelmill")
# Concurrent first-bytes reads at discovery: on GCS each is a round trip (~ms), so a listing
# of thousands is sniffed in seconds; locally it costs nothing.
SNIFF_THREADS = 16


def _inside(child: str, parent: str) -> str | None:
    """The key prefix of `child` inside `parent` if the destination lies in the source."""
    parent = parent.rstrip("/") + "/"
    return child[len(parent):].strip("/") + "/" if child.startswith(parent) else None


def _kept_rendition(rendition: Rendition, path: str, meta: Mapping[str, str] | None,
                    stamp: str) -> RenditionResult | None:
    """A rendition's output as the run folder holds it, if made with `stamp`."""
    size = (provenance.read_resized(meta)
            if meta is not None and meta.get(provenance.MADE) == stamp else None)
    if size is None:
        return None
    return _rendition_result(rendition, size[0], size[1], f"{rendition.folder}/{path}")


def _rendition_result(rendition: Rendition, width: int, height: int, output: str
                      ) -> RenditionResult:
    return RenditionResult(size=rendition.size_text, format=rendition.format, width=width,
                           height=height, output=output)


def _main_rendition(spec: PipelineSpec, output: str, width: int, height: int
                    ) -> tuple[RenditionResult, ...]:
    """The main output as a rendition, for a run of several (none for a run of one)."""
    if len(spec.renditions) == 1:
        return ()
    main = spec.renditions[0]
    return (_rendition_result(main, width, height, f"resized/{output}"),)


def _held(source: str, output: str, version: str, stamps: provenance.Stamps,
          held: dict[str, dict[str, Mapping[str, str]]], spec: PipelineSpec
          ) -> ChunkItem | ImageResult:
    """What the destination holds for one image: a `skipped` result when every output it
    needs is there and was made from this source version with these settings, else the
    image to make with its kept outputs noted. `held`: each output folder's outputs (by
    path inside the folder) and their metadata."""
    meta = held["resized"].get(output)
    size = (provenance.read_resized(meta)
            if meta is not None and meta.get(provenance.MADE) == stamps.resized(source, version)
            else None)
    kept_filters = tuple(
        folder for folder in stamps.filters
        if (found := held[folder].get(output)) is not None
        and found.get(provenance.MADE) == stamps.filter(folder, source, version))
    kept_renditions = []
    for rendition in stamps.renditions:
        path = rendition_output(output, spec.extension, rendition.extension)
        kept = _kept_rendition(rendition, path, held[rendition.folder].get(path),
                               stamps.rendition(rendition, source, version))
        if kept is not None:
            kept_renditions.append(kept)
    if (size is not None and len(kept_filters) == len(stamps.filters)
            and len(kept_renditions) == len(stamps.renditions)):
        outputs = {"resized": f"resized/{output}"}
        for folder in kept_filters:
            outputs[folder] = f"{folder}/{output}"
        return ImageResult(source=source, status="skipped", width=size[0], height=size[1],
                           outputs=outputs, notes=size[2], version=version,
                           renditions=(*_main_rendition(spec, output, *size[:2]),
                                       *kept_renditions))
    return ChunkItem(source=source, output=output, version=version,
                     kept_resized=size[:2] if size else None,
                     kept_notes=size[2] if size else (), kept_filters=kept_filters,
                     kept_renditions=tuple(kept_renditions))


# Where a run planned in parts keeps each part's plan and records while it runs.
PLAN_FOLDER = ".pixelmill-plan"
# Refused and ignored keys a parted run's manifest.json lists (each part's plan has its own).
MANIFEST_LIST = 1000
# Objects sniffed together (their first bytes read concurrently), and the most listed objects
# held while waiting for a batch to fill.
SNIFF_BATCH = 64
MAX_PENDING = 4096
# A last part smaller than this share of the part size joins the part before it.
TAIL_SHARE = 0.25


@dataclass
class PartPlan:
    """One part of a run's plan: a stretch of the source listing (at most about PART_IMAGES
    images, cut where no two sources of different parts could get the same output) and what
    the destination holds for it."""

    number: int
    items: list[ChunkItem] = field(default_factory=list)  # to make
    kept: list[ImageResult] = field(default_factory=list)
    rejected: list[ImageResult] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    manifest: list[dict] = field(default_factory=list)  # manifest.json's entry of each image
    item_bytes: int = 0  # listed bytes of the images to make


def _classified(source: Storage, listing: Iterable[ObjectInfo]) -> Iterator[tuple[str, Any]]:
    """Each listed object, in listing order, as ("image", (info, sniffed format or None)),
    ("rejected", failed ImageResult) or ("ignored", key). An image candidate by its name or
    content type, as listed; its bytes are checked where it is decoded anyway. Only objects
    with neither are sniffed, SNIFF_BATCH at a time (a JPEG with no extension)."""
    pending: list[tuple[bool, ObjectInfo]] = []
    unnamed = 0

    def named(info: ObjectInfo) -> tuple[str, Any]:
        if info.size:
            return "image", (info, None)
        # known from the listing alone
        return "rejected", ImageResult(source=info.key, status="failed",
                                       error=describe_non_image(b""))

    def flush() -> Iterator[tuple[str, Any]]:
        heads = iter(threaded_map(
            lambda info: source.read_head(info.key, SNIFF_BYTES) if info.size else b"",
            [info for is_named, info in pending if not is_named], SNIFF_THREADS))
        for is_named, info in pending:
            if is_named:
                yield named(info)
            else:  # an image by its first bytes, or by a name whose format has no signature
                fmt = sniff(next(heads))
                yield (("image", (info, fmt)) if fmt is not None or format_by_name(info.key)
                       else ("ignored", info.key))
        pending.clear()

    for info in listing:
        is_named = is_image_candidate(info.key, info.content_type)
        if is_named and not pending:
            yield named(info)
            continue
        pending.append((is_named, info))
        unnamed += not is_named
        if unnamed >= SNIFF_BATCH or len(pending) >= MAX_PENDING:
            yield from flush()
            unnamed = 0
    yield from flush()


def _key_of(kind: str, value: Any) -> str:
    return value[0].key if kind == "image" else value.source if kind == "rejected" else value


def _safe(key: str) -> str:
    try:
        return safe_key(key)
    except ValueError:
        return key


def _may_follow(group: str, key: str) -> bool:
    """Whether a source of output group `group` can still come after `key` in key order: the
    sources of a group are the group itself and the group followed by '.', so once the keys
    have passed 'group' + '.', none can ('photos/x.jpg' closes the group of 'photos.jpg')."""
    return key.startswith(group) and (len(key) == len(group) or key[len(group)] <= ".")


def _in_parts(classified: Iterable[tuple[str, Any]], part_images: int
              ) -> Iterator[list[tuple[str, Any, bool]]]:
    """`_cut_parts`, with a last part of fewer than a TAIL_SHARE of `part_images` images
    joined to the one before: a listing a little past the part size (a folder that grew by
    1 %) stays one part, planned and run as one. At most two parts are held."""
    pending: list[list[tuple[str, Any, bool]]] = []
    for part in _cut_parts(classified, part_images):
        pending.append(part)
        if len(pending) > 2:
            yield pending.pop(0)
    if len(pending) == 2 and sum(kind == "image" for kind, _, _ in pending[1]) \
            < part_images * TAIL_SHARE:
        pending = [pending[0] + pending[1]]
    yield from pending


def _cut_parts(classified: Iterable[tuple[str, Any]], part_images: int
               ) -> Iterator[list[tuple[str, Any, bool]]]:
    """The classified listing in parts of about `part_images` images, in the order of the
    keys made safe (the outputs' order). A part is cut only where no output group of it
    (`output_group`) can still have a source after the next key (`_may_follow`), so sources
    whose outputs could meet are always in one part. A key whose safe form sorts after where
    the listing gave it waits for its place; one whose safe form sorts before its part, once
    an earlier part is planned (rare: a backslash in a key), is marked an orphan: it gets an
    output name of its own (`orphan_output`). (kind, value, orphan) each."""
    part: list[tuple[str, Any, bool]] = []
    images = 0
    groups: list[str] = []  # output groups of the part that may still get sources
    low: str | None = None  # the part's first safe key
    position = ""
    emitted = False  # a part has been planned already
    waiting: list[tuple[str, int, str, Any]] = []  # heap: keys whose safe form comes later
    counter = 0

    def take(kind: str, value: Any, safe: str, in_order: bool = True
             ) -> Iterator[list[tuple[str, Any, bool]]]:
        nonlocal part, images, groups, low, position, emitted
        if in_order:
            groups = [group for group in groups if _may_follow(group, safe)]
            if images >= part_images and not groups:
                yield part
                part, images, low, emitted = [], 0, None, True
            low = safe if low is None else low
            position = safe
        part.append((kind, value, False))
        if kind == "image":
            images += 1
            group = output_group(safe)
            if group not in groups:
                groups.append(group)

    for kind, value in classified:
        key = _key_of(kind, value)
        safe = _safe(key)
        bound = min(key, safe)  # how far the listing has surely come
        while waiting and waiting[0][0] <= bound:
            held_safe, _, held_kind, held_value = heapq.heappop(waiting)
            yield from take(held_kind, held_value, held_safe)
        if safe > key:  # its place in safe order is further on: wait for it
            heapq.heappush(waiting, (safe, counter, kind, value))
            counter += 1
        elif safe >= position:
            yield from take(kind, value, safe)
        elif not emitted or (low is not None and safe >= low):  # behind, inside this part
            yield from take(kind, value, safe, in_order=False)
        else:
            part.append((kind, value, kind == "image"))
    while waiting:
        held_safe, _, held_kind, held_value = heapq.heappop(waiting)
        yield from take(held_kind, held_value, held_safe)
    if part:
        yield part


class _Held:
    """What the run folder holds, for one part at a time: one listing per output folder
    (`resized/`, each filter's), each in key order like the parts' outputs, read forward
    as far as the part's last output and never again. An output that sorts out of its part's
    order (a dotted folder beside a file of the same stem) is not found here and is made
    again: never kept without being seen."""

    def __init__(self, destination: Storage, job: Job) -> None:
        self.run = job.run
        self.streams = {}
        for folder in (*job.spec.rendition_folders,
                       *(filter_folder(name) for name in job.spec.filters)):
            stream = iter(destination.list(f"{job.run}/{folder}/"))
            self.streams[folder] = [stream, next(stream, None)]

    def take(self, outputs: Iterable[str]) -> dict[str, dict[str, Mapping[str, str]]]:
        """Each output folder's entries among `outputs` (paths inside the folder), with
        their metadata."""
        wanted = set(outputs)
        held: dict[str, dict[str, Mapping[str, str]]] = {folder: {} for folder in self.streams}
        if not wanted:
            return held
        last = max(wanted)
        for folder, state in self.streams.items():
            stream, head = state
            cut = len(self.run) + len(folder) + 2
            found = held[folder]
            while head is not None and (name := head.key[cut:]) <= last:
                if name in wanted:
                    found[name] = head.metadata
                head = next(stream, None)
            state[1] = head
        return held


def plan_parts(source: Storage, destination: Storage, job: Job,
               part_images: int = PART_IMAGES) -> Iterator[PartPlan]:
    """The run's plan a part at a time, streamed: list the source once (objects in the run
    folder of a destination inside the source, and folder placeholders, left out), classify,
    cut parts, give outputs, keep this shard's, and decide each image against the run folder
    (kept when every output it needs is there, made from this source version with these
    settings). The driver holds one part, never the whole listing."""
    skip_prefix = _inside(destination.uri, source.uri)
    listing = (info for info in source.list()
               if not (skip_prefix and info.key.startswith(skip_prefix))  # our own outputs
               and not (info.key.endswith("/") and info.size == 0))  # "folder" placeholders
    held_outputs = _Held(destination, job)
    stamps = provenance.Stamps(job.spec)
    # the formats' extensions: each image's outputs in every format are looked up
    extensions = list(dict.fromkeys(r.extension for r in job.spec.renditions))
    for number, elements in enumerate(_in_parts(_classified(source, listing), part_images),
                                      start=1):
        part = PartPlan(number=number)
        images = [(value, orphan) for kind, value, orphan in elements if kind == "image"]
        outputs = assign_outputs((info.key for (info, _), orphan in images if not orphan),
                                 job.spec.extension)
        for (info, _), orphan in images:
            if orphan:
                outputs[info.key] = orphan_output(info.key, job.spec.extension)
        part.rejected = [value for kind, value, _ in elements if kind == "rejected"]
        part.ignored = [value for kind, value, _ in elements if kind == "ignored"]
        if job.sharded:  # outputs were assigned over the whole part, so shards agree on names
            images = [(value, orphan) for value, orphan in images
                      if in_shard(value[0].key, job.shard_index, job.shard_count)]
            part.rejected = [r for r in part.rejected
                             if in_shard(r.source, job.shard_index, job.shard_count)]
        images.sort(key=lambda pair: pair[0][0].key)
        held = held_outputs.take(
            rendition_output(outputs[info.key], job.spec.extension, extension)
            for (info, _), orphan in images if not orphan for extension in extensions)
        for (info, fmt), _ in images:
            output = outputs[info.key]
            part.manifest.append({"source": info.key, "output": output, "format": fmt,
                                  "bytes": info.size, "version": info.version})
            found = _held(info.key, output, info.version, stamps, held, job.spec)
            if isinstance(found, ImageResult):
                part.kept.append(found)
            else:
                part.items.append(found)
                part.item_bytes += info.size
        yield part


@dataclass
class Survey:
    """What a dry run prints: `plan_parts` counted, a part at a time."""

    discovered: int = 0
    kept: int = 0
    to_make: int = 0
    to_make_bytes: int = 0
    rejected: int = 0
    ignored: int = 0
    parts: int = 0
    first_rejected: list[ImageResult] = field(default_factory=list)
    work: list[tuple[int, int]] = field(default_factory=list)  # each part: (to make, bytes)
    not_images: dict[str, int] = field(default_factory=dict)  # by extension

    part_images: int = PART_IMAGES

    def groups(self) -> list[PartRef]:
        """What a run would make its chunks of: all its images to make, or (planned in
        parts) each group of parts (`batches`), as one ref each."""
        if self.parts <= 1:
            return [PartRef(number=1, plan="", images=self.to_make,
                            item_bytes=self.to_make_bytes)]
        refs = [PartRef(number=n, plan="", images=images, item_bytes=size)
                for n, (images, size) in enumerate(self.work, start=1)]
        return [merged(group) for group in batches(refs, self.part_images)]

    def chunks(self, chunk_size: int | None, cores: int) -> tuple[int, int]:
        """(chunks, largest chunk size) a run would cut."""
        groups = self.groups()
        return (sum(part_chunks(ref, chunk_size, cores) for ref in groups),
                max((chunking(ref.images, ref.item_bytes, chunk_size, cores)[0]
                     for ref in groups), default=0))

    @property
    def child_flow_runs(self) -> int:
        """Child flow runs a run would start: one per group, none with a single group."""
        groups = len(self.groups()) if self.parts > 1 else 0
        return groups if groups > 1 else 0


def merged(group: Sequence[PartRef]) -> PartRef:
    """A group of parts as one ref: its images to make and their bytes (for chunking)."""
    return PartRef(number=group[0].number, plan="", images=sum(ref.images for ref in group),
                   item_bytes=sum(ref.item_bytes for ref in group))


def batches(parts: Sequence[PartRef], part_size: int) -> list[list[PartRef]]:
    """The parts with images to make, grouped in order so that a group has at most
    `part_size` images to make (a part with more is a group of its own): a re-run that makes
    a few images in each of many parts makes them in one group."""
    groups: list[list[PartRef]] = []
    images = 0
    for part in parts:
        if not part.images:
            continue
        if groups and images + part.images <= part_size:
            groups[-1].append(part)
            images += part.images
        else:
            groups.append([part])
            images = part.images
    return groups


def survey(source: Storage, destination: Storage, job: Job,
           part_images: int = PART_IMAGES) -> Survey:
    """Count what a run would do without holding more than one part of the plan."""
    found = Survey(part_images=part_images)
    for part in plan_parts(source, destination, job, part_images):
        found.parts += 1
        found.discovered += len(part.manifest) + len(part.rejected)
        found.kept += len(part.kept)
        found.to_make += len(part.items)
        found.to_make_bytes += part.item_bytes
        found.rejected += len(part.rejected)
        found.ignored += len(part.ignored)
        _by_extension(part.ignored, found.not_images)
        found.first_rejected += part.rejected[: max(0, 10 - len(found.first_rejected))]
        found.work.append((len(part.items), part.item_bytes))
    return found


def chunking(images: int, item_bytes: int, chunk_size: int | None, cores: int
             ) -> tuple[int, int]:
    """(chunk size, ramp) for `images` to make of `item_bytes` listed bytes: `chunk_size`,
    or one chosen from their count, mean size and the cores; never more than MAX_CHUNKS
    chunks."""
    mean_bytes = item_bytes / images if images else None
    size = cap_chunk_size(images, chunk_size or choose_chunk_size(images, cores, mean_bytes))
    return size, 0 if chunk_size else ramp_chunks(images, size, cores, mean_bytes)


def cut_chunks(items: list[ChunkItem], item_bytes: int, chunk_size: int | None,
               cores: int) -> tuple[list[Chunk], int]:
    """Chunks of the images to make (`chunking`), and the chunk size."""
    size, ramp = chunking(len(items), item_bytes, chunk_size, cores)
    if chunk_size and size != chunk_size:
        log.warning("--chunk-size %d would make %d chunks of %d images, more than the %d a "
                    "flow run keeps to: using %d", chunk_size, -(-len(items) // chunk_size),
                    len(items), MAX_CHUNKS, size)
    return make_chunks(items, size, ramp), size


def part_chunks(part: PartRef, chunk_size: int | None, cores: int) -> int:
    """How many chunks `cut_chunks` makes of a part."""
    size, ramp = chunking(part.images, part.item_bytes, chunk_size, cores)
    small = max(1, size // RAMP_DIVISOR)
    ramped = min(ramp, -(-part.images // small))
    return ramped + -(-max(0, part.images - ramped * small) // size)


def _part_key(job: Job, name: str) -> str:
    return job.run_file(f"{PLAN_FOLDER}/{name}")


def write_part(destination: Storage, job: Job, part: PartPlan) -> PartRef:
    """Put one part's plan in the run folder (for its child flow run); returns its ref."""
    key = _part_key(job, f"part-{part.number:04d}.json")
    document = {"items": [item.model_dump(mode="json", exclude_defaults=True)
                          for item in part.items],
                "decided": [record(image) for image in (*part.kept, *part.rejected)]}
    destination.write(key, json.dumps(document, separators=(",", ":")).encode(),
                      "application/json")  # items first: `read_items` stops after them
    return PartRef(number=part.number, plan=key.removeprefix(f"{job.run}/"),
                   images=len(part.items), kept=len(part.kept), rejected=len(part.rejected),
                   item_bytes=part.item_bytes)


def read_part(destination: Storage, job: Job, ref: PartRef
              ) -> tuple[list[ChunkItem], list[dict[str, Any]]]:
    """A part's images to make, and the records (`_record`) of its decided ones (kept and
    refused)."""
    document = json.loads(destination.read(f"{job.run}/{ref.plan}"))
    return ([ChunkItem.model_validate(item) for item in document["items"]],
            document["decided"])


def record(image: ImageResult) -> dict[str, Any]:
    """An image's result as the parts' files hold it: its report entry and its version."""
    entry = image.report_entry()
    if image.version:
        entry["version"] = image.version
    return entry


def from_record(entry: dict[str, Any]) -> ImageResult:
    """`record` read back."""
    return ImageResult(
        source=entry["source"], status=entry["status"], width=entry.get("width"),
        height=entry.get("height"), outputs=entry.get("outputs", {}),
        error=entry.get("error"), notes=tuple(entry.get("notes", ())),
        version=entry.get("version", ""),
        renditions=tuple(RenditionResult(**r) for r in entry.get("renditions", ())))


def write_records(destination: Storage, job: Job, number: int,
                  records: Iterable[dict[str, Any]]) -> str:
    """A part's per-image records (`_record`), sorted by source, one JSON object a line;
    returns the file's key relative to the run folder."""
    key = _part_key(job, f"records-{number:04d}.jsonl")
    lines = "".join(json.dumps(record, separators=(",", ":")) + "\n"
                    for record in sorted(records, key=lambda record: record["source"]))
    destination.write(key, lines.encode("utf-8"), "application/x-ndjson")
    return key.removeprefix(f"{job.run}/")


def summary_key(job: Job, number: int) -> str:
    """Where a part's flow run leaves its summary (`PartSummary`) for the run that started it
    (a deployment run's return value stays with its worker)."""
    return _part_key(job, f"summary-{number:04d}.json")


def write_summary(destination: Storage, job: Job, summary: PartSummary) -> None:
    destination.write(summary_key(job, summary.number),
                      summary.model_dump_json().encode("utf-8"), "application/json")


def read_summary(destination: Storage, job: Job, number: int) -> PartSummary:
    return PartSummary.model_validate_json(destination.read(summary_key(job, number)))


def remove_parts(destination: Storage, job: Job, parts: Sequence[PartRef],
                 records: Sequence[str], summaries: bool = False) -> None:
    """The parts' plans and records (and `summaries`, if their flow runs left them), once
    the run's own files hold them; a file already gone is fine, and one that cannot be
    removed is left for the next run's discovery."""
    summaries = [summary_key(job, part.number).removeprefix(f"{job.run}/")
                 for part in parts] if summaries else []
    for key in (*(part.plan for part in parts), *summaries, *records):
        try:
            destination.delete(f"{job.run}/{key}")
        except Exception as exc:  # noqa: BLE001  (tidying is never a reason to fail a run)
            log.warning("could not remove %s: %s", key, exc)


def read_records(destination: Storage, job: Job, records: str) -> Iterator[ImageResult]:
    """A part's records (`write_records`), in order."""
    text = destination.read(f"{job.run}/{records}").decode("utf-8")
    for line in text.splitlines():
        yield from_record(json.loads(line))


def _by_extension(keys: Iterable[str], into: dict[str, int] | None = None) -> dict[str, int]:
    """How many `keys` have each extension (lower case; "" for none)."""
    counts = into if into is not None else {}
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        extension = name[name.rfind("."):].lower() if "." in name.lstrip(".") else ""
        counts[extension] = counts.get(extension, 0) + 1
    return counts


def discover(source: Storage, destination: Storage, job: Job, chunk_size: int | None = None,
             cores: int = 1, write_manifest: bool = True,
             part_images: int = PART_IMAGES) -> Plan:
    """The run's plan (`plan_parts`). One part: its chunks, cut from the images still to
    make, with every image in manifest.json. More: each part's plan is written to the run
    folder (`write_part`) as it is made, and the plan names the parts; manifest.json then
    holds the parts and the counts.

    `chunk_size` None picks one from the image count and the cores (`choose_chunk_size`).
    `write_manifest` False writes nothing (`pixelmill run --dry-run`).
    """
    parts = plan_parts(source, destination, job, part_images)
    first = next(parts, None) or PartPlan(number=1)
    second = next(parts, None)
    if second is None:
        chunks, size = cut_chunks(first.items, first.item_bytes, chunk_size, cores)
        manifest = {
            "run": job.run,
            "source": job.source,
            "images": first.manifest,
            "rejected": [{"source": r.source, "error": r.error} for r in first.rejected],
            "ignored": first.ignored,
            "kept": len(first.kept),
            "chunk_size": size,
            "chunks": len(chunks),
        }
        if write_manifest:  # compact separators: json's C encoder (indenting is pure Python)
            destination.write(job.run_file("manifest.json"),
                              json.dumps(manifest, separators=(",", ":")).encode(),
                              "application/json")
        return Plan(discovered=len(first.manifest) + len(first.rejected), chunks=tuple(chunks),
                    rejected=tuple(first.rejected), kept=tuple(first.kept), chunk_size=size,
                    ignored=len(first.ignored), not_images=_by_extension(first.ignored))
    if not write_manifest:
        raise ValueError("a plan in parts is written to the run folder; a dry run uses survey()")
    refs: list[PartRef] = []
    discovered = ignored = 0
    not_images: dict[str, int] = {}
    rejected: list[dict] = []
    ignored_keys: list[str] = []
    for part in itertools.chain((first, second), parts):
        refs.append(write_part(destination, job, part))
        discovered += len(part.manifest) + len(part.rejected)
        ignored += len(part.ignored)
        _by_extension(part.ignored, not_images)
        rejected += [{"source": r.source, "error": r.error}
                     for r in part.rejected[: max(0, MANIFEST_LIST - len(rejected))]]
        ignored_keys += part.ignored[: max(0, MANIFEST_LIST - len(ignored_keys))]
    manifest = {
        "run": job.run,
        "source": job.source,
        "discovered": discovered,
        "parts": [ref.model_dump(exclude={"plan"}) for ref in refs],
        "rejected": rejected,
        "ignored": ignored_keys,
        "ignored_total": ignored,
        "kept": sum(ref.kept for ref in refs),
    }
    destination.write(job.run_file("manifest.json"),
                      json.dumps(manifest, separators=(",", ":")).encode(), "application/json")
    planned = {f"{job.run}/{ref.plan}" for ref in refs}
    for info in destination.list(f"{job.run}/{PLAN_FOLDER}/"):  # an earlier attempt's
        if info.key not in planned:
            destination.delete(info.key)
    return Plan(discovered=discovered, chunks=(), chunk_size=0, ignored=ignored,
                parts=tuple(refs), not_images=not_images)


def _overlaps(storage: Storage) -> bool:
    """Whether `storage`'s reads and writes are worth doing in background threads."""
    return getattr(storage, "overlap", True)


def _kept_outputs(item: ChunkItem) -> dict[str, str]:
    return {folder: f"{folder}/{item.output}" for folder in item.kept_filters}


def resize_images(items: tuple[ChunkItem, ...], job: Job, source: Storage,
                  destination: Storage) -> list[ImageResult]:
    """Make each image's renditions (every size in every format) that the run folder does
    not hold, all from one decode; a bad image is a failed result, storage errors raise.
    Each output is written with its stamp.

    On storage with round trips (GCS) sources are read ahead and outputs written in the
    background (`overlap`); on a local folder both in line."""
    spec = job.spec
    stamps = provenance.Stamps(spec)
    main, *others = spec.renditions
    done: dict[str, ImageResult] = {}
    todo: list[tuple[ChunkItem, list[Rendition]]] = []
    for item in items:
        kept = {(r.size, r.format) for r in item.kept_renditions}
        wanted = [r for r in others if (r.size_text, r.format) not in kept]
        if item.kept_resized is None:
            wanted.insert(0, main)
        if wanted:
            todo.append((item, wanted))
            continue
        done[item.source] = ImageResult(
            source=item.source, status="ok", width=item.kept_resized[0],
            height=item.kept_resized[1], notes=item.kept_notes, version=item.version,
            outputs={"resized": f"resized/{item.output}", **_kept_outputs(item)},
            renditions=(*_main_rendition(spec, item.output, *item.kept_resized),
                        *item.kept_renditions))
    with Writer(destination.write, _overlaps(destination)) as writer:
        for (item, wanted), data in prefetched(todo, lambda pair: source.read(pair[0].source),
                                               PREFETCH if _overlaps(source) else 0):
            try:
                raw = data.result()  # any other storage error raises: the chunk is retried
            except FileNotFoundError:
                done[item.source] = ImageResult(
                    source=item.source, status="failed",
                    error="vanished from the source after it was listed")
                continue
            try:
                encoded, notes = render_renditions(raw, spec, wanted, item.source)
            except ImageError as exc:
                done[item.source] = ImageResult(source=item.source, status="failed",
                                                error=str(exc))
                continue
            except Exception as exc:  # noqa: BLE001  (a decoder's own error: this image only)
                done[item.source] = ImageResult(
                    source=item.source, status="failed",
                    error=f"cannot decode: {type(exc).__name__}: {exc}")
                continue
            del raw
            made = {}
            for output in encoded:
                rendition = output.rendition
                path = (f"{rendition.folder}/"
                        f"{rendition_output(item.output, spec.extension, rendition.extension)}")
                stamp = (stamps.resized(item.source, item.version) if rendition == main else
                         stamps.rendition(rendition, item.source, item.version))
                writer.submit(f"{job.run}/{path}", output.data, rendition.content_type,
                              provenance.resized_metadata(stamp, output.width, output.height,
                                                          notes))
                made[rendition] = _rendition_result(rendition, output.width, output.height,
                                                    path)
            width, height = ((made[main].width, made[main].height) if main in made
                             else item.kept_resized)
            by_label = {(r.size, r.format): r for r in (*made.values(), *item.kept_renditions)}
            renditions = (*_main_rendition(spec, item.output, width, height),
                          *(by_label[(r.size_text, r.format)] for r in others))
            done[item.source] = ImageResult(
                source=item.source, status="ok", width=width, height=height,
                outputs={"resized": f"resized/{item.output}", **_kept_outputs(item)},
                notes=tuple(notes), version=item.version, renditions=renditions)
    return [done[item.source] for item in items]


def _unreadable_resized(image: ImageResult, destination: Storage, job: Job,
                        exc: Exception) -> ImageResult:
    """The image failed, when its resized output is gone (a retry after the removal below) or
    does not decode: damaged on disk behind a stamp that still matches. Such a file is
    removed (best effort), so that the next run makes it again instead of failing here on
    every run; nothing reports it made."""
    resized = image.outputs["resized"]
    if isinstance(exc, FileNotFoundError):
        reason = "is missing"
    else:
        reason = f"does not decode ({exc})"
        try:
            destination.delete(f"{job.run}/{resized}")
        except Exception as gone:  # noqa: BLE001  (still this image's failure only)
            log.warning("could not remove %s, which does not decode: %s", resized, gone)
    return ImageResult(source=image.source, status="failed", version=image.version,
                       error=f"filter stage: its resized output {resized} {reason}: made "
                             "again by the next run")


def filter_images(resized: ChunkResult, job: Job, destination: Storage) -> list[ImageResult]:
    """Apply each requested filter whose output is not kept to each resized image of a chunk,
    and write the variants with their stamps."""
    spec = job.spec
    stamps = provenance.Stamps(spec)

    def missing(image: ImageResult) -> tuple[str, ...]:
        return tuple(name for name in spec.filters if filter_folder(name) not in image.outputs)

    todo = [image for image in resized.images if image.status == "ok" and missing(image)]
    read = lambda image: destination.read(f"{job.run}/{image.outputs['resized']}")  # noqa: E731
    filtered: dict[str, ImageResult] = {}
    with Writer(destination.write, _overlaps(destination)) as writer:
        for image, data in prefetched(todo, read, PREFETCH if _overlaps(destination) else 0):
            names = missing(image)
            try:
                pixels = decode(data.result())  # any other storage error raises: retried
            except (FileNotFoundError, ImageError) as exc:
                filtered[image.source] = _unreadable_resized(image, destination, job, exc)
                continue
            try:
                variants = render_filters(pixels, spec.model_copy(update={"filters": names}))
            except ImageError as exc:
                filtered[image.source] = image.model_copy(
                    update={"status": "failed", "error": f"filter stage: {exc}"})
                continue
            relpath = image.outputs["resized"].removeprefix("resized/")
            outputs = dict(image.outputs)
            for name in names:
                folder = filter_folder(name)
                outputs[folder] = f"{folder}/{relpath}"
                writer.submit(f"{job.run}/{folder}/{relpath}", variants[folder],
                              spec.content_type,
                              {provenance.MADE: stamps.filter(folder, image.source,
                                                              image.version)})
            filtered[image.source] = image.model_copy(update={"outputs": outputs})
    return [filtered.get(image.source, image) for image in resized.images]
