"""The output layout contract: run names, output paths, collisions, chunk sizes."""

from __future__ import annotations

import math
import posixpath
import re
import zlib
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone

from pixelmill.errors import UsageError
from pixelmill.models import Chunk, ChunkItem
from pixelmill.storage import safe_key

# Image names taken at discovery by their name alone (their bytes are checked where they are
# decoded).
CANDIDATE_EXTENSIONS = {
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".webp", ".avif", ".avifs",
    ".tif", ".tiff", ".bmp", ".dib", ".heic", ".heics", ".heif", ".heifs", ".hif",
    ".jp2", ".j2k", ".jpx", ".jpf", ".jpc", ".j2c", ".psd", ".ico", ".icns", ".dds", ".qoi",
    ".tga", ".pcx", ".ppm", ".pgm", ".pbm", ".pnm",
}
# Extensions we replace with the output format's: every format the installed Pillow reads
# (imageops: all but NOT_READ; a test keeps this in step with Pillow's list). The ones not in
# CANDIDATE_EXTENSIONS are names other files use too (a Garmin `.fit`, a Gerber `.gbr`):
# such a file is read for its first bytes at discovery like one with no extension.
IMAGE_EXTENSIONS = CANDIDATE_EXTENSIONS | {
    ".blp", ".bw", ".cur", ".dcx", ".fit", ".fits", ".flc", ".fli", ".ftc", ".ftu", ".gbr",
    ".icb", ".im", ".msp", ".pcd", ".pfm", ".pxr", ".ras", ".rgb", ".rgba", ".sgi", ".vda",
    ".vst", ".xbm", ".xpm",
}
# A flow run must stay within a few hundred task runs (two per chunk): the server's event
# queue dropped events for flows with thousands of task runs (Prefect 3.8, 10,000 messages).
MAX_CHUNKS = 150
# Images a part of a run's plan holds: the driver holds one part of the listing at a time.
PART_IMAGES = 20_000
# Images per chunk, from costs measured with bench/speed.py (docs/decisions.md, "Chunk
# sizes from the listed bytes"). A chunk is one or two task runs, and Prefect's cost per task run must stay small
# next to the chunk's work: TARGET_CHUNK_S of work a chunk. The work of an image is estimated
# from its listed size: a fixed part (reading, writing, the filter at the output size) and a
# part that grows with the bytes to decode.
TARGET_CHUNK = 80
TARGET_CHUNK_S = 1.6
PER_IMAGE_S = 0.003
PER_BYTE_S = 0.06e-6
# Chunks per core, so a slow chunk does not leave a core idle at the end; but never chunks of
# less than MIN_CHUNK_S of work, where orchestration would cost more than it balances.
CHUNKS_PER_CORE = 4
MIN_CHUNK_S = 0.25
# The first chunks of a long batch are a quarter of the others (`ramp_chunks`).
RAMP_DIVISOR = 4
RAMP_MIN_S = 0.5
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def run_stamp(when: datetime | None = None) -> str:
    """The default run folder: the UTC minute stamp YYYYMMDDTHHMMZ."""
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return when.strftime("%Y%m%dT%H%MZ")


def check_run_name(name: str) -> str:
    if not _RUN_NAME.fullmatch(name) or ".." in name:
        raise UsageError(
            f"--run-name {name!r}: use letters, digits, '.', '_' or '-' (one folder name)"
        )
    return name


def is_image_candidate(name: str, content_type: str | None = None) -> bool:
    """An object worth decoding by its listing alone: an image extension or an image/* type
    (its bytes are checked where it is decoded)."""
    return (posixpath.splitext(name)[1].lower() in CANDIDATE_EXTENSIONS
            or (content_type or "").startswith("image/"))


def natural_output(relpath: str, extension: str) -> str:
    """'trips/a.PNG' -> 'trips/a.jpg' for JPEG output; unknown extensions are kept."""
    stem, ext = posixpath.splitext(relpath)
    if ext.lower() in IMAGE_EXTENSIONS:
        return stem + extension
    return relpath + extension


def rendition_output(output: str, extension: str, rendition_extension: str) -> str:
    """The path of a rendition in another format, inside its folder: `output` (the main
    format's, ending in `extension`) with that format's extension in its place. Distinct
    outputs stay distinct: they differ before the extension."""
    if rendition_extension == extension:
        return output
    return output.removesuffix(extension) + rendition_extension


def assign_outputs(sources: Iterable[str], extension: str) -> dict[str, str]:
    """Map source keys to output relpaths; sub-paths kept, unsafe segments neutralised.

    Where two sources would meet (x.png and x.jpg written as JPEG), the one whose name
    already has the output extension keeps it and the other keeps its own extension in
    front: x.jpg -> x.jpg, x.png -> x.png.jpg. Ties beyond that get ~2, ~3 ...
    """
    safe = {key: safe_key(key) for key in sources}
    wanted = {key: natural_output(path, extension) for key, path in safe.items()}
    order = sorted(wanted, key=lambda key: (wanted[key] != safe[key], key))
    taken: set[str] = set()
    result: dict[str, str] = {}
    for key in order:
        candidate = wanted[key]
        if candidate in taken:
            candidate = safe[key] + extension
            stem, ext = posixpath.splitext(candidate)
            number = 2
            while candidate in taken:
                candidate = f"{stem}~{number}{ext}"
                number += 1
        taken.add(candidate)
        result[key] = candidate
    return result


