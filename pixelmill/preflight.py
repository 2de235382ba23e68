"""Checks a command makes before any work starts, so a configuration problem ends it with one
line (exit 2) and nothing written, instead of a failed run with tracebacks and retries.

Each check raises UsageError naming the input and what to do. They read as little as they can:
the source is listed only until its first image candidate, the destination once, lazily.
"""

from __future__ import annotations

import os
from pathlib import Path

from pixelmill.errors import UsageError
from pixelmill.imageops import SNIFF_BYTES, format_by_name, sniff
from pixelmill.layout import is_image_candidate
from pixelmill.storage import META_DIR, TEMP_PREFIX, is_gcs

# Objects with neither an image name nor an image content type are sniffed by their first
from pixelmill.storages import open_storage
# bytes; past this many the source is given the benefit of the doubt (discovery decides),
# so a bucket of many extension-less files costs the check a bounded number of reads.
MAX_SNIFFED = 100
FORMATS = "JPEG, PNG, GIF, WebP, AVIF, TIFF, BMP"


def _local_has_image(root: Path, skip: Path | None) -> bool:
    """Walk `root` until the first image candidate (by name, else by first bytes)."""
    sniffed = 0
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    if entry.name != META_DIR and Path(entry.path) != skip:
                        stack.append(Path(entry.path))
                    continue
                if entry.name.startswith(TEMP_PREFIX) or not entry.is_file():
                    continue
                if is_image_candidate(entry.name):
                    return True
                if sniffed >= MAX_SNIFFED:
                    return True
                sniffed += 1
                with open(entry.path, "rb") as handle:
                    if sniff(handle.read(SNIFF_BYTES)) or format_by_name(entry.name):
                        return True
            except OSError:
                continue  # vanished or unreadable: discovery reports what it can read
    return False


def _gcs_has_image(source: str) -> bool:
    """List `source` until its first image candidate; PermissionError (credentials,
    permission, no bucket) goes to the caller."""
    storage = open_storage(source)
    sniffed = 0
    for info in storage.list():
        if info.key.endswith("/") and info.size == 0:
            continue  # a "folder" placeholder
        if is_image_candidate(info.key, info.content_type):
            return True
        if sniffed >= MAX_SNIFFED:
            return True
        sniffed += 1
        if info.size and (sniff(storage.read_head(info.key, SNIFF_BYTES))
                          or format_by_name(info.key)):
            return True
    return False


def check_source(source: str, destination: str | None = None) -> None:
    """SOURCE can be listed and holds at least one image candidate; the destination's own
    folder inside it (outputs of earlier runs) does not count."""
    if not is_gcs(source):
        root = Path(source)
        if not root.is_dir():
            raise UsageError(f"SOURCE {source}: no such folder; give a folder of images or "
                             "gs://bucket/prefix")
        skip = Path(destination).absolute() if destination and not is_gcs(destination) \
            else None
        found = _local_has_image(root.absolute(), skip)
    else:
        try:
            found = _gcs_has_image(source)
        except PermissionError as exc:  # StorageAccessError: credentials, permission, bucket
            raise UsageError(f"SOURCE {source}: {exc}") from None
    if not found:
        raise UsageError(f"no images found under SOURCE {source} (looked for {FORMATS}); "
                         "check the path" + ("; a gs:// prefix matches the object names that "
                                             "start with it" if is_gcs(source) else ""))


def check_destination(destination: str) -> None:
    """DEST can hold run folders: a local path is a folder, or can be made one, that this
    user can write; a gs:// bucket exists and the credentials can list it."""
    if is_gcs(destination):
        try:
            next(iter(open_storage(destination, destination=True).list()), None)
        except PermissionError as exc:
            raise UsageError(f"DEST {destination}: {exc}") from None
        return
    open_storage(destination, destination=True)  # the scheme and an empty path
    path = Path(destination).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"DEST {destination} is a file, not a folder; give a folder (it is "
                         "created if missing) or gs://bucket/prefix")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"DEST {destination}: {existing} is a file, so the folder cannot be "
                         "created; give another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"DEST {destination}: {existing} is not writable by this user; give "
                         "a folder you can write to or change its permissions")
