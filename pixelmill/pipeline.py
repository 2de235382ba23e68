"""The work of each stage on plain storage objects; tasks/ wraps these for Prefect."""

from __future__ import annotations

import json
import logging

from pixelmill import provenance
from pixelmill.errors import ImageError
from pixelmill.filters import filter_folder
from pixelmill.imageops import (
    SNIFF_BYTES, decode, describe_non_image, render_filters, render_resized, sniff,
)
from pixelmill.layout import (
    MAX_CHUNKS, assign_outputs, cap_chunk_size, choose_chunk_size, in_shard,
    is_image_candidate, make_chunks, ramp_chunks,
)
from pixelmill.models import ChunkItem, ChunkResult, ImageResult, Job, Plan
from pixelmill.overlap import Writer, prefetched, threaded_map
from pixelmill.storage import ObjectInfo, Storage

log = logging.getLogger("pixelmill")
# Concurrent first-bytes reads at discovery: on GCS each is a round trip (~ms), so a listing
# of thousands is sniffed in seconds; locally it costs nothing.
SNIFF_THREADS = 16


def _inside(child: str, parent: str) -> str | None:
    """The key prefix of `child` inside `parent` if the destination lies in the source."""
    parent = parent.rstrip("/") + "/"
    return child[len(parent):].strip("/") + "/" if child.startswith(parent) else None


def _held(item: ChunkItem, job: Job, held: dict[str, ObjectInfo]) -> ChunkItem | ImageResult:
    """What the destination holds for one image: the item with its kept outputs noted, or a
    `skipped` result when every output it needs is there and was made from this source
    version with these settings."""
    spec = job.spec

    def made(folder: str, stamp: str) -> ObjectInfo | None:
        info = held.get(f"{job.run}/{folder}/{item.output}")
        return info if info is not None and info.metadata.get(provenance.MADE) == stamp else None

    resized = made("resized", provenance.resized_stamp(item.source, item.version, spec))
    size = provenance.read_resized(resized.metadata) if resized is not None else None
    kept_filters = tuple(
        filter_folder(name) for name in spec.filters
        if made(filter_folder(name), provenance.filter_stamp(item.source, item.version, spec,
                                                             name)))
    if size is not None and len(kept_filters) == len(spec.filters):
        outputs = {folder: f"{folder}/{item.output}" for folder in ("resized", *kept_filters)}
        # built from values already checked (read_resized), once per kept image: without
        # validating them again (a third of deciding 20,000 kept images)
        return ImageResult.model_construct(
            source=item.source, status="skipped", width=size[0], height=size[1],
            outputs=outputs, notes=size[2], version=item.version)
    return item.model_copy(update={"kept_resized": size[:2] if size else None,
                                   "kept_notes": size[2] if size else (),
                                   "kept_filters": kept_filters})


