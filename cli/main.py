"""The `pixelmill` command line: demo, run, resize, check, server.

Exit status: 0 every image ok; 1 the run finished but some images failed; 2 bad usage or
configuration (one line, nothing written); 3 the run itself failed. Prefect, Ray and the
flows are imported only inside the commands that run them, after the API is set up.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from pixelmill import preflight

from cli import localray, server, warm
from pixelmill.home import home
from flows import kept_ray  # Prefect-free; cli.localray loads it anyway
from pixelmill.errors import ImageError, UsageError
from pixelmill.filters import FILTER_NAMES, canonical_filter
from pixelmill.models import ChunkResult, RunReport
from pixelmill.spec import PRESETS, PipelineSpec, check_runner, parse_size
from pixelmill.localstorage import LocalStorage
from pixelmill.storages import open_storage

EXIT_OK, EXIT_IMAGES_FAILED, EXIT_USAGE, EXIT_RUN_FAILED = 0, 1, 2, 3

DEMO_FILTERS = ("blur", "sharpen", "contour", "emboss")


def _flag_type(option: typer.core.TyperOption, ctx) -> str | None:
    """The type shown after an option in --help: none for a flag, which takes no value
    (typer would show `<bool>`, as if `--upscale true` were expected)."""
    if option.is_flag:
        return None
    return _value_type(option, ctx)


_value_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = _flag_type

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Batch image pipeline on Prefect + Ray: resize, filter, gallery.")
server_app = typer.Typer(no_args_is_help=True,
                         help="The local Prefect server and Ray pixelmill starts.")
app.add_typer(server_app, name="server")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
# Called with the exit status just before the process ends (the warm host's child sends it
# to the command that handed the command over: cli/warm.py).
_on_exit: list = []


# Young-object collections run every this many allocations (Python's default is 700): a run
# makes a record per image that lives to its end, and each collection walks the young ones.
GC_THRESHOLD = (50_000, 20, 100)


def settle_heap() -> None:
    """What is loaded by now (Prefect, the flows: ~130,000 objects) lives as long as the
    process: set it aside from the garbage collector, and collect less often. Discovery of
    20,000 images took 0.86 s with the collector walking all of that, 0.61 s without."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def fresh_consoles() -> None:
    """Make the consoles again for this process's streams and environment (terminal or not,
    colours, width): the warm host made them for its own, before a command's were known."""
    console.__init__(stderr=True, soft_wrap=True)
    out.__init__(soft_wrap=True)


def _end(code: int) -> None:
    """End the process now with `code`, its output flushed and its status reported."""
    sys.stdout.flush()
    sys.stderr.flush()
    for report in _on_exit:
        report(code)
    os._exit(code)


class Fail(Exception):
    """Leave the command with an exit status and one line for the user."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ApiLost(Fail):
    """The Prefect API went away for good: nothing queued for it can be delivered, so the
    command leaves at once instead of waiting for Prefect's background senders to give up."""


def _spec(size: str | list[str] | None, fit: str, filters: list[str] | None,
          fmt: str | list[str] | None, quality: int, upscale: bool = False,
          keep_metadata: bool = False, preset: str | None = None) -> PipelineSpec:
    """Validate the pipeline options into a spec; any problem is a UsageError (exit 2).
    `--size` and `--format` given replace the preset's; neither: 400x300 JPEG."""
    sizes = [size] if isinstance(size, str) else list(size or [])
    formats = [fmt] if isinstance(fmt, str) else list(fmt or [])
    for text in sizes:
        parse_size(text)
    names = [canonical_filter(name) for name in (filters or [])]
    chosen: dict[str, object] = {"preset": preset} if preset else {}
    if sizes or not preset:
        chosen["sizes"] = sizes or ["400x300"]
    if formats or not preset:
        chosen["formats"] = formats or ["jpeg"]
    try:
        return PipelineSpec(**chosen, fit=fit, filters=names, quality=quality,
                            upscale=upscale, keep_metadata=keep_metadata)
    except ValidationError as exc:
        error = exc.errors()[0]
        if isinstance(error.get("ctx", {}).get("error"), UsageError):  # says it already
            raise error["ctx"]["error"] from None
        field = ".".join(str(part) for part in error["loc"]) or "option"
        raise UsageError(f"--{field} {error.get('input')!r}: {error['msg']}") from None


