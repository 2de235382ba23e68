"""What made an output, recorded with the output itself, and the skip decision built on it.

Every output carries a stamp: a digest of its source key, the source's version (GCS
generation; in a local folder its mtime and ctime) and the settings that shape that output. A
run lists its destination run folder once and keeps an output only when it is there with the
stamp this run would give it; anything missing, changed or made with other settings is made
again. The resized output also carries its pixel size and notes, so a kept image is reported
and shown in the gallery without reading it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache

from pixelmill.filters import filter_folder
from pixelmill.spec import PipelineSpec, Rendition

# Bump when a change to the image code makes different pixels for the same source and
# settings, so that outputs made before are made again.
RENDER_VERSION = 1
MADE = "pixelmill-made"  # the stamp
WIDTH, HEIGHT, NOTES = "pixelmill-width", "pixelmill-height", "pixelmill-notes"


@lru_cache(maxsize=64)
def _settings(kind: str, spec: PipelineSpec, rendition: Rendition | None = None) -> str:
    """What shapes an output of `kind` ('resized' or a filter's folder), as text: the
    settings, and the size and format of `rendition` (default: the main one)."""
    size, fmt = (rendition.size, rendition.format) if rendition else (spec.size, spec.format)
    shape = [RENDER_VERSION, kind, list(size), spec.fit, fmt, spec.quality, spec.upscale]
    if spec.keep_metadata:  # only then: outputs stamped before the option stay valid
        shape.append("keep-metadata")
    return json.dumps(shape, separators=(",", ":"))


def _digest(settings: str, source: str, version: str) -> str:
    text = "\0".join((settings, source, version))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def resized_stamp(source: str, version: str, spec: PipelineSpec,
                  rendition: Rendition | None = None) -> str:
    """The stamp of the main resized output, or of `rendition`'s."""
    return _digest(_settings("resized", spec, rendition), source, version)


def filter_stamp(source: str, version: str, spec: PipelineSpec, name: str) -> str:
    return _digest(_settings(filter_folder(name), spec), source, version)


class Stamps:
    """The stamps one spec gives, its settings' text worked out once (a re-run checks a
    stamp per output of every image)."""

    def __init__(self, spec: PipelineSpec) -> None:
        self._resized = _settings("resized", spec)
        # the other renditions' settings' text, in the spec's order
        self.renditions = {rendition: _settings("resized", spec, rendition)
                           for rendition in spec.renditions[1:]}
        # filter folder -> its settings' text, in the order of the spec's filters
        self.filters = {filter_folder(name): _settings(filter_folder(name), spec)
                        for name in spec.filters}

    def resized(self, source: str, version: str) -> str:
        return _digest(self._resized, source, version)

    def rendition(self, rendition: Rendition, source: str, version: str) -> str:
        return _digest(self.renditions[rendition], source, version)

    def filter(self, folder: str, source: str, version: str) -> str:
        return _digest(self.filters[folder], source, version)


def resized_metadata(stamp: str, width: int, height: int,
                     notes: tuple[str, ...] | list[str] = ()) -> dict[str, str]:
    meta = {MADE: stamp, WIDTH: str(width), HEIGHT: str(height)}
    if notes:
        meta[NOTES] = json.dumps(list(notes))
    return meta


def read_resized(metadata: Mapping[str, str]) -> tuple[int, int, tuple[str, ...]] | None:
    """(width, height, notes) recorded with a resized output, or None if unreadable."""
    try:
        notes = tuple(json.loads(metadata[NOTES])) if NOTES in metadata else ()
        return int(metadata[WIDTH]), int(metadata[HEIGHT]), tuple(str(n) for n in notes)
    except (KeyError, ValueError, TypeError):
        return None
