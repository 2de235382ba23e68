"""The two kinds of error pixelmill tells apart: the user's request, and one image."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad usage or configuration: the CLI prints one line and exits 2, nothing is written."""


class ImageError(Exception):
    """One image cannot be processed; the message is the reason a person reads in the report."""


class StorageAccessError(PermissionError):
    """Credentials, permission or a missing bucket: retrying cannot help. Names the bucket."""
