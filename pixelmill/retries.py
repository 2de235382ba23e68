"""The retry policy of a run, one rule per kind of failure, and the numbers behind it.

| failure | what happens |
|---|---|
| an image that cannot be read or decoded | never retried: that image is reported failed with the reason; the chunk's other images are made |
| a GCS request that fails transiently (429, 5xx, a dropped or stalled connection) | retried by the storage layer: backoff from REQUEST_BACKOFF_S doubling to REQUEST_BACKOFF_MAX_S with full jitter, for at most REQUEST_DEADLINE_S per call |
| a chunk task that still fails (storage given up, a worker lost, the API briefly gone) | retried whole by Prefect, CHUNK_RETRIES times, after CHUNK_RETRY_BACKOFF_S seconds doubling with +-CHUNK_RETRY_JITTER jitter (chunks are idempotent: same output names, atomic writes); then its images are reported failed and the other chunks go on |
| a permission error or a missing bucket | never retried: it fails at once, naming the bucket |
| a part's child flow run that fails | run once more (PART_RETRIES), then its images are reported failed |

So a GCS outage is bridged first by the request's own retries, then by the chunk's: an outage
of a few minutes costs time, not images. Nothing else retries.
"""

from __future__ import annotations

# GCS requests (pixelmill/gcs.py, through google-api-core's Retry)
REQUEST_BACKOFF_S = 0.5
REQUEST_BACKOFF_MAX_S = 16.0
REQUEST_DEADLINE_S = 60.0
# Per request (connect, read): a stalled connection is a transient error, not a hang.
REQUEST_TIMEOUT_S = (10.0, 60.0)

# Chunk tasks (tasks/images.py): 2, 4, 8 s, so that retries of many chunks spread out.
CHUNK_RETRIES = 3
CHUNK_RETRY_BACKOFF_S = 2
CHUNK_RETRY_JITTER = 0.5

# A part's child flow run (flows/process_images.py).
PART_RETRIES = 1
