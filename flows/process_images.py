"""The process-images flow: discover, resize and filter chunks on Ray, build the gallery."""

from __future__ import annotations

import os
import queue
import re
import time
from datetime import datetime, timezone
from typing import Callable, Sequence

from prefect import flow, get_run_logger
from prefect.blocks.core import Block
from prefect.context import FlowRunContext
from prefect.artifacts import (
    create_markdown_artifact, create_progress_artifact, create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Failed
from prefect.utilities.annotations import opaque, quote
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect_ray.context import remote_options

from pixelmill import pipeline, progress, summary
from pixelmill.errors import UsageError
from pixelmill.gallery import SheetsAhead
from pixelmill.layout import PART_IMAGES, check_run_name, check_shard, run_stamp
from pixelmill.models import (
    MAX_REPORT_FAILURES, Chunk, ChunkResult, ChunkSummary, Counts, ImageResult, Job, PartRef,
    PartSummary, Plan, RunnerChoice, RunReport,
)
from pixelmill.preflight import check_destination
from pixelmill.retries import PART_RETRIES
from pixelmill.runlock import Holder, RunFolderBusy, RunLock
from pixelmill.spec import PipelineSpec, StageResources, check_runner
from pixelmill.storage import is_gcs
from flows import kept_ray
from flows.runners import (
    AutoTaskRunner, LineageProcessPoolTaskRunner, SharedTaskRunner, runner_name,
)
from flows.ray_runner import KEPT_OR_TEMPORARY, ArgumentsRayTaskRunner
from tasks import build_gallery, build_gallery_of_parts, discover, filter_chunk, resize_chunk
from tasks.images import EachTaskRun
from tasks.storage import destination_storage

def make_task_runner(runner: str = "ray", ray_address: str | None = None,
                     job_env: dict[str, str] | None = None,
                     ray_runner: Callable[[], TaskRunner] | None = None) -> TaskRunner:
    """The task runner for `--runner`: Ray (`ray_address`, RAY_ADDRESS or a temporary local
    one), threads, Prefect's process pool, one thread, or `auto` (Ray given a Ray address,
    else threads, a process pool or Ray, chosen by the flow once it knows how many images it
    has to make;
    `ray_runner` builds the Ray one).

    `job_env` is given to the Ray job's workers (for pixelmill's long-lived local Ray, whose
    workers would otherwise see the environment of the command that started it)."""
    runner = check_runner(runner)
    cpus = os.cpu_count() or 1
    if runner == "auto" and (ray_address or os.environ.get("RAY_ADDRESS")):
        runner = "ray"  # a cluster to use was given
    if runner == "auto":
        return AutoTaskRunner(ray_runner or (lambda: make_task_runner("ray", ray_address,
                                                                      job_env)), threads=cpus)
    if runner == "ray":
        # No address (a deployment run, `python -m flows.process_images`): pixelmill's kept
        # local Ray if it is up when the flow starts, else a temporary one for this flow run
        # (ArgumentsRayTaskRunner decides then, not at import).
        address = ray_address or os.environ.get("RAY_ADDRESS") or KEPT_OR_TEMPORARY
        return ArgumentsRayTaskRunner(address=address,
                                      init_kwargs=kept_ray.init_kwargs(job_env))
    if runner == "processes":
        return LineageProcessPoolTaskRunner(max_workers=cpus)
    return ThreadPoolTaskRunner(max_workers=cpus if runner == "threads" else 1)


def _task_runner() -> TaskRunner | None:
    context = FlowRunContext.get()
    return context.task_runner if context is not None else None


def _on_ray() -> bool:
    return runner_name(_task_runner()) == "ray"


def _choose_runner(images: int | None, stages: dict[str, StageResources]) -> RunnerChoice:
    """Settle `--runner auto`: Ray at once when a stage asks for GPUs, otherwise by the
    number of `images` to make once it is known (None: not yet). Says which runner runs."""
    runner = _task_runner()
    if not isinstance(runner, AutoTaskRunner):
        return RunnerChoice(name=runner_name(runner))
    gpu = next((stage for stage, wants in stages.items() if wants.num_gpus), None)
    if gpu or images is not None:
        runner.choose(images or 0, f"the {gpu} stage asks for GPUs" if gpu else None)
    return RunnerChoice(name=runner_name(runner), reason=f"auto: {runner.reason}")


def _nodes() -> list[dict[str, float]]:
    """The resources of each node the flow's tasks can run on."""
    if _on_ray():
        import ray

        return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return [{"CPU": float(os.cpu_count() or 1)}]


def _check_resources(stages: dict[str, StageResources], nodes: list[dict[str, float]]) -> None:
    """Refuse a stage that asks for more than any single node has: Ray would wait forever."""
    for stage, wants in stages.items():
        for name, amount in (("CPU", wants.num_cpus), ("GPU", wants.num_gpus)):
            most = max((node.get(name, 0.0) for node in nodes), default=0.0)
            if amount > most:
                raise UsageError(
                    f"the {stage} stage asks for {amount:g} {name} per chunk but no node of the "
                    f"cluster has more than {most:g} ({len(nodes)} node(s)); lower it or use "
                    "a cluster that has them"
                )


def _check_paths(job: Job, nodes: list[dict[str, float]], shared_filesystem: bool) -> None:
    """Refuse local paths on a cluster of several nodes unless the user says they are shared:
    workers on other nodes would not find them."""
    if len(nodes) < 2 or shared_filesystem:
        return
    for what, uri in (("SOURCE", job.source), ("DEST", job.destination)):
        if not is_gcs(uri):
            raise UsageError(
                f"{what} {uri} is a local folder but the Ray cluster has {len(nodes)} nodes, "
                "whose workers cannot see it; use gs:// paths, or pass --shared-filesystem "
                "if every node sees this path")


def _outcome(chunk_images: int, future: PrefectFuture, resized: PrefectFuture | None,
             plan_chunk) -> tuple[list[ImageResult], ChunkSummary, ChunkResult | None]:
    """Images, summary and result of one chunk from the state of its last stage."""
    index = plan_chunk.index
    for done in (future, resized):
        if done is not None:
            done.wait()  # a done callback can run before the final state is recorded
    state = future.state
    if state.is_completed():
        result: ChunkResult = future.result()
        first: ChunkResult | None = resized.result() if resized is not None else None
        resources = {"resize": (first or result).resources}
        nodes = {"resize": (first or result).node}
        if first is not None:
            resources["filter"], nodes["filter"] = result.resources, result.node
        summary = ChunkSummary(index=index, state=state.name, images=chunk_images,
                               resources=resources,
                               nodes=nodes if any(nodes.values()) else None)
        return list(result.images), summary, result
    if resized is not None and resized.state.is_completed():
        reason = f"filter stage failed: {state.message or state.name}"
        images = [image.model_copy(update={"status": "failed", "error": reason})
                  if image.status == "ok" else image for image in resized.result().images]
    else:
        first_state = resized.state if resized is not None else state
        reason = f"chunk {plan_chunk.label} failed: {first_state.message or first_state.name}"
        images = [ImageResult(source=item.source, status="failed", error=reason)
                  for item in plan_chunk.items]
    summary = ChunkSummary(index=index, state=state.name, images=chunk_images, error=reason)
    return images, summary, None


# Unfinished resize tasks per CPU. With more, Ray runs queued tasks in an order of its own
# (the first chunk can finish last); with 1, chunks go strictly in order and the first one
# finishes sooner, at no cost to the whole run (docs/decisions.md, "Chunks in order").
AHEAD_PER_CPU = 1


def _in_order(chunks, submit_resize, submit_filter, ahead: int):
    """Run every chunk's stages; yield (chunk number, last stage's future, resize future or
    None) as chunks finish.

    Chunks go to the runner in order, at most `ahead` resize tasks unfinished at a time, and a
    chunk's filter task is submitted the moment its resize task finishes. Given all tasks at
    once, Ray ran them in an order of its own: filters waited behind resizes, the first chunk
    finished late and the last chunk started late. In order, chunks finish steadily from the
    first one, and a filter task gets its upstream result without a Ray reference to resolve.
    """
    finished: queue.SimpleQueue[PrefectFuture] = queue.SimpleQueue()
    stage_of: dict[PrefectFuture, tuple[str, int]] = {}
    resized: dict[int, PrefectFuture] = {}

    def launch(future: PrefectFuture, stage: str, number: int) -> None:
        stage_of[future] = (stage, number)
        future.add_done_callback(finished.put)

    submitted = resizing = 0
    while submitted < len(chunks) or stage_of:  # stage_of: every unfinished task
        while submitted < len(chunks) and resizing < ahead:
            launch(submit_resize(chunks[submitted]), "resize", submitted)
            submitted, resizing = submitted + 1, resizing + 1
        future = finished.get()
        stage, number = stage_of.pop(future)
        if stage == "resize":
            resizing -= 1
            future.wait()  # the callback can run before the final state is recorded
            if submit_filter is not None and future.state.is_completed():
                resized[number] = future
                launch(submit_filter(future), "filter", number)
                continue
            yield number, future, None
        else:
            yield number, future, resized.pop(number)


def _shard(index: int | None, count: int | None) -> tuple[int, int]:
    """Shard settings, defaulting from a Cloud Run job's task index and count."""
    index = int(os.environ.get("CLOUD_RUN_TASK_INDEX", 0)) if index is None else index
    count = int(os.environ.get("CLOUD_RUN_TASK_COUNT", 1)) if count is None else count
    check_shard(index, count)
    return index, count


def _default_run_name(shard_count: int) -> str:
    """The UTC minute of the scheduled start; for Cloud Run shards, their shared execution
    name (tasks of one execution may start either side of a minute boundary)."""
    execution = os.environ.get("CLOUD_RUN_EXECUTION")
    if shard_count > 1 and execution:
        return check_run_name(execution)
    return run_stamp(flow_run.scheduled_start_time)


# Suffixes tried when the default (minute-stamped) run folder is in use by another run.
MAX_RUN_SUFFIX = 9


def _lock_run_folder(job: Job, named: bool) -> tuple[Job, RunLock]:
    """Hold the job's run folder for this flow run. A folder named by the user that another
    run holds is refused (exit 2); the default minute stamp moves on to STAMP-2, STAMP-3..."""
    storage = destination_storage(job)
    holder = Holder(flow_run=str(flow_run.id or ""), flow_run_name=str(flow_run.name or ""))
    base = job.run
    for number in range(1, MAX_RUN_SUFFIX + 1):
        if number > 1:
            job = job.model_copy(update={"run": f"{base}-{number}"})
        lock = RunLock(storage, job.run_file(".pixelmill-lock.json"), holder,
                       storage.join(job.run))
        try:
            return job, lock.acquire()
        except RunFolderBusy:
            if named or number == MAX_RUN_SUFFIX:
                raise
    raise AssertionError("unreachable")


def _artifact_key(kind: str, job: Job) -> str:
    """Artifact keys: lowercase letters, digits and dashes (Prefect refuses others)."""
    shard = f"-shard-{job.shard_index}-of-{job.shard_count}" if job.sharded else ""
    return re.sub(r"[^a-z0-9-]+", "-", f"pixelmill-{kind}{shard}".lower())


def _persisting(result_storage: str | None):
    """The chunk tasks, with their results persisted in a storage block ("gcs-bucket/NAME")
    when one is given, else in Prefect's default result storage."""
    if not result_storage:
        return resize_chunk, filter_chunk
    block = Block.load(result_storage)
    options = {"result_storage": block, "persist_result": True, "cache_policy": EachTaskRun()}
    return resize_chunk.with_options(**options), filter_chunk.with_options(**options)


@flow(name="process-images", task_runner=make_task_runner("ray"), log_prints=True)
def process_images(
    source: str,
    destination: str,
    spec: PipelineSpec = PipelineSpec(),
    run_name: str | None = None,
    chunk_size: int | None = None,
    resize_resources: StageResources = StageResources(),
    filter_resources: StageResources = StageResources(),
    gcp_credentials_block: str | None = None,
    result_storage: str | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    shared_filesystem: bool = False,
    part_size: int = PART_IMAGES,
    part_deployment: str | None = None,
) -> RunReport:
    """Resize and filter every image under `source` into `destination`/<run>/ with a gallery.

    Outputs in the run folder made from the same source version and settings are kept.
    `shard_index` / `shard_count` (default: Cloud Run's task index and count): one of several
    disjoint shards. `shared_filesystem`: every node of a Ray cluster sees local paths.
    `part_size`: a bigger run goes in parts of about this many images, each a child flow run,
    or a flow run of `part_deployment` ("process-images-part/parts") on its pool's workers.
    """
    started, started_at = time.monotonic(), datetime.now(timezone.utc).isoformat()
    shard_index, shard_count = _shard(shard_index, shard_count)
    job = Job(source=source, destination=destination, spec=spec,
              run=check_run_name(run_name) if run_name else _default_run_name(shard_count),
              gcp_credentials_block=gcp_credentials_block, shard_index=shard_index,
              shard_count=shard_count)
    stages = {"resize": resize_resources, "filter": filter_resources}
    _choose_runner(None, stages)  # Ray now if a stage needs GPUs: its nodes are checked
    nodes = _nodes()
    try:
        job, lock = _admitted(job, stages, nodes, shared_filesystem, part_deployment,
                              named=bool(run_name))
    except UsageError as exc:  # a refusal, not a crash: one line in the state, no traceback
        return Failed(message=str(exc), data=exc)
    try:
        return _process(job, chunk_size, *_persisting(result_storage), resize_resources,
                        filter_resources, nodes, started, started_at, result_storage,
                        part_size, part_deployment)
    finally:
        lock.release()


def _admitted(job: Job, stages: dict[str, StageResources], nodes: list[dict[str, float]],
              shared_filesystem: bool, part_deployment: str | None, named: bool
              ) -> tuple[Job, RunLock]:
    """Check what would make the run wait forever or fail late (UsageError), then hold its
    run folder (`_lock_run_folder`)."""
    _check_resources(stages, nodes)
    _check_paths(job, nodes, shared_filesystem)
    check_destination(job.destination)  # a file, unwritable, no bucket: refused, not retried
    if part_deployment:
        _check_part_deployment(part_deployment)
    return _lock_run_folder(job, named)


def _run_chunks(job: Job, chunks: Sequence[Chunk], resize_task, filter_task,
                resize_resources: StageResources, filter_resources: StageResources,
                cpus: int, started: float, on_chunk: Callable[[int, list[ImageResult]], None]
                = lambda number, images: None, part: int | None = None,
                ) -> tuple[list[ImageResult], list[ChunkSummary]]:
    """Every chunk through its stages on the flow's runner: the scheduling of a run.

    Guarantees: chunks start in order, a few ahead of the runner's cores (`_in_order`); a
    chunk's filter task starts as soon as its resize task ends, with that task's state as
    its upstream (Prefect records the lineage); every image of every chunk comes back once,
    made, kept or failed with a reason (a chunk that fails for good fails its images, never
    the others); `on_chunk` hears each chunk's images as it finishes. Returns the images'
    results and each chunk's summary, by index."""
    resize_job = job.without_filters()  # the resize stage does not depend on the filters

    # A chunk's items and a resize chunk's images are hundreds of records, which Prefect
    # would otherwise walk, each time a task run is created and again when it starts,
    # looking for futures inside: both go `opaque` (the chunk holds none; the upstream state
    # is resolved and its lineage recorded, its result not walked).
    def submit_resize(chunk):
        with remote_options(**resize_resources.ray_options()):
            return resize_task.submit(resize_job, opaque(chunk))

    def submit_filter(resized: PrefectFuture):
        with remote_options(**filter_resources.ray_options()):
            # the upstream *state*: Prefect records the lineage and hands the task its result
            return filter_task.submit(job, opaque(resized.state))

    results: list[ImageResult] = []
    summaries: list[ChunkSummary] = []
    for number, future, upstream in _in_order(chunks, submit_resize,
                                              submit_filter if job.spec.filters else None,
                                              AHEAD_PER_CPU * max(1, cpus)):
        chunk = chunks[number]
        chunk_images, chunk_summary, result = _outcome(len(chunk.items), future, upstream, chunk)
        results.extend(chunk_images)
        on_chunk(number, chunk_images)
        summaries.append(chunk_summary.model_copy(
            update={"finished_s": round(time.monotonic() - started, 3), "part": part}))
        progress.chunk_done(result, len(chunk.items))
    return results, sorted(summaries, key=lambda chunk: chunk.index)


def _process(job: Job, chunk_size: int | None, resize_task, filter_task,
             resize_resources: StageResources, filter_resources: StageResources,
             nodes: list[dict[str, float]], started: float, started_at: str,
             result_storage: str | None = None, part_size: int = PART_IMAGES,
             part_deployment: str | None = None):
    cpus = int(sum(node.get("CPU", 0.0) for node in nodes)) or 1
    plan: Plan = discover(job, chunk_size, cpus, part_size)
    if plan.parts:
        return _process_parts(job, plan, chunk_size, resize_resources, filter_resources, cpus,
                              started, started_at, result_storage, part_size,
                              part_deployment)
    images = sum(len(chunk.items) for chunk in plan.chunks)
    runner = _choose_runner(images, {"resize": resize_resources, "filter": filter_resources})
    progress.planned(len(plan.chunks), images, len(plan.rejected), len(plan.kept))
    progress_artifact = create_progress_artifact(
        0.0, key=_artifact_key("progress", job),
        description=f"share of the {len(plan.chunks)} chunks done ({images} images to make, "
                    f"{len(plan.kept)} kept)")
    done = 0

    def on_chunk(number: int, chunk_images: list[ImageResult]) -> None:
        nonlocal done
        done += 1
        sheets.chunk_done(number, chunk_images)
        update_progress_artifact(progress_artifact, 100.0 * done / len(plan.chunks))

    # contact sheets whose images are all decided are drawn while later chunks run
    with SheetsAhead(job, destination_storage(job), plan.kept, plan.chunks) as sheets:
        made, summaries = _run_chunks(job, plan.chunks, resize_task, filter_task,
                                      resize_resources, filter_resources, cpus, started,
                                      on_chunk)
    report = RunReport.build(job, plan.discovered, [*plan.rejected, *plan.kept, *made],
                             time.monotonic() - started, summaries, started_at, runner,
                             not_images=plan.not_images)
    # quote: the report holds a record per image, which Prefect would otherwise walk looking
    # for upstream futures (seconds at 20,000 images)
    index = build_gallery(job, quote(report))
    if not plan.chunks:
        update_progress_artifact(progress_artifact, 100.0)
    return _finish(job, report, index, summaries)


def _finish(job: Job, report: RunReport, index: str, summaries: Sequence[ChunkSummary],
            failed_parts: int = 0):
    """Publish the run's artifacts and decide its final state from its chunks (and parts)."""
    logger = get_run_logger()
    create_markdown_artifact(summary.markdown(report, index), key=_artifact_key("summary", job),
                             description=f"pixelmill run {job.run}")
    create_table_artifact(summary.failure_rows(report), key=_artifact_key("failures", job),
                          description=f"{report.counts.failed} failed images of run {job.run}")
    logger.info("%d ok, %d failed, %d kept; gallery at %s", report.counts.ok,
                report.counts.failed, report.counts.skipped,
                summary.object_url(job.destination, index))
    failed_chunks = [chunk for chunk in summaries if chunk.state != "Completed"]
    if failed_parts:
        return Failed(message=f"{failed_parts} of {report.parts} parts failed", data=report)
    if failed_chunks:
        return Failed(message=f"{len(failed_chunks)} of {len(summaries)} chunks failed",
                      data=report)
    return report


def _make_parts(job: Job, parts: Sequence[PartRef], chunk_size: int | None,
                resize_resources: StageResources, filter_resources: StageResources,
                cores: int, result_storage: str | None, started: float
                ) -> list[PartSummary]:
    """The images to make of consecutive `parts`, in one set of chunks on the flow's runner;
    each part's records written (`_record_parts`)."""
    destination = destination_storage(job)
    items = [item for part in parts for item in pipeline.read_part(destination, job, part)[0]]
    chunks, _ = pipeline.cut_chunks(items, pipeline.merged(parts).item_bytes, chunk_size, cores)
    resize_task, filter_task = _persisting(result_storage)
    made, chunk_summaries = _run_chunks(job, chunks, resize_task, filter_task, resize_resources,
                                        filter_resources, cores, started,
                                        part=parts[0].number)
    summaries = _record_parts(job, parts, {image.source: image for image in made})
    # the chunks go with the first part (a failed chunk fails the run, not the part)
    return [summaries[0].model_copy(update={"chunks": tuple(chunk_summaries)}),
            *summaries[1:]]


def _record_parts(job: Job, parts: Sequence[PartRef], made: dict[str, ImageResult],
                  reason: str | None = None) -> list[PartSummary]:
    """Write each part's records: its decided images (kept, refused) and its images to make
    as `made` has them, or failed with `reason` (a part whose flow run failed for good)."""
    destination = destination_storage(job)
    summaries = []
    for part in parts:
        items, records = pipeline.read_part(destination, job, part)
        records += [pipeline.record(made.get(item.source) or ImageResult(
            source=item.source, status="failed", error=reason or "not made")) for item in items]
        counts = Counts.of(entry["status"] for entry in records)
        failures = sorted((pipeline.from_record(entry) for entry in records
                           if entry["status"] == "failed"),
                          key=lambda image: image.source)[:MAX_REPORT_FAILURES]
        summaries.append(PartSummary(
            number=part.number, records=pipeline.write_records(destination, job, part.number,
                                                               records),
            counts=counts, failures=tuple(failures),
            state="Failed" if reason else "Completed"))
    return summaries


@flow(name="process-images-part", log_prints=True, retries=PART_RETRIES,
      task_runner=make_task_runner("auto"))
def process_part(job: Job, parts: list[PartRef], chunk_size: int | None = None,
                 resize_resources: StageResources = StageResources(),
                 filter_resources: StageResources = StageResources(),
                 cores: int | None = None, result_storage: str | None = None,
                 since: float | None = None,
                 since_epoch: float | None = None) -> list[PartSummary]:
    """Consecutive parts of a run too big for one flow run: their images to make in chunks,
    and each part's records written to the run folder. A retry makes them again.

    Started by the run itself, it is a child flow run on the run's own runner. Started as a
    deployment run (the run's `part_deployment`), any worker of the pool can take it: it
    runs on its own runner (`auto`), and leaves each part's summary in the run folder for
    the run to read. `cores`: the parent's, for chunk sizes (default: this machine's or
    Ray's). `since`: the run's start (`time.monotonic()` of the parent's process), which
    the chunks' finishing times count from; `since_epoch`: the same as a wall-clock time,
    for a part run in another process."""
    if since is None and since_epoch is not None:
        since = time.monotonic() - (time.time() - since_epoch)
    stages = {"resize": resize_resources, "filter": filter_resources}
    _choose_runner(sum(part.images for part in parts), stages)  # auto: threads, processes or Ray
    if cores is None:
        cores = int(sum(node.get("CPU", 0.0) for node in _nodes())) or 1
    summaries = _make_parts(job, parts, chunk_size, resize_resources, filter_resources, cores,
                            result_storage, time.monotonic() if since is None else since)
    context = FlowRunContext.get()
    if context is not None and context.flow_run.deployment_id:  # started as a deployment
        # run: the run that started it reads these from the run folder
        destination = destination_storage(job)
        for part_summary in summaries:
            pipeline.write_summary(destination, job, part_summary)
    counts = [summary.counts for summary in summaries]
    get_run_logger().info("parts %s-%s: %d made, %d failed, %d kept", parts[0].label,
                          parts[-1].label, sum(c.ok for c in counts),
                          sum(c.failed for c in counts), sum(c.skipped for c in counts))
    return summaries


def _check_part_deployment(name: str) -> None:
    """Refuse a `part_deployment` that is not deployed, before any part is started."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_deployment_by_name(name)
    except (ObjectNotFound, ValueError):
        raise UsageError(f"part_deployment {name!r}: no such deployment; deploy prefect.yaml "
                         "(process-images-part/parts) or leave it out") from None


def _part_failed(job: Job, batch: Sequence[PartRef], reason: str) -> list[PartSummary]:
    """A group of parts whose flow run failed for good: logged, and its images to make
    recorded failed with `reason` (its kept and refused ones as decided)."""
    get_run_logger().error(reason)
    return _record_parts(job, batch, {}, reason)


def _part_run_name(job: Job, batch: Sequence[PartRef]) -> str:
    return f"{job.run}-part-{batch[0].label}" + (
        f"-{batch[-1].label}" if len(batch) > 1 else "")


# How often a run looks at the deployment runs of its parts, and how often it says that some
# still wait for a worker.
PART_POLL_S = 2.0
WAITING_NOTE_S = 60.0
PAGE = 200  # flow runs read at a time


def _parts_as_deployment_runs(job: Job, batches: list[list[PartRef]], deployment: str,
                              parameters: dict, on_batch: Callable[[], None]
                              ) -> dict[int, list[PartSummary]]:
    """Each group of parts as a flow run of `deployment` (`process_part`), all started at
    once so that the pool's workers take them in parallel (as many at a time as the pool and
    its workers allow); returns each group's summaries (read from the run folder) by its
    first part, a group whose flow run failed for good, or was deleted, recorded as failed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    pending = _start_part_runs(job, batches, deployment, parameters)
    done: dict[int, list[PartSummary]] = {}
    noted = time.monotonic()
    with get_client(sync_client=True) as client:
        while pending:
            time.sleep(PART_POLL_S)
            ids = list(pending)
            runs = {run.id: run for start in range(0, len(ids), PAGE)  # the API's page size
                    for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(
                        id=FlowRunFilterId(any_=ids[start:start + PAGE])), limit=PAGE)}
            for run_id in ids:
                run = runs.get(run_id)
                if run is None or (run.state is not None and run.state.is_final()):
                    batch = pending.pop(run_id)
                    done[batch[0].number] = _part_run_result(job, batch, run)
                    on_batch()
            waiting = [run for run in runs.values() if run.id in pending
                       and run.state is not None and run.state.is_scheduled()]
            if waiting and time.monotonic() - noted > WAITING_NOTE_S:
                noted = time.monotonic()
                get_run_logger().warning("%d part flow runs of deployment %s still wait for "
                                         "a worker of its work pool", len(waiting), deployment)
    return done


