"""One small storage interface (list, read, write atomically, exists) and its local folder.

Keys are '/'-separated paths relative to the storage root. `open_storage(uri)` picks the
implementation from the URI, so tasks and flows never know where bytes live.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from pixelmill.errors import UsageError

# Prefix of in-flight temporary files; listing skips them and they are renamed into place.
TEMP_PREFIX = ".pixelmill-tmp-"


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size in bytes, content type if known, and a version
    (mtime in ns locally, the generation on GCS) used to notice changed sources."""

    key: str
    size: int
    content_type: str | None = None
    version: str = ""


@runtime_checkable
class Storage(Protocol):
    uri: str

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...

    def read(self, key: str) -> bytes: ...

    def read_head(self, key: str, length: int) -> bytes: ...

    def write(self, key: str, data: bytes, content_type: str) -> None: ...

    def exists(self, key: str) -> bool: ...

    def join(self, *parts: str) -> str: ...

    def discard_partial(self, prefix: str) -> int: ...


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


class LocalStorage:
    """A folder on this machine. Writes go to a temp file and are renamed into place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / safe_key(key)).absolute()
        if self.root not in path.parents:
            raise ValueError(f"{key!r}: resolves outside {self.root}")
        return path

    def join(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        found = []
        for folder, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    continue
                path = Path(folder, name)
                try:
                    stat = path.stat()
                except OSError:
                    continue  # vanished or a dangling link
                key = path.relative_to(self.root).as_posix()
                found.append(ObjectInfo(key, stat.st_size, None, str(stat.st_mtime_ns)))
        yield from sorted(found, key=lambda info: info.key)  # the order GCS lists in

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_head(self, key: str, length: int) -> bytes:
        with self._path(key).open("rb") as handle:
            return handle.read(length)

    def write(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(6)}-{path.name}"[:255])
        try:
            with temp.open("wb") as handle:
                handle.write(data)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def discard_partial(self, prefix: str) -> int:
        """Delete temp files a killed writer left under `prefix`; returns how many."""
        base = self._path(prefix)
        found = list(base.rglob(f"{TEMP_PREFIX}*")) if base.is_dir() else []
        for path in found:
            path.unlink(missing_ok=True)
        return len(found)


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


def open_storage(uri: str, *, destination: bool = False, client: object | None = None) -> Storage:
    """The storage behind a URI: a local folder, or gs://bucket/prefix (`client`: a
    google.cloud.storage.Client to use instead of the process-wide default one)."""
    if not uri:
        raise UsageError("an empty path was given as SOURCE or DEST")
    if is_gcs(uri):
        from pixelmill.gcs import GcsStorage

        return GcsStorage(uri, client, as_destination=destination)  # type: ignore[arg-type]
    if "://" in uri:
        raise UsageError(f"{uri}: unsupported scheme; use a local path or gs://bucket/prefix")
    return LocalStorage(uri)