class RichProgress:
    """Draws chunks done / images done / failures while the flow runs in this process.

    Images counts every image this run decides on: those to make and those refused at
    discovery (done and failed from the start); kept ones are said once, not counted. An
    image is counted failed once, however many stages report it."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.fields[chunks]}"),
                            TextColumn("images {task.completed:.0f}/{task.fields[images]}"),
                            TextColumn("{task.fields[failed]}"),
                            TimeElapsedColumn(), console=console, transient=False)
        self.task = self.bar.add_task("processing", total=None, chunks="", images="?",
                                      failed=self.failed_text(0), start=False)
        self.chunks_total = self.chunks_done = self.failed_chunk_images = 0
        self.failed_sources: set[str] = set()

    @staticmethod
    def failed_text(failed: int) -> str:
        """The failures count, in red only when something failed (red means look)."""
        return f"[red]{failed} failed[/red]" if failed else f"{failed} failed"

    @property
    def failed(self) -> int:
        return len(self.failed_sources) + self.failed_chunk_images

    def planned(self, chunks: int, images: int, rejected: int, kept: int = 0) -> None:
        self.chunks_total = chunks
        self.failed_chunk_images = rejected  # refused at discovery: failed, nothing to do
        self.bar.start_task(self.task)
        if kept:
            console.print(f"{kept} images kept: their outputs are in the run folder, made from "
                          "the same source version with the same settings")
        self.bar.update(self.task, total=images + rejected, completed=rejected,
                        images=images + rejected, chunks=f"chunks 0/{chunks}",
                        failed=self.failed_text(self.failed))

    def chunk_done(self, result: ChunkResult | None, images: int) -> None:
        self.chunks_done += 1
        if result is None:  # the chunk failed for good: every image of it failed
            self.failed_chunk_images += images
        else:
            self.failed_sources.update(image.source for image in result.images
                                       if image.status == "failed")
        self.bar.update(self.task, advance=images, failed=self.failed_text(self.failed),
                        chunks=f"chunks {self.chunks_done}/{self.chunks_total}")


def _prepare_prefect(verbose: bool) -> server.ServerInfo | None:
    if not verbose:
        for key, value in server.QUIET_ENV.items():
            os.environ.setdefault(key, value)
        logging.raiseExceptions = False  # the API log handler's "--- Error logging to API ---"
    try:
        url, info = server.ensure_api()
    except RuntimeError as exc:
        raise Fail(EXIT_USAGE, str(exc).splitlines()[0]) from None
    if "prefect.context" in sys.modules:  # loaded already (the warm host): take the above
        _refresh_prefect_settings()
    if info is not None:
        console.print(f"Prefect UI: [link={info.ui_url}]{info.ui_url}[/link] "
                      "(local server; `pixelmill server stop` ends it)")
        warm.ensure_started(home())  # later commands start without loading Prefect
    else:
        console.print(f"using the Prefect server at {url} (not started by pixelmill; "
                      "PREFECT_API_URL)", highlight=False)
    return info


# What Prefect's logging was set up with, when Prefect was loaded before the command's
# environment was known (the warm host records it: `remember_logging`).
_logging_set_up_with: tuple | None = None


def _logging_inputs() -> tuple:
    """What Prefect's logging set-up reads: its settings and PREFECT_LOGGING_* variables."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    return (settings.logging, settings.home,
            sorted(item for item in os.environ.items() if item[0].startswith("PREFECT_LOGGING_")))


def remember_logging() -> None:
    global _logging_set_up_with
    _logging_set_up_with = _logging_inputs()


def _refresh_prefect_settings() -> None:
    """Prefect's settings and logging from this command's environment and folder, when
    Prefect was loaded before they were known (the warm host's child). Logging is set up
    again only when what it reads differs from what it was set up with: it reads a YAML
    file and builds every handler (~60 ms)."""
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    refresh_global_settings_context()
    if _logging_inputs() != _logging_set_up_with:
        setup_logging(incremental=False)