def output_group(key: str) -> str:
    """What every source whose output could meet `key`'s starts with: its folder and its name
    up to the first '.' after any leading dots ('a/x.png' and 'a/x.jpg' both 'a/x'). Such
    sources sort together, so a stretch of the sorted listing cut where none of its groups
    is a prefix of the next key gives outputs no other stretch can."""
    folder, slash, name = key.rpartition("/")
    dots = len(name) - len(name.lstrip("."))
    return folder + slash + name[:dots] + name[dots:].split(".", 1)[0]


def orphan_output(key: str, extension: str) -> str:
    """The output of a source whose safe form sorts far from where it was listed (a '\\' or
    '//' in its key): its natural output with a hash of the key before the extension, so it
    cannot meet the output of a source planned in another part."""
    stem, ext = posixpath.splitext(natural_output(safe_key(key), extension))
    return f"{stem}~{zlib.crc32(key.encode('utf-8')):08x}{ext}"


def in_shard(key: str, index: int, count: int) -> bool:
    """Whether a source key belongs to shard `index` of `count`: a stable hash of the key, so
    shards are disjoint, cover every key exactly once, and agree across machines."""
    return count <= 1 or zlib.crc32(key.encode("utf-8")) % count == index


def check_shard(index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"shard {index} of {count}: need 0 <= shard_index < shard_count")


def image_work_s(mean_bytes: float | None) -> float:
    """Estimated seconds of one core's work for an image of `mean_bytes` listed bytes."""
    if mean_bytes is None:
        return TARGET_CHUNK_S / TARGET_CHUNK
    return PER_IMAGE_S + max(0.0, mean_bytes) * PER_BYTE_S


def choose_chunk_size(images: int, cores: int, mean_bytes: float | None = None) -> int:
    """Images per chunk from the image count, the cores and (when listed) the images' mean
    size in bytes (see the constants above): at least one chunk per core, up to
    CHUNKS_PER_CORE per core while each holds MIN_CHUNK_S of work, at most TARGET_CHUNK_S of
    work a chunk, and never more than MAX_CHUNKS chunks."""
    if images <= 0:
        return 1
    cores = max(1, cores)
    per_image = image_work_s(mean_bytes)
    target = TARGET_CHUNK if mean_bytes is None else max(1, round(TARGET_CHUNK_S / per_image))
    smallest = math.ceil(MIN_CHUNK_S / per_image)
    balanced = math.ceil(images / (cores * CHUNKS_PER_CORE))
    per_core = math.ceil(images / cores)
    size = max(1, min(target, max(balanced, min(smallest, per_core))))
    chunks = math.ceil(images / size)
    if chunks < cores * CHUNKS_PER_CORE:  # a few chunks: a multiple of the cores, even ones
        size = math.ceil(images / (math.ceil(chunks / cores) * cores))
    return max(size, math.ceil(images / MAX_CHUNKS))


def cap_chunk_size(images: int, chunk_size: int) -> int:
    """`chunk_size`, raised where it would make more than MAX_CHUNKS chunks."""
    if chunk_size < 1:
        raise UsageError(f"--chunk-size {chunk_size}: must be at least 1")
    return max(chunk_size, math.ceil(images / MAX_CHUNKS))


def ramp_chunks(images: int, chunk_size: int, cores: int, mean_bytes: float | None) -> int:
    """How many chunks to make small at the start: one per core when the batch runs in
    several waves of chunks of RAMP_MIN_S of work or more, so that the first results (and
    the progress bar) come a quarter of a chunk after the start instead of a whole one."""
    waves = images / max(1, chunk_size * max(1, cores))
    if (waves < 2 or chunk_size * image_work_s(mean_bytes) < RAMP_MIN_S
            or math.ceil(images / chunk_size) + cores > MAX_CHUNKS):
        return 0
    return max(1, cores)


def make_chunks(items: Sequence[ChunkItem], chunk_size: int, ramp: int = 0) -> list[Chunk]:
    """Chunks of `chunk_size` items in order; the first `ramp` of them a quarter the size."""
    if chunk_size < 1:
        raise UsageError(f"--chunk-size {chunk_size}: must be at least 1")
    small = max(1, chunk_size // RAMP_DIVISOR)
    chunks: list[Chunk] = []
    start = 0
    while start < len(items):
        size = small if len(chunks) < ramp else chunk_size
        chunks.append(Chunk(index=len(chunks), items=tuple(items[start : start + size])))
        start += size
    return chunks
