"""Storage for a job's URIs, with GCS credentials from a prefect-gcp block when named."""

from __future__ import annotations

from functools import lru_cache

from pixelmill.models import Job
from pixelmill.storage import Storage, emulator_host, is_gcs
from pixelmill.storages import open_storage

if emulator_host():  # the Google libraries load only for GCS (0.3 CPU-s in every worker)
    from pixelmill.gcs import anonymous_adc_for_emulator

    anonymous_adc_for_emulator()


@lru_cache(maxsize=8)
def _block_client(block_name: str):
    """One storage client per worker process and credentials block, reused by every chunk."""
    from prefect_gcp import GcpCredentials

    return GcpCredentials.load(block_name).get_cloud_storage_client()


def _client(job: Job, uri: str):
    """The named block's client; None means the default one (ADC, or anonymous when
    STORAGE_EMULATOR_HOST is set; a block's client also talks to the emulator then)."""
    if not is_gcs(uri) or not job.gcp_credentials_block:
        return None
    return _block_client(job.gcp_credentials_block)


def source_storage(job: Job) -> Storage:
    return open_storage(job.source, client=_client(job, job.source))


def destination_storage(job: Job) -> Storage:
    return open_storage(job.destination, destination=True,
                        client=_client(job, job.destination))