def _local_ray() -> tuple[str, dict[str, str]]:
    """pixelmill's long-lived local Ray (started now if needed): its address and the
    environment this run's workers get."""
    try:
        info, started = localray.ensure()
    except RuntimeError as exc:
        raise Fail(EXIT_RUN_FAILED, f"could not start a local Ray: {str(exc).splitlines()[0]} "
                   "(--ray-address local runs a temporary one)") from None
    if started:
        console.print(f"Ray: started a local cluster at {info.address} for this and later "
                      "runs (`pixelmill server stop` ends it)")
    return info.address, localray.job_env()


def _checked(source: str, dest: str, runner: str, run_name: str | None,
             chunk_size: int | None, gcp_credentials_block: str | None,
             part_size: int | None = None) -> tuple[str, str]:
    """A run's arguments checked before anything starts (exit 2 otherwise); returns SOURCE
    and DEST with local paths made absolute: Ray workers do not share this shell's working
    directory (pixelmill's long-lived local Ray runs them in its own folder)."""
    from pixelmill.layout import check_run_name

    check_runner(runner)
    if not gcp_credentials_block:  # with a block, Prefect must be up first to load it
        preflight.check_source(source, dest)
        preflight.check_destination(dest)
    else:
        open_storage(dest, destination=True)  # the URI's form at least
    if run_name:
        check_run_name(run_name)
    if chunk_size is not None and chunk_size < 1:
        raise UsageError(f"--chunk-size {chunk_size}: must be at least 1")
    if part_size is not None and part_size < 1:
        raise UsageError(f"--part-size {part_size}: must be at least 1")
    source, dest = (uri if not uri or "://" in uri else str(Path(uri).absolute())
                    for uri in (source, dest))
    return source, dest


def _with_address(runner: str, ray_address: str | None,
                  why: str | None = None) -> tuple[str, str]:
    """(runner, why it runs): `auto` given a Ray address is Ray; otherwise as asked."""
    if runner == "auto" and ray_address:
        return "ray", "auto: a Ray address was given"
    return runner, why or f"--runner {runner}"


def execute(source: str, dest: str, spec: PipelineSpec, *, runner: str = "ray",
            ray_address: str | None = None, run_name: str | None = None,
            chunk_size: int | None = None, verbose: bool = False,
            gcp_credentials_block: str | None = None,
            result_storage: str | None = None,
            shared_filesystem: bool = False,
            why: str | None = None,
            part_size: int | None = None) -> tuple[int, RunReport | None]:
    """Run the flow in this process with a progress bar; returns (exit status, report)."""
    source, dest = _checked(source, dest, runner, run_name, chunk_size, gcp_credentials_block,
                            part_size)
    _prepare_prefect(verbose)
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
    runner, why = _with_address(runner, ray_address, why)
    job_env = None
    if runner == "ray" and not ray_address:
        ray_address, job_env = _local_ray()
    if runner == "ray":  # its workers start while Prefect is imported below; the flow's
        kept_ray.connect(ray_address, job_env)  # Ray task runner then uses this connection

    from flows.process_images import make_task_runner, process_images  # after the API is set
    from flows.ray_runner import ArgumentsRayTaskRunner
    from pixelmill import progress

    settle_heap()
    # auto: Ray (pixelmill's kept local one) is connected only if the flow chooses it
    task_runner = make_task_runner(runner, ray_address, job_env,
                                   ray_runner=lambda: make_task_runner("ray", *_local_ray()))
    connected = isinstance(task_runner, ArgumentsRayTaskRunner)
    if connected:
        task_runner.connect()  # Ray's workers warm up while the flow run is set up
    flow = process_images.with_options(task_runner=task_runner)
    listener = RichProgress()
    progress.listen(listener)
    started = time.monotonic()
    api_url = os.environ["PREFECT_API_URL"]
    try:
        with listener.bar, _quiet_when_the_api_goes(verbose), _no_heartbeats_unless_asked():
            state = flow(source=source, destination=dest, spec=spec, run_name=run_name,
                         chunk_size=chunk_size, gcp_credentials_block=gcp_credentials_block,
                         result_storage=result_storage, shared_filesystem=shared_filesystem,
                         **({"part_size": part_size} if part_size else {}),
                         return_state=True)
    except Exception as exc:
        if verbose:
            raise
        if not server.healthy(api_url):
            raise ApiLost(EXIT_RUN_FAILED, _lost_api(api_url)) from None
        raise Fail(EXIT_RUN_FAILED, f"the run failed: {type(exc).__name__}: {exc} "
                   "(--verbose shows where)") from None
    finally:
        progress.unlisten(listener)
        if connected:
            import ray

            ray.shutdown()
    elapsed = time.monotonic() - started
    if state.is_crashed() and not server.healthy(api_url):
        raise ApiLost(EXIT_RUN_FAILED, _lost_api(api_url))
    flow_run_id = state.state_details.flow_run_id
    if flow_run_id:
        ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
        console.print(f"Flow run: {ui}/runs/flow-run/{flow_run_id}")
    result = state.result(raise_on_failure=False)
    if isinstance(result, UsageError):
        raise result
    if not isinstance(result, RunReport):
        console.print(f"[red]run failed:[/red] {state.message or result}")
        return EXIT_RUN_FAILED, None
    _summary(result, elapsed, why)
    if not result.counts.discovered:  # only a shard, or a source emptied since the check
        console.print(f"no images found under {source}", highlight=False)
    return (EXIT_IMAGES_FAILED if result.counts.failed else EXIT_OK), result


