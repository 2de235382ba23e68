"""The retry policy of a run: one rule per kind of failure, each retried by one layer only,
and the numbers behind it.

| failure | what happens |
|---|---|
| an image that cannot be read or decoded | never retried: that image is reported failed with the reason; the chunk's other images are made |
| a GCS request that fails transiently (429, 5xx, a dropped or stalled connection) | retried by the storage layer alone: backoff from REQUEST_BACKOFF_S doubling to REQUEST_BACKOFF_MAX_S with full jitter, for at most REQUEST_DEADLINE_S per call (an outage of a few minutes costs time, not images); past that the chunk fails and is not retried again |
| a permission error or a missing bucket | never retried: it fails at once, naming the bucket |
| any other failure of a chunk task (a worker lost, a local disk error, the API briefly gone) | the chunk is retried whole by Prefect, CHUNK_RETRIES times, after CHUNK_RETRY_BACKOFF_S seconds doubling, with +-CHUNK_RETRY_JITTER jitter (chunks are idempotent: same output names, atomic writes) |
| a chunk that fails for good | its images are reported failed; the other chunks go on |
| a part's child flow run that fails | run once more (PART_RETRIES), then its images are reported failed |
"""

from __future__ import annotations

import sys

# GCS requests (pixelmill/gcs.py, through google-api-core's Retry)
REQUEST_BACKOFF_S = 0.5
REQUEST_BACKOFF_MAX_S = 16.0
REQUEST_DEADLINE_S = 300.0
# Per request (connect, read): a stalled connection is a transient error, not a hang.
REQUEST_TIMEOUT_S = (10.0, 60.0)

# Chunk tasks (tasks/images.py): 2, 4, 8 s, so that retries of many chunks spread out.
CHUNK_RETRIES = 3
CHUNK_RETRY_BACKOFF_S = 2
CHUNK_RETRY_JITTER = 0.5

# A part's child flow run (flows/process_images.py).
PART_RETRIES = 1


def chunk_worth_retrying(exc: BaseException) -> bool:
    """Whether a chunk task that raised `exc` is retried: not for a permission error or a
    missing bucket, nor when the storage layer has already retried its request to the end."""
    if isinstance(exc, PermissionError):  # includes pixelmill's StorageAccessError
        return False
    google = sys.modules.get("google.api_core.exceptions")  # loaded by GCS storage only
    return not (google is not None and isinstance(exc, google.RetryError))
