"""The four tasks of a run. Each opens storage from the job's URIs and calls pixelmill/."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.tasks import exponential_backoff

from pixelmill import gallery, pipeline
from pixelmill.layout import PART_IMAGES
from pixelmill.models import Chunk, ChunkResult, ImageResult, Job, Plan, RunReport
from pixelmill.retries import (
    CHUNK_RETRIES, CHUNK_RETRY_BACKOFF_S, CHUNK_RETRY_JITTER, chunk_worth_retrying,
)
from tasks.storage import destination_storage, source_storage

# A chunk that fails is retried whole, as pixelmill/retries.py says.
STORAGE_RETRIES = CHUNK_RETRIES
RETRY_DELAYS = exponential_backoff(backoff_factor=CHUNK_RETRY_BACKOFF_S)
RETRY_JITTER = CHUNK_RETRY_JITTER


def _worth_retrying(task, task_run, state) -> bool:
    """A failed chunk task is retried as pixelmill/retries.py says."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001
        return chunk_worth_retrying(exc)
    return True


# No task result cache: what is done is decided by the destination itself (discovery lists
# the run folder and keeps the outputs made from the same source version with the same
# settings), so a Retry or a re-run redoes exactly what is missing there, and a cached result
# can never stand in for an output that was deleted.
_RETRYING = {
    "retries": STORAGE_RETRIES,
    "retry_condition_fn": _worth_retrying,
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_jitter_factor": RETRY_JITTER,
    "cache_policy": NO_CACHE,
}


@dataclass
class EachTaskRun(CachePolicy):
    """A key of its own for every task run: results are persisted (`--result-storage`) for
    the record, never found again in place of what the destination holds."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs) -> str | None:
        return f"pixelmill-{task_ctx.task_run.id}"


def ray_placement() -> tuple[dict[str, float], str]:
    """The resources Ray assigned to the task running now and the id of its node ({} and ""
    outside a Ray worker)."""
    # A Ray worker has loaded Ray; elsewhere, loading it only to ask would slow the chunk
    # ('ray' alone in sys.modules can be prefect-ray's lazy stub, which loads it when touched).
    if "ray._raylet" not in sys.modules:
        return {}, ""
    import ray

    try:
        if not ray.is_initialized():
            return {}, ""
        context = ray.get_runtime_context()
        if context.worker.mode != ray.WORKER_MODE:
            return {}, ""
        return ({name: float(amount) for name, amount in context.get_assigned_resources().items()},
                context.get_node_id())
    except Exception:  # where a chunk ran is information, never a reason to fail it
        return {}, ""


def _log_failures(images: list[ImageResult], stage: str, label: str) -> None:
    logger = get_run_logger()
    failed = [image for image in images if image.status == "failed"]
    for image in failed:
        logger.warning("%s chunk %s: %s: %s", stage, label, image.source, image.error)
    logger.info("%s chunk %s: %d images, %d failed", stage, label, len(images), len(failed))


@task(name="discover", **_RETRYING)
def discover(job: Job, chunk_size: int | None = None, cores: int = 1,
             part_size: int = PART_IMAGES) -> Plan:
    """List the source and the run folder, write manifest.json, return chunks of the keys
    still to make (or, past `part_size` images, the parts, each one's plan written)."""
    plan = pipeline.discover(source_storage(job), destination_storage(job), job, chunk_size,
                             cores, part_images=part_size)
    if plan.parts:
        get_run_logger().info(
            "%d images in %d parts: %d kept from an earlier run, %d to make, %d refused at "
            "discovery", plan.discovered, len(plan.parts), sum(p.kept for p in plan.parts),
            sum(p.images for p in plan.parts), sum(p.rejected for p in plan.parts))
        return plan
    get_run_logger().info(
        "%d images: %d kept from an earlier run, %d to make in %d chunks of up to %d, "
        "%d refused at discovery", plan.discovered, len(plan.kept),
        sum(len(chunk.items) for chunk in plan.chunks), len(plan.chunks), plan.chunk_size,
        len(plan.rejected),
    )
    return plan


@task(name="resize-chunk", task_run_name="resize-chunk-{chunk.index:03d}", **_RETRYING)
def resize_chunk(job: Job, chunk: Chunk) -> ChunkResult:
    """Resize every image of one chunk into <run>/resized/."""
    images = pipeline.resize_images(chunk.items, job, source_storage(job),
                                    destination_storage(job))
    _log_failures(images, "resize", chunk.label)
    resources, node = ray_placement()
    return ChunkResult(index=chunk.index, images=tuple(images), resources=resources, node=node)


@task(name="filter-chunk", task_run_name="filter-chunk-{resized.index:03d}", **_RETRYING)
def filter_chunk(job: Job, resized: ChunkResult) -> ChunkResult:
    """Apply every requested filter to one resized chunk into <run>/<filter>/."""
    images = pipeline.filter_images(resized, job, destination_storage(job))
    _log_failures(images, "filter", f"{resized.index:03d}")
    resources, node = ray_placement()
    return ChunkResult(index=resized.index, images=tuple(images), resources=resources,
                       node=node)


@task(name="build-gallery", **_RETRYING)
def build_gallery(job: Job, report: RunReport) -> str:
    """Write the gallery page, contact sheets and report.json; returns the index key."""
    return gallery.build_gallery(report, destination_storage(job))


@task(name="build-gallery", **_RETRYING)
def build_gallery_of_parts(job: Job, report: RunReport, records: list[str]) -> str:
    """The gallery, images.jsonl and report.json of a run planned in parts, from the parts'
    record files; returns the index key."""
    return gallery.build_gallery_of_parts(report, destination_storage(job), records)