def _start_part_runs(job: Job, batches: list[list[PartRef]], deployment: str,
                     parameters: dict) -> dict:
    """Start a flow run of `deployment` for each group of parts, without waiting; returns
    the groups by flow run id."""
    from prefect.deployments import run_deployment

    pending = {}
    for batch in batches:
        run = run_deployment(deployment, timeout=0, flow_run_name=_part_run_name(job, batch),
                             parameters={**parameters, "job": job.model_dump(mode="json"),
                                         "parts": [part.model_dump(mode="json")
                                                   for part in batch]})
        pending[run.id] = batch
    get_run_logger().info("%d groups of parts started as flow runs of deployment %s",
                          len(batches), deployment)
    return pending


def _part_run_result(job: Job, batch: Sequence[PartRef], run) -> list[PartSummary]:
    """The summaries of a group of parts whose flow run ended (`run`; None: deleted): read
    from the run folder, or its images recorded failed with the reason."""
    if run is None:  # deleted: nothing will finish it
        return _part_failed(job, batch,
                            f"part {_part_run_name(job, batch)}: its flow run was deleted")
    if not run.state.is_completed():
        return _part_failed(job, batch,
                            f"part {run.name} failed: {run.state.message or run.state.name}")
    destination = destination_storage(job)
    try:
        return [pipeline.read_summary(destination, job, part.number) for part in batch]
    except (FileNotFoundError, ValueError) as exc:  # other errors raise
        return _part_failed(job, batch, f"part {run.name} finished but left no summary: {exc}")


