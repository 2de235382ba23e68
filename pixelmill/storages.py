"""Which storage a URI names: a local folder, or gs://bucket/prefix."""

from __future__ import annotations

from pixelmill.errors import UsageError
from pixelmill.localstorage import LocalStorage
from pixelmill.storage import Storage, is_gcs


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
