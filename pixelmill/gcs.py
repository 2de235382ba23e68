"""Google Cloud Storage behind the storage interface (google-cloud-storage, no Prefect).

`gs://bucket/a/b` lists every object whose name starts with `a/b` and names them relative to
`a/` (the part up to the last '/'): `gs://in/photos` keeps `photos/...` in the output paths,
`gs://in/photos/` does not. A destination is always a folder: `gs://out/x` writes under `x/`.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import lru_cache

import google_crc32c
from google.api_core import exceptions as gexc
from google.api_core.retry import Retry
from google.cloud import storage
from google.cloud.storage.retry import _should_retry

from pixelmill.errors import StorageAccessError
from pixelmill.retries import (
    REQUEST_BACKOFF_MAX_S, REQUEST_BACKOFF_S, REQUEST_DEADLINE_S, REQUEST_TIMEOUT_S,
)
from pixelmill.storage import ObjectInfo, emulator_host, safe_key, split_uri  # noqa: F401

log = logging.getLogger("pixelmill.gcs")

# Transient errors are retried here, as pixelmill/retries.py says.
RETRY_INITIAL_S = REQUEST_BACKOFF_S
RETRY_MAXIMUM_S = REQUEST_BACKOFF_MAX_S
RETRY_DEADLINE_S = REQUEST_DEADLINE_S
# Objects listed per request; the client pages through larger listings by itself.
LIST_PAGE_SIZE = 1000
EMULATOR_PROJECT = "pixelmill-emulator"
# Attempts to replace an object another writer keeps replacing (412 on the generation read).
REPLACE_ATTEMPTS = 5
# The pieces of a streamed upload (a multiple of 256 KiB, as resumable uploads need).
STREAM_CHUNK = 8 * 1024 * 1024


def _log_retry(exc: Exception) -> None:
    log.warning("GCS request failed (%s: %s); retrying with backoff",
                type(exc).__name__, str(exc)[:200])


RETRY = Retry(predicate=_should_retry, initial=RETRY_INITIAL_S, maximum=RETRY_MAXIMUM_S,
              multiplier=2.0, timeout=RETRY_DEADLINE_S, on_error=_log_retry)


@lru_cache(maxsize=4)
def default_client(emulator: str | None = None) -> storage.Client:
    """One client per process: anonymous against an emulator, else Application Default
    Credentials. (`emulator` is only part of the cache key.)"""
    if emulator:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(credentials=AnonymousCredentials(), project=EMULATOR_PROJECT)
    try:
        return storage.Client()
    except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError and kin
        raise StorageAccessError(
            f"no Google credentials: {exc}. Run `gcloud auth application-default login`, "
            "set GOOGLE_APPLICATION_CREDENTIALS, or pass --gcp-credentials-block NAME"
        ) from None


def anonymous_adc_for_emulator() -> None:
    """Emulator only: make Application Default Credentials anonymous.

    prefect-gcp's GcpCredentials() calls google.auth.default() when built and fails without
    credentials even when STORAGE_EMULATOR_HOST is set, so a GcsBucket block
    could not be used against the emulator. Does nothing unless that variable is set.
    """
    if not emulator_host():
        return
    import google.auth
    from google.auth.credentials import AnonymousCredentials

    if getattr(google.auth.default, "_pixelmill_emulator", False):
        return

    def default(*args: object, **kwargs: object):
        return AnonymousCredentials(), EMULATOR_PROJECT

    default._pixelmill_emulator = True  # type: ignore[attr-defined]
    google.auth.default = default


def _translate(bucket: str, action: str, what: str, exc: Exception) -> Exception:
    """Turn a final google error into one a person can act on."""
    if isinstance(exc, (gexc.Unauthorized, gexc.Forbidden)):
        return StorageAccessError(
            f"gs://{bucket}: permission denied ({exc.code}) to {action} {what}; the credentials "
            f"need storage.objects.{action} on bucket {bucket} (e.g. roles/storage.object"
            f"{'Viewer' if action in ('get', 'list') else 'Admin'})"
        )
    if isinstance(exc, gexc.NotFound) and action != "get":  # listing or writing: no bucket
        return StorageAccessError(f"gs://{bucket}: bucket not found; check the name or "
                                  "create it")
    return exc


class GcsStorage:
    """A gs://bucket/prefix. Keys are relative to the prefix's folder part."""

    overlap = True  # each read and write is a round trip: hidden behind decoding

    def __init__(self, uri: str, client: storage.Client | None = None, *,
                 as_destination: bool = False) -> None:
        self.bucket_name, prefix = split_uri(uri)
        if as_destination and prefix and not prefix.endswith("/"):
            prefix += "/"
        self.name_prefix = prefix  # what listing matches
        self.base = prefix[: prefix.rfind("/") + 1]  # what keys are relative to
        self.uri = f"gs://{self.bucket_name}/{self.base}".rstrip("/")
        self.client = client or default_client(emulator_host())
        self.bucket = self.client.bucket(self.bucket_name)

    def __repr__(self) -> str:
        return f"GcsStorage({self.uri!r})"

    def _name(self, key: str) -> str:
        """An object name to write: the key made safe (no '..', no leading '/')."""
        return self.base + safe_key(key)

    def _listed(self, key: str) -> str:
        """An object name to read: exactly as listed (a source may be named '../x.jpg')."""
        return self.base + key

    def join(self, *parts: str) -> str:
        return "/".join([self.uri, *parts])

    def _call(self, action: str, what: str, function: Callable[[], object]) -> object:
        try:
            return function()
        except gexc.GoogleAPICallError as exc:
            raise _translate(self.bucket_name, action, what, exc) from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        match = self.base + prefix if prefix else self.name_prefix
        blobs = self.client.list_blobs(self.bucket_name, prefix=match, page_size=LIST_PAGE_SIZE,
                                       retry=RETRY, timeout=REQUEST_TIMEOUT_S)
        try:
            for blob in blobs:
                yield ObjectInfo(blob.name[len(self.base):], blob.size or 0, blob.content_type,
                                 str(blob.generation or ""), dict(blob.metadata or {}))
        except gexc.GoogleAPICallError as exc:
            raise _translate(self.bucket_name, "list", f"objects under {match!r}", exc) from exc

    def read(self, key: str) -> bytes:
        name = self._listed(key)
        try:
            return self.bucket.blob(name).download_as_bytes(retry=RETRY,
                                                           timeout=REQUEST_TIMEOUT_S)
        except gexc.NotFound:
            raise FileNotFoundError(f"gs://{self.bucket_name}/{name}") from None
        except gexc.GoogleAPICallError as exc:
            raise _translate(self.bucket_name, "get", name, exc) from exc

    def read_head(self, key: str, length: int) -> bytes:
        name = self._listed(key)
        try:
            return self.bucket.blob(name).download_as_bytes(start=0, end=length - 1, retry=RETRY,
                                                           timeout=REQUEST_TIMEOUT_S)
        except gexc.NotFound:
            raise FileNotFoundError(f"gs://{self.bucket_name}/{name}") from None
        except gexc.RequestRangeNotSatisfiable:
            return b""  # a zero-byte object
        except gexc.GoogleAPICallError as exc:
            raise _translate(self.bucket_name, "get", name, exc) from exc

    def write(self, key: str, data: bytes, content_type: str,
              metadata: Mapping[str, str] | None = None) -> None:
        """Single-shot upload (an object appears whole or not at all), create-only; if the
        object exists it is kept when identical (bytes, content type and metadata) and
        replaced only at the generation seen, read again if another writer got there first."""
        name = self._name(key)
        wanted = dict(metadata or {})
        generation = 0
        for _attempt in range(REPLACE_ATTEMPTS):
            blob = self.bucket.blob(name)
            blob.metadata = wanted or None
            try:
                blob.upload_from_string(data, content_type=content_type,
                                        if_generation_match=generation, retry=RETRY,
                                        timeout=REQUEST_TIMEOUT_S)
                return
            except gexc.PreconditionFailed:
                pass  # it exists (a retried chunk, a re-run) or changed since it was read
            except gexc.GoogleAPICallError as exc:
                raise _translate(self.bucket_name, "create", name, exc) from exc
            try:
                existing = self.bucket.get_blob(name, retry=RETRY, timeout=REQUEST_TIMEOUT_S)
            except gexc.GoogleAPICallError as exc:
                raise _translate(self.bucket_name, "get", name, exc) from exc
            if existing is not None and existing.crc32c == crc32c(data) \
                    and existing.content_type == content_type \
                    and dict(existing.metadata or {}) == wanted:
                return  # already written, byte for byte
            generation = existing.generation if existing is not None else 0
        raise _translate(self.bucket_name, "create", name, gexc.Conflict(
            f"gs://{self.bucket_name}/{name} kept changing while it was written"))

    def write_stream(self, key: str, chunks: Iterable[bytes], content_type: str) -> None:
        """Write `key` from `chunks` as they come, in a resumable upload of STREAM_CHUNK
        pieces: the object appears whole when the upload is finished, or not at all."""
        name = self._name(key)
        blob = self.bucket.blob(name, chunk_size=STREAM_CHUNK)
        try:
            with blob.open("wb", content_type=content_type, retry=RETRY,
                           ignore_flush=True) as writer:
                for chunk in chunks:
                    writer.write(chunk)
        except gexc.GoogleAPICallError as exc:
            raise _translate(self.bucket_name, "create", name, exc) from exc

    def write_new(self, key: str, data: bytes, content_type: str) -> bool:
        """Create `key` only if it does not exist; False if it exists."""
        name = self._name(key)
        try:
            self.bucket.blob(name).upload_from_string(
                data, content_type=content_type, if_generation_match=0, retry=RETRY,
                timeout=REQUEST_TIMEOUT_S)
            return True
        except gexc.PreconditionFailed:
            return False
        except gexc.GoogleAPICallError as exc:
            raise _translate(self.bucket_name, "create", name, exc) from exc

    def delete(self, key: str) -> None:
        name = self._name(key)
        try:
            self.bucket.blob(name).delete(retry=RETRY, timeout=REQUEST_TIMEOUT_S)
        except gexc.NotFound:
            pass
        except gexc.GoogleAPICallError as exc:
            raise _translate(self.bucket_name, "delete", name, exc) from exc

    def exists(self, key: str) -> bool:
        name = self._listed(key)
        return bool(self._call("get", name, lambda: self.bucket.blob(name).exists(
            retry=RETRY, timeout=REQUEST_TIMEOUT_S)))

    def tidy(self, prefix: str) -> int:
        """Nothing to do: uploads are single-shot, a killed writer leaves no object."""
        return 0


def crc32c(data: bytes) -> str:
    """The base64 CRC32C GCS keeps for every object."""
    return base64.b64encode(google_crc32c.Checksum(data).digest()).decode("ascii")
