"""The work of each stage on plain storage objects; tasks/ wraps these for Prefect."""

from __future__ import annotations

import json
import logging
import posixpath

from pixelmill.errors import ImageError
from pixelmill.imageops import (
    SNIFF_BYTES, decode, describe_non_image, render_filters, render_resized, sniff,
)
from pixelmill.layout import (
    IMAGE_EXTENSIONS, assign_outputs, choose_chunk_size, in_shard, make_chunks,
)
from pixelmill.models import ChunkItem, ChunkResult, ImageResult, Job, Plan
from pixelmill.overlap import Writer, prefetched, threaded_map
from pixelmill.storage import ObjectInfo, Storage

log = logging.getLogger("pixelmill")
# Concurrent first-bytes reads at discovery: on GCS each is a round trip (~ms), so a listing
# of thousands is sniffed in seconds; locally it costs nothing.
SNIFF_THREADS = 16


def _looks_like_image_name(info: ObjectInfo) -> bool:
    ext = posixpath.splitext(info.key)[1].lower()
    return ext in IMAGE_EXTENSIONS or (info.content_type or "").startswith("image/")


def _inside(child: str, parent: str) -> str | None:
    """The key prefix of `child` inside `parent` if the destination lies in the source."""
    parent = parent.rstrip("/") + "/"
    return child[len(parent):].strip("/") + "/" if child.startswith(parent) else None


def discover(source: Storage, destination: Storage, job: Job, chunk_size: int | None = None,
             cores: int = 1) -> Plan:
    """List the source once, sniff each object's first bytes, write manifest.json, chunk it.

    `chunk_size` None picks one from the image count and the cores (`choose_chunk_size`).
    """
    skip_prefix = _inside(destination.uri, source.uri)
    listed = [info for info in source.list()
              if not (skip_prefix and info.key.startswith(skip_prefix))  # our own outputs
              and not (info.key.endswith("/") and info.size == 0)]  # "folder" placeholders
    heads = threaded_map(lambda info: source.read_head(info.key, SNIFF_BYTES) if info.size else b"",
                         listed, SNIFF_THREADS)
    sniffed = list(zip(listed, heads))
    accepted: list[tuple[ObjectInfo, str]] = []
    rejected: list[ImageResult] = []
    ignored: list[str] = []
    for info, head in sniffed:
        fmt = sniff(head)
        if fmt is not None:
            accepted.append((info, fmt))
        elif _looks_like_image_name(info):
            rejected.append(ImageResult(source=info.key, status="failed",
                                        error=describe_non_image(head)))
        else:
            ignored.append(info.key)
    outputs = assign_outputs((info.key for info, _ in accepted), job.spec.extension)
    if job.sharded:  # outputs were assigned over the whole listing, so shards agree on names
        accepted = [(info, fmt) for info, fmt in accepted
                    if in_shard(info.key, job.shard_index, job.shard_count)]
        rejected = [r for r in rejected if in_shard(r.source, job.shard_index, job.shard_count)]
    discovered = len(accepted) + len(rejected)
    items = [ChunkItem(source=info.key, output=outputs[info.key], version=info.version)
             for info, _ in accepted]
    chunk_size = chunk_size or choose_chunk_size(len(items), cores)
    chunks = make_chunks(items, chunk_size)
    manifest = {
        "run": job.run,
        "source": job.source,
        "images": [{"source": info.key, "output": outputs[info.key], "format": fmt,
                    "bytes": info.size, "version": info.version} for info, fmt in accepted],
        "rejected": [{"source": r.source, "error": r.error} for r in rejected],
        "ignored": ignored,
        "chunk_size": chunk_size,
        "chunks": len(chunks),
    }
    destination.write(job.run_file("manifest.json"), json.dumps(manifest, indent=1).encode(),
                      "application/json")
    return Plan(discovered=discovered, chunks=tuple(chunks), rejected=tuple(rejected),
                chunk_size=chunk_size)


def resize_images(items: tuple[ChunkItem, ...], job: Job, source: Storage,
                  destination: Storage) -> list[ImageResult]:
    """Resize each image of a chunk; a bad image is a failed result, storage errors raise.

    Sources are read one ahead and outputs written in the background (`overlap`)."""
    spec = job.spec
    results = []
    with Writer(destination.write) as writer:
        for item, data in prefetched(items, lambda item: source.read(item.source)):
            try:
                rendered = render_resized(data.result(), spec)
            except FileNotFoundError:
                results.append(ImageResult(source=item.source, status="failed",
                                           error="vanished from the source after it was listed"))
                continue
            except ImageError as exc:
                log.warning("%s: %s", item.source, exc)
                results.append(ImageResult(source=item.source, status="failed", error=str(exc)))
                continue
            output = f"resized/{item.output}"
            writer.submit(f"{job.run}/{output}", rendered.data, spec.content_type)
            results.append(ImageResult(source=item.source, status="ok", width=rendered.width,
                                       height=rendered.height, outputs={"resized": output},
                                       notes=tuple(rendered.notes), version=item.version))
    return results


def filter_images(resized: ChunkResult, job: Job, destination: Storage) -> list[ImageResult]:
    """Apply every requested filter to each resized image of a chunk and write the variants."""
    spec = job.spec
    results = []
    done = [image for image in resized.images if image.status == "ok"]
    read = lambda image: destination.read(f"{job.run}/{image.outputs['resized']}")  # noqa: E731
    filtered: dict[str, ImageResult] = {}
    with Writer(destination.write) as writer:
        for image, data in prefetched(done, read):
            try:
                variants = render_filters(decode(data.result()), spec)
            except ImageError as exc:
                filtered[image.source] = image.model_copy(
                    update={"status": "failed", "error": f"filter stage: {exc}"})
                continue
            relpath = image.outputs["resized"].removeprefix("resized/")
            outputs = dict(image.outputs)
            for folder, encoded in variants.items():
                outputs[folder] = f"{folder}/{relpath}"
                writer.submit(f"{job.run}/{folder}/{relpath}", encoded, spec.content_type)
            filtered[image.source] = image.model_copy(update={"outputs": outputs})
    for image in resized.images:
        results.append(filtered.get(image.source, image))
    return results