def discover(source: Storage, destination: Storage, job: Job, chunk_size: int | None = None,
             cores: int = 1, write_manifest: bool = True) -> Plan:
    """List the source once (an image candidate by name or content type; only objects with
    neither are sniffed); list the run folder once and
    keep every image whose outputs are all there, made from the same source version with the
    same settings; write manifest.json; cut chunks from the images still to make.

    `chunk_size` None picks one from the image count and the cores (`choose_chunk_size`).
    `write_manifest` False writes nothing (`pixelmill run --dry-run`).
    """
    skip_prefix = _inside(destination.uri, source.uri)
    listed = [info for info in source.list()
              if not (skip_prefix and info.key.startswith(skip_prefix))  # our own outputs
              and not (info.key.endswith("/") and info.size == 0)]  # "folder" placeholders
    # An image candidate by its name or content type, as listed; its bytes are checked where
    # they are decoded anyway. Only objects with neither are sniffed (a JPEG with no extension).
    named: list[ObjectInfo] = []
    unnamed: list[ObjectInfo] = []
    for info in listed:
        (named if is_image_candidate(info.key, info.content_type) else unnamed).append(info)
    heads = threaded_map(lambda info: source.read_head(info.key, SNIFF_BYTES) if info.size else b"",
                         unnamed, SNIFF_THREADS)
    accepted: list[tuple[ObjectInfo, str | None]] = [(info, None) for info in named
                                                      if info.size]
    rejected = [ImageResult(source=info.key, status="failed", error=describe_non_image(b""))
                for info in named if not info.size]  # known from the listing alone
    ignored: list[str] = []
    for info, head in zip(unnamed, heads):
        fmt = sniff(head)
        if fmt is not None:
            accepted.append((info, fmt))
        else:
            ignored.append(info.key)
    accepted.sort(key=lambda pair: pair[0].key)
    outputs = assign_outputs((info.key for info, _ in accepted), job.spec.extension)
    if job.sharded:  # outputs were assigned over the whole listing, so shards agree on names
        accepted = [(info, fmt) for info, fmt in accepted
                    if in_shard(info.key, job.shard_index, job.shard_count)]
        rejected = [r for r in rejected if in_shard(r.source, job.shard_index, job.shard_count)]
    discovered = len(accepted) + len(rejected)
    held = {info.key: info for info in destination.list(f"{job.run}/")}
    items: list[ChunkItem] = []
    kept: list[ImageResult] = []
    for info, _ in accepted:
        found = _held(ChunkItem(source=info.key, output=outputs[info.key], version=info.version),
                      job, held)
        (kept if isinstance(found, ImageResult) else items).append(found)  # type: ignore[arg-type]
    asked = chunk_size
    sizes = {info.key: info.size for info, _ in accepted}
    mean_bytes = sum(sizes[item.source] for item in items) / len(items) if items else None
    chunk_size = cap_chunk_size(len(items),
                                chunk_size or choose_chunk_size(len(items), cores, mean_bytes))
    if asked and chunk_size != asked:
        log.warning("--chunk-size %d would make %d chunks of %d images, more than the %d a "
                    "flow run keeps to: using %d", asked, -(-len(items) // asked), len(items),
                    MAX_CHUNKS, chunk_size)
    ramp = 0 if asked else ramp_chunks(len(items), chunk_size, cores, mean_bytes)
    chunks = make_chunks(items, chunk_size, ramp)
    manifest = {
        "run": job.run,
        "source": job.source,
        "images": [{"source": info.key, "output": outputs[info.key], "format": fmt,
                    "bytes": info.size, "version": info.version} for info, fmt in accepted],
        "rejected": [{"source": r.source, "error": r.error} for r in rejected],
        "ignored": ignored,
        "kept": len(kept),
        "chunk_size": chunk_size,
        "chunks": len(chunks),
    }
    if write_manifest:  # compact: the C encoder, 20x faster
        destination.write(job.run_file("manifest.json"),
                          json.dumps(manifest, separators=(",", ":")).encode(),
                          "application/json")
    return Plan(discovered=discovered, chunks=tuple(chunks), rejected=tuple(rejected),
                kept=tuple(kept), chunk_size=chunk_size, ignored=len(ignored))


def _kept_outputs(item: ChunkItem) -> dict[str, str]:
    return {folder: f"{folder}/{item.output}" for folder in item.kept_filters}


def resize_images(items: tuple[ChunkItem, ...], job: Job, source: Storage,
                  destination: Storage) -> list[ImageResult]:
    """Resize each image of a chunk (those whose resized output is not kept); a bad image is
    a failed result, storage errors raise. Each output is written with its stamp.

    Sources are read one ahead and outputs written in the background (`overlap`)."""
    spec = job.spec
    done: dict[str, ImageResult] = {}
    for item in items:
        if item.kept_resized is not None:
            done[item.source] = ImageResult(
                source=item.source, status="ok", width=item.kept_resized[0],
                height=item.kept_resized[1], notes=item.kept_notes, version=item.version,
                outputs={"resized": f"resized/{item.output}", **_kept_outputs(item)})
    todo = [item for item in items if item.kept_resized is None]
    with Writer(destination.write) as writer:
        for item, data in prefetched(todo, lambda item: source.read(item.source)):
            try:
                rendered = render_resized(data.result(), spec)
            except FileNotFoundError:
                done[item.source] = ImageResult(
                    source=item.source, status="failed",
                    error="vanished from the source after it was listed")
                continue
            except ImageError as exc:
                done[item.source] = ImageResult(source=item.source, status="failed",
                                                error=str(exc))
                continue
            output = f"resized/{item.output}"
            stamp = provenance.resized_stamp(item.source, item.version, spec)
            writer.submit(f"{job.run}/{output}", rendered.data, spec.content_type,
                          provenance.resized_metadata(stamp, rendered.width, rendered.height,
                                                      rendered.notes))
            done[item.source] = ImageResult(
                source=item.source, status="ok", width=rendered.width, height=rendered.height,
                outputs={"resized": output, **_kept_outputs(item)}, notes=tuple(rendered.notes),
                version=item.version)
    return [done[item.source] for item in items]


def filter_images(resized: ChunkResult, job: Job, destination: Storage) -> list[ImageResult]:
    """Apply each requested filter whose output is not kept to each resized image of a chunk,
    and write the variants with their stamps."""
    spec = job.spec

    def missing(image: ImageResult) -> tuple[str, ...]:
        return tuple(name for name in spec.filters if filter_folder(name) not in image.outputs)

    todo = [image for image in resized.images if image.status == "ok" and missing(image)]
    read = lambda image: destination.read(f"{job.run}/{image.outputs['resized']}")  # noqa: E731
    filtered: dict[str, ImageResult] = {}
    with Writer(destination.write) as writer:
        for image, data in prefetched(todo, read):
            names = missing(image)
            try:
                variants = render_filters(decode(data.result()),
                                          spec.model_copy(update={"filters": names}))
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
                              spec.content_type, {provenance.MADE: provenance.filter_stamp(
                                  image.source, image.version, spec, name)})
            filtered[image.source] = image.model_copy(update={"outputs": outputs})
    return [filtered.get(image.source, image) for image in resized.images]