def _process_parts(job: Job, plan: Plan, chunk_size: int | None,
                   resize_resources: StageResources, filter_resources: StageResources,
                   cpus: int, started: float, started_at: str, result_storage: str | None,
                   part_size: int, part_deployment: str | None = None):
    """A run planned in parts. Their images to make go in groups of up to `part_size`
    (`pipeline.batches`), made by `_make_batches`; then one report and one gallery of every
    part's records."""
    images = sum(part.images for part in plan.parts)
    batches = pipeline.batches(plan.parts, part_size)
    deployed = bool(part_deployment) and len(batches) > 1
    runner = (RunnerChoice(name="deployment", reason=f"parts as flow runs of {part_deployment}")
              if deployed else
              _choose_runner(images, {"resize": resize_resources, "filter": filter_resources}))
    progress.planned(sum(pipeline.part_chunks(pipeline.merged(batch), chunk_size, cpus)
                         for batch in batches), images, sum(part.rejected for part in plan.parts),
                     sum(part.kept for part in plan.parts))
    progress_artifact = create_progress_artifact(
        0.0, key=_artifact_key("progress", job),
        description=f"share of the {len(batches)} parts done ({images} images to make)")
    finished = 0

    def on_batch() -> None:
        nonlocal finished
        finished += 1
        update_progress_artifact(progress_artifact, 100.0 * finished / len(batches))

    by_batch = _make_batches(job, batches, part_deployment if deployed else None, on_batch,
                             chunk_size=chunk_size, resize_resources=resize_resources,
                             filter_resources=filter_resources, cores=cpus,
                             result_storage=result_storage, since=started)
    if not batches:
        update_progress_artifact(progress_artifact, 100.0)
    ordered = _part_summaries(job, plan, batches, by_batch)
    report = _parts_report(job, plan, ordered, started, started_at, runner)
    records = [part_summary.records for part_summary in ordered]
    index = build_gallery_of_parts(job, report, records)
    pipeline.remove_parts(destination_storage(job), job, plan.parts, records,
                          summaries=deployed)
    failed_parts = sum(part_summary.state != "Completed" for part_summary in ordered)
    return _finish(job, report, index, [c for s in ordered for c in s.chunks], failed_parts)