def _no_heartbeats_unless_asked():
    """This command's flow run sends no heartbeat events unless the user set a frequency.

    Prefect 3.8 sends one every 180 s by default, for an automation that marks runs whose
    heartbeats stop as crashed; pixelmill creates none, and the engine's heartbeat thread
    sleeps in whole seconds, so ending the run waits for it up to 1 s (0.5 s on average, a
    sixth of a re-run that finds nothing new on 20,000 images). Who set
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY (or its older name) keeps heartbeats; deployment runs,
    started by a worker, keep Prefect's default."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    if {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"} & set(os.environ):
        return contextlib.nullcontext()
    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def plan_only(source: str, dest: str, spec: PipelineSpec, *, runner: str = "auto",
              ray_address: str | None = None, run_name: str | None = None,
              chunk_size: int | None = None, verbose: bool = False,
              gcp_credentials_block: str | None = None, part_size: int | None = None) -> int:
    """`pixelmill run --dry-run`: the same checks and the same listing and decision as a run,
    printed; nothing is written and no server or Ray is started (Prefect only to load a
    credentials block)."""
    from pixelmill import pipeline
    from pixelmill.layout import PART_IMAGES, run_stamp
    from pixelmill.models import Job, not_images_line
    from pixelmill.spec import auto_runner

    source, dest = _checked(source, dest, runner, run_name, chunk_size, gcp_credentials_block,
                            part_size)
    job = Job(source=source, destination=dest, run=run_name or run_stamp(), spec=spec,
              gcp_credentials_block=gcp_credentials_block)
    if gcp_credentials_block:
        _prepare_prefect(verbose)
        from tasks.storage import destination_storage, source_storage

        storages = source_storage(job), destination_storage(job)
    else:
        storages = open_storage(source), open_storage(dest, destination=True)
    settle_heap()
    found = pipeline.survey(*storages, job, part_size or PART_IMAGES)
    to_make = found.to_make
    chunks, size = found.chunks(chunk_size, os.cpu_count() or 1)
    runner, why = _with_address(runner, ray_address)
    if runner == "auto":
        runner, reason = auto_runner(to_make)
        why = f"auto: {reason}"
    folder = dest.rstrip("/") + f"/{job.run}"
    out.print(f"dry run, nothing written: run folder {folder}"
              + ("" if run_name else " (this minute's; --run-name re-uses one)"),
              highlight=False)
    out.print(f"{found.discovered} images: {found.kept} kept (their outputs are there, made "
              f"from the same source version with the same settings), {to_make} to make, "
              f"{found.rejected} refused at discovery; {found.ignored} other files "
              "ignored", highlight=False)
    for image in found.first_rejected:
        out.print(f"  refused {image.source}: {image.error}", highlight=False)
    not_images = not_images_line(found.not_images)
    if not_images:
        out.print(f"  {not_images} (left alone)", highlight=False)
    if to_make:
        children = found.child_flow_runs
        parts = (f", the listing planned in {found.parts} parts of about "
                 f"{part_size or PART_IMAGES} images" + (
                     f" and made in {children} child flow runs" if children else
                     " and made in this flow run") if found.parts > 1 else "")
        out.print(f"would make {to_make} in {chunks} chunks of up to {size}{parts}, runner "
                  f"{runner} ({why})", highlight=False)
    return EXIT_OK


def _lost_api(api_url: str) -> str:
    return (f"lost the Prefect API at {api_url} during the run; what was written is kept. "
            "Bring the server back (`pixelmill server start` restarts pixelmill's own on the "
            "same port and database) and run the same command again to finish")


class _WithoutTraceback(logging.Formatter):
    """A console formatter's records in one line each: the traceback stays in the UI's logs
    and in `--verbose`."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


