"""The storage interface: list, read, write atomically, exists; what a listed object is; and
the helpers every storage shares. The implementations are `LocalStorage` (a local folder,
pixelmill/localstorage.py) and `GcsStorage` (Google Cloud Storage, pixelmill/gcs.py);
`storages.open_storage(uri)` picks one from the URI, so tasks and flows never know where bytes
live.

Keys are '/'-separated paths relative to the storage root. Every object may carry a few
string metadata fields that come back with the listing, so a run can tell what made an output
from one listing, without reading any object.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pixelmill.errors import UsageError

# Prefix of in-flight temporary files; listing skips them and they are renamed into place.
TEMP_PREFIX = ".pixelmill-tmp-"
# Folder of the local metadata journals; listings skip it.
META_DIR = ".pixelmill-meta"
# Temp files and journals younger than this may belong to a writer still at work (another
# shard of the run, or a run that is finishing): tidying leaves them alone. One object is
# written in well under a minute; a killed writer's leftovers are removed by a later run.
TIDY_AFTER_S = 600.0


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size in bytes, content type if known, and a version
    (the generation on GCS; locally the mtime and ctime in ns, "<mtime>-<ctime>") used to
    notice changed sources."""

    key: str
    size: int
    content_type: str | None = None
    version: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict, compare=False)


@runtime_checkable
class Storage(Protocol):
    uri: str
    # Reads and writes take long enough (network round trips) to be worth overlapping with
    # decoding in background threads (`overlap`); a local file's are not.
    overlap: bool

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def read(self, key: str) -> bytes: ...

    def read_head(self, key: str, length: int) -> bytes: ...

    def write(self, key: str, data: bytes, content_type: str,
              metadata: Mapping[str, str] | None = None) -> None: ...

    def write_new(self, key: str, data: bytes, content_type: str) -> bool: ...

    def write_stream(self, key: str, chunks: Iterable[bytes], content_type: str) -> None: ...

    def delete(self, key: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def join(self, *parts: str) -> str: ...

    def tidy(self, prefix: str) -> int: ...


def safe_key(key: str) -> str:
    """A key that cannot leave its root: no leading '/', no '.', '..' or empty segments."""
    parts = []
    for part in key.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        parts.append("__" if part == ".." else part)
    if not parts:
        raise ValueError(f"{key!r}: empty object key")
    return "/".join(parts)


def is_gcs(uri: str) -> bool:
    return uri.startswith("gs://")


def split_uri(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
    if not uri.startswith("gs://"):
        raise UsageError(f"{uri}: not a gs:// URI")
    bucket, _, prefix = uri[len("gs://"):].partition("/")
    if not bucket:
        raise UsageError(f"{uri}: no bucket name; write gs://BUCKET/prefix")
    return bucket, prefix


def emulator_host() -> str | None:
    return os.environ.get("STORAGE_EMULATOR_HOST") or None