def _make_batches(job: Job, batches: list[list[PartRef]], deployment: str | None,
                  on_batch: Callable[[], None], **options) -> dict[int, list[PartSummary]]:
    """Each group of parts made, its parts' summaries by its first part: one group in this
    flow run; more, each a child flow run, one after the other on this flow's runner, or
    (`deployment`) all at once as flow runs of that deployment, which the pool's workers take.
    `options`: `process_part`'s."""
    by_batch: dict[int, list[PartSummary]] = {}
    if deployment:
        by_batch = _parts_as_deployment_runs(job, batches, deployment, {
            "chunk_size": options["chunk_size"],
            "resize_resources": options["resize_resources"].model_dump(),
            "filter_resources": options["filter_resources"].model_dump(),
            "result_storage": options["result_storage"],
            "since_epoch": time.time() - (time.monotonic() - options["since"])}, on_batch)
    part_flow = process_part.with_options(task_runner=SharedTaskRunner(_task_runner()))
    for batch in batches:
        if batch[0].number in by_batch:
            continue
        if len(batches) == 1:
            by_batch[batch[0].number] = _make_parts(
                job, batch, options["chunk_size"], options["resize_resources"],
                options["filter_resources"], options["cores"], options["result_storage"],
                options["since"])
        else:
            name = _part_run_name(job, batch)
            state = part_flow.with_options(flow_run_name=name)(
                job=job, parts=batch, return_state=True, **options)
            by_batch[batch[0].number] = (state.result() if state.is_completed() else
                                         _part_failed(job, batch, f"part {name} failed: "
                                                      f"{state.message or state.name}"))
        on_batch()
    return by_batch