@contextlib.contextmanager
def _quiet_when_the_api_goes(verbose: bool):
    """While the flow runs, the console gets one line per log record (no tracebacks), and
    Prefect's events client does not warn at every failed reconnection when the API goes
    away: the command says what happened once, at the end. `--verbose` keeps everything."""
    if verbose:
        yield
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict
                                      .values() if isinstance(logger, logging.Logger))]
    consoles = {handler for logger in loggers for handler in logger.handlers
                if isinstance(handler, PrefectConsoleHandler)}
    formatters = {handler: handler.formatter for handler in consoles}
    for handler in consoles:
        handler.setFormatter(_WithoutTraceback(handler.formatter))
    events = logging.getLogger("prefect.events.clients")
    level = events.level
    events.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        events.setLevel(level)
        for handler, formatter in formatters.items():
            handler.setFormatter(formatter)


def _summary(report: RunReport, elapsed: float, why: str = "") -> None:
    counts = report.counts
    rate = counts.ok / report.duration_s if report.duration_s else 0.0
    gallery = (report.destination.rstrip("/") + f"/{report.run}/gallery/index.html")
    out.print(f"processed {counts.ok} ok, {counts.failed} failed, {counts.skipped} kept "
              f"of {counts.discovered} in {report.duration_s:.1f} s ({rate:.1f} images/s; "
              f"{elapsed:.1f} s with start-up)")
    if report.runner:
        out.print(f"runner: {report.runner.name} ({report.runner.reason or why})",
                  highlight=False)
    for image in report.failures[:10]:
        out.print(f"  [red]failed[/red] {image.source}: {image.error}", markup=True,
                  highlight=False)
    if report.counts.failed > 10:
        out.print(f"  ... and {report.counts.failed - 10} more in {report.images_file}")
    not_images = report.not_images_line()
    if not_images:
        out.print(f"{not_images} (left alone; manifest.json lists them)", highlight=False)
    out.print(f"gallery: {gallery}")


def _guard(command) -> None:
    try:
        code = command()
    except (UsageError, ImageError) as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    except Fail as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        if isinstance(exc, ApiLost):
            _end(exc.code)
        raise typer.Exit(exc.code) from None
    raise typer.Exit(code or EXIT_OK)


SizeOpt = Annotated[str, typer.Option("--size", help="WIDTHxHEIGHT in pixels")]
FitOpt = Annotated[str, typer.Option("--fit", help="contain | cover | fill")]