def _part_summaries(job: Job, plan: Plan, batches: list[list[PartRef]],
                    by_batch: dict[int, list[PartSummary]]) -> list[PartSummary]:
    """Every part's summary in order, the first MAX_REPORT_FAILURES failures of the run kept
    (a part with nothing to make: its records as decided)."""
    done: dict[int, PartSummary] = {}
    kept_failures = 0
    for batch in batches:
        for made_summary in by_batch[batch[0].number]:
            budget = max(0, MAX_REPORT_FAILURES - kept_failures)
            kept_failures += min(budget, len(made_summary.failures))
            done[made_summary.number] = made_summary.model_copy(
                update={"failures": made_summary.failures[:budget]})
    return [done.get(part.number) or _record_parts(job, [part], {})[0] for part in plan.parts]


def _parts_report(job: Job, plan: Plan, ordered: Sequence[PartSummary], started: float,
                  started_at: str, runner: RunnerChoice) -> RunReport:
    """One report of the parts' summaries."""
    counts = sum((part_summary.counts for part_summary in ordered), Counts()).model_copy(
        update={"discovered": plan.discovered})
    failures = [image for part_summary in ordered
                for image in part_summary.failures][:MAX_REPORT_FAILURES]
    chunks = [chunk for part_summary in ordered for chunk in part_summary.chunks]
    return RunReport.build(job, plan.discovered, failures, time.monotonic() - started, chunks,
                           started_at, runner, counts=counts, parts=len(plan.parts),
                           not_images=plan.not_images)


if __name__ == "__main__":
    # python -m flows.process_images [SOURCE] [DEST]: defaults to the demo's sample photos, on
    # the Prefect API of this shell (`eval "$(pixelmill server start)"` points it at
    # pixelmill's kept server).
    import sys
    from pathlib import Path

    from pixelmill.samples import write_demo_set

    # absolute: Ray's workers do not run in this shell's folder
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "pixelmill-demo/samples").absolute()
    dest = Path(sys.argv[2] if len(sys.argv) > 2 else "pixelmill-demo/runs").absolute()
    if len(sys.argv) <= 1 and not source.is_dir():
        write_demo_set(source)
    process_images(str(source), str(dest),
                   spec=PipelineSpec(filters=("blur", "sharpen", "contour", "emboss")))