@app.command()
def run(
    source: Annotated[str, typer.Argument(help="folder or gs://bucket/prefix")],
    dest: Annotated[str, typer.Argument(help="folder or gs://bucket/prefix")],
    size: Annotated[Optional[list[str]], typer.Option(
        "--size", help="WIDTHxHEIGHT in pixels; repeatable: every size is made from one "
                       "decode, the first in resized/, each other in resized-WxH/ "
                       "(default 400x300)")] = None,
    fit: FitOpt = "contain",
    filter: Annotated[Optional[list[str]], typer.Option(
        "--filter", help=f"repeatable: {', '.join(FILTER_NAMES)} (radius as name:R); "
                         "applied to the first size in the first format")] = None,
    format: Annotated[Optional[list[str]], typer.Option(
        "--format", help="jpeg | png | webp | avif; repeatable: every size in every format "
                         "(default jpeg)")] = None,
    preset: Annotated[Optional[str], typer.Option(
        "--preset", help=f"named sizes and formats: {' | '.join(PRESETS)} (README); "
                         "--size/--format given replace the preset's")] = None,
    quality: Annotated[int, typer.Option("--quality")] = 85,
    upscale: Annotated[bool, typer.Option("--upscale", help="enlarge small images")] = False,
    keep_metadata: Annotated[bool, typer.Option(
        "--keep-metadata", help="keep capture date, camera and copyright in the outputs' "
                                "EXIF (never the GPS position); default: no EXIF")] = False,
    chunk_size: Annotated[Optional[int], typer.Option("--chunk-size")] = None,
    part_size: Annotated[Optional[int], typer.Option(
        "--part-size", help="a run of more images is run in parts of about this many, each "
                            "a child flow run (default 20000)")] = None,
    runner: Annotated[str, typer.Option(
        "--runner", help="auto (threads below 10,000 images to make, a process pool to "
        "200,000, Ray past that or with a cluster address) | ray | threads | processes | sequential")] = "auto",
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", envvar="RAY_ADDRESS",
        help="a Ray cluster; default: pixelmill's local one, kept running between runs; "
             "'local': a temporary one for this run")] = None,
    run_name: Annotated[Optional[str], typer.Option("--run-name")] = None,
    gcp_credentials_block: Annotated[Optional[str], typer.Option(
        "--gcp-credentials-block", help="a prefect-gcp GcpCredentials block; default: ADC")] = None,
    result_storage: Annotated[Optional[str], typer.Option(
        "--result-storage", help="persist chunk results in this block, e.g. gcs-bucket/NAME")] = None,
    shared_filesystem: Annotated[bool, typer.Option(
        "--shared-filesystem", help="local SOURCE/DEST are seen by every node of the Ray "
                                    "cluster (NFS, a mounted bucket)")] = False,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="list SOURCE and the run folder, print what a run would make, "
                          "keep and refuse; write nothing")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Resize (and filter) every image under SOURCE into DEST/<run>/ with a gallery.

    Outputs already in the run folder, made from the same source version with the same
    settings, are kept: running the same command again makes only what is missing."""
    def command() -> int:
        spec = _spec(size, fit, filter, format, quality, upscale, keep_metadata, preset)
        if dry_run:
            return plan_only(source, dest, spec, runner=runner, ray_address=ray_address,
                             run_name=run_name, chunk_size=chunk_size, verbose=verbose,
                             gcp_credentials_block=gcp_credentials_block, part_size=part_size)
        return execute(source, dest, spec, runner=runner, ray_address=ray_address,
                       run_name=run_name, chunk_size=chunk_size, verbose=verbose,
                       gcp_credentials_block=gcp_credentials_block,
                       result_storage=result_storage, shared_filesystem=shared_filesystem,
                       part_size=part_size)[0]
    _guard(command)


@app.command()
def demo(
    dest: Annotated[Path, typer.Argument(help="where the demo run goes")] = Path("pixelmill-demo"),
    runner: Annotated[str, typer.Option("--runner")] = "ray",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Make sample photos, run the whole pipeline on them, print the gallery path."""
    def command() -> int:
        from pixelmill.samples import write_demo_set

        samples = dest / "samples"
        if not samples.is_dir():
            count = len(write_demo_set(samples))
            console.print(f"made {count} sample photos in {samples}")
        spec = _spec("400x300", "contain", list(DEMO_FILTERS), "jpeg", 85)
        code, report = execute(str(samples), str(dest / "runs"), spec, runner=runner,
                               verbose=verbose,
                               why=None if runner != "ray" else
                               "the demo's default: each stage tagged with its resources")
        if report is not None:
            index = dest / "runs" / report.run / "gallery" / "index.html"
            out.print(f"open the gallery: file://{index.absolute()}")
        return code
    _guard(command)


@app.command()
def resize(
    input: Annotated[Path, typer.Argument(help="an image file")],
    output: Annotated[Path, typer.Argument(help="output file; its extension picks the format")],
    size: SizeOpt = "400x300",
    fit: FitOpt = "contain",
    quality: Annotated[int, typer.Option("--quality")] = 85,
) -> None:
    """Resize one image, no orchestration."""
    def command() -> int:
        from pixelmill.imageops import render_resized

        formats = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp",
                   ".avif": "avif"}
        fmt = formats.get(output.suffix.lower())
        if fmt is None:
            raise UsageError(f"OUTPUT {output}: end it in one of {', '.join(formats)}")
        spec = _spec(size, fit, [], fmt, quality)
        try:
            data = input.read_bytes()
        except OSError as exc:
            raise UsageError(f"INPUT {input}: {exc.strerror or exc}") from None
        try:
            rendered = render_resized(data, spec)
        except ImageError as exc:
            raise Fail(EXIT_IMAGES_FAILED, f"{input}: {exc}") from None
        output.parent.mkdir(parents=True, exist_ok=True)
        LocalStorage(output.parent.absolute()).write(output.name, rendered.data,
                                                     spec.content_type)
        out.print(f"{output}: {rendered.width}x{rendered.height}")
        return EXIT_OK
    _guard(command)


@app.command()
def check(
    storage: Annotated[str, typer.Option("--storage", help="a folder or gs:// URI")] = ".",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address",
                                                       envvar="RAY_ADDRESS")] = None,
) -> None:
    """Ray runs a remote task, the Prefect API answers, storage is reachable."""
    def command() -> int:
        problems = 0
        _prepare_prefect(verbose=False)
        out.print(f"[green]ok[/green] Prefect API answers ({os.environ['PREFECT_API_URL']})")
        import ray

        address, job_env = (ray_address, None) if ray_address else _local_ray()
        # Ray's own INFO lines ("Connecting to existing Ray cluster at ...") would repeat,
        # less precisely, what the line below says
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": job_env} if job_env else None)
        try:
            @ray.remote
            def where() -> str:
                import socket

                return socket.gethostname()

            host = ray.get(where.remote(), timeout=60)
            cpus = ray.cluster_resources().get("CPU", 0)
            out.print(f"[green]ok[/green] Ray ran a remote task on {host} ({cpus:g} CPUs)")
        finally:
            ray.shutdown()
        try:
            target = open_storage(storage)
            probe = f".pixelmill-check-{os.getpid()}"
            target.write(probe, b"ok", "text/plain")
            if isinstance(target, LocalStorage):
                (target.root / probe).unlink()
            out.print(f"[green]ok[/green] storage {target.uri} is writable")
        except OSError as exc:
            problems += 1
            out.print(f"[red]failed[/red] storage {storage}: {exc}")
        return EXIT_RUN_FAILED if problems else EXIT_OK
    _guard(command)


@app.command()
def gallery(
    run: Annotated[str, typer.Argument(help="a run folder, DEST/RUN: local or gs://")],
    port: Annotated[Optional[int], typer.Option("--port", help="default: any free port")] = None,
) -> None:
    """Serve a run's gallery on 127.0.0.1 and print its address (Ctrl-C stops it)."""
    import signal

    from cli.serve import make_server, open_run

    def command() -> int:
        storage, page = open_run(run)
        try:
            httpd = make_server(storage, port or 0)
        except OSError as exc:
            raise UsageError(f"--port {port}: {exc.strerror or exc}") from None
        out.print(f"gallery of {run}: http://127.0.0.1:{httpd.server_address[1]}/{page} "
                  "(Ctrl-C stops it)", highlight=False, soft_wrap=True)
        sys.stdout.flush()
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop it cleanly too
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            httpd.server_close()
        return EXIT_OK
    _guard(command)


@app.command("gcs-emulator")
def gcs_emulator(
    bucket: Annotated[Optional[list[str]], typer.Option("--bucket", help="create it (repeatable)")] = None,
    samples: Annotated[Optional[str], typer.Option(
        "--samples", help="upload the demo photos to this gs://bucket/prefix")] = None,
    port: Annotated[Optional[int], typer.Option("--port")] = None,
) -> None:
    """Run a local GCS emulator (fake-gcs-server) in the foreground, for trying gs:// paths."""
    import signal

    from cli.emulator import Emulator, export_line

    def command() -> int:
        with Emulator(port) as emulator:
            client = emulator.client()
            for name in bucket or []:
                client.create_bucket(name)
            if samples:
                from pixelmill.storage import split_uri
                from pixelmill.samples import write_demo_set

                name, prefix = split_uri(samples)
                target = client.bucket(name)
                with tempfile.TemporaryDirectory() as folder:
                    for path in write_demo_set(Path(folder)):
                        key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
                        content = "image/png" if path.suffix == ".png" else "image/jpeg"
                        target.blob(key.lstrip("/")).upload_from_filename(str(path), content_type=content)
                out.print(f"uploaded the demo photos to {samples}")
            out.print(f"GCS emulator on {emulator.url} (objects live in memory; Ctrl-C stops it)")
            out.print(export_line(emulator))
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop it cleanly too
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        return EXIT_OK
    _guard(command)


@server_app.command("status")
def server_status() -> None:
    """Show the local Prefect server (and Ray) pixelmill started, if running."""
    info = server.running()
    ray_info = localray.running()
    if ray_info is not None:
        out.print(f"ray: pid {ray_info.pid}, address {ray_info.address}, log {ray_info.log}")
        recipe = " ".join(f"{key}={shlex.quote(value)}"
                          for key, value in localray.join_env(ray_info).items())
        out.print("ray: only pixelmill uses it; another program joins it on purpose with "
                  f"these variables set (then a plain ray.init()):\n  export {recipe}",
                  highlight=False, markup=False)
    foreign = server.foreign_api_url(info)
    if foreign:
        out.print(f"PREFECT_API_URL points at {foreign}, a Prefect server not started by "
                  "pixelmill: runs from this shell use it", highlight=False, markup=False)
    host = warm.running(home())
    if host is not None:
        out.print(f"warm host: pid {host['pid']}, log {host['log']} (runs `pixelmill run` "
                  "and `demo` commands without loading Prefect each time)")
    if info is None:
        out.print("no pixelmill-started Prefect server is running")
        raise typer.Exit(1)
    out.print(f"running: pid {info.pid}, UI {info.ui_url}, API {info.url}, log {info.log}")


@server_app.command("start")
def server_start(
    ray: Annotated[bool, typer.Option("--ray/--no-ray", help="also the local Ray")] = True,
) -> None:
    """Start the local Prefect server and Ray now (runs start them on demand anyway).

    Prints shell lines: comments saying what runs, and the `export PREFECT_API_URL=...` that
    points `prefect` commands at the server, so `eval "$(pixelmill server start)"` sets it."""
    def command() -> int:
        try:
            info = server.ensure()
        except RuntimeError as exc:
            raise Fail(EXIT_RUN_FAILED, "could not start the Prefect server: "
                       f"{str(exc).splitlines()[0]}") from None
        warm.ensure_started(home())
        out.print(f"# pixelmill's Prefect server is running: pid {info.pid}, UI {info.ui_url}, "
                  f"API {info.url}", highlight=False, markup=False)
        if ray:
            try:
                ray_info, _ = localray.ensure()
            except RuntimeError as exc:
                raise Fail(EXIT_RUN_FAILED, "could not start a local Ray: "
                           f"{str(exc).splitlines()[0]}") from None
            out.print(f"# ray: pid {ray_info.pid}, address {ray_info.address}",
                      highlight=False, markup=False)
        out.print("# point prefect commands in this shell at it (or run "
                  "eval \"$(pixelmill server start)\"):", highlight=False, markup=False)
        out.print(f"export PREFECT_API_URL={shlex.quote(info.url)}", highlight=False,
                  markup=False)
        return EXIT_OK
    _guard(command)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local Prefect server and Ray pixelmill started."""
    host = warm.stop(home())
    if host:
        out.print(f"stopped the warm host pid {host['pid']}")
    ray_info = localray.stop()
    if ray_info:
        out.print(f"stopped ray pid {ray_info.pid}")
    info = server.stop()
    out.print(f"stopped pid {info.pid}" if info else "no pixelmill-started server was running")


def main(on_exit=None) -> None:
    """The `pixelmill` command. Once the command has finished and every exit handler has run
    (Prefect's log and event workers have sent what they hold), the process ends without
    tearing down its modules one by one: after a run that took ~0.4 s, which the user waited
    for with nothing left to do. `on_exit` is called with the exit status just before."""
    code: list[int] = [EXIT_OK]
    if on_exit is not None:
        _on_exit.append(on_exit)

    def leave() -> None:  # runs after every exit handler registered during the command
        logging.shutdown()  # registered at `import logging`, before this one: run it now
        _end(code[0])

    atexit.register(leave)
    try:
        app()
    except SystemExit as exc:
        code[0] = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        raise
    except BaseException:
        code[0] = 1
        raise


if __name__ == "__main__":
    main()
