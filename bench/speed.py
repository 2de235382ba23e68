"""pixelmill against the kernel ceiling and the predecessors, on one corpus, in one run.

    .venv/bin/python bench/speed.py [--images 600] [--size 3000x2000] [--quality 90]

The job, for every row: a camera JPEG -> 400x300 -> blur -> both written as JPEG q85.
Rows: the kernel ceiling (pixelmill's own functions in a multiprocessing pool over all cores,
no Prefect, no Ray); the predecessors (full decode + LANCZOS one image at a time, and the
same split into one Ray task per core, on a Ray started for the run); pixelmill's real CLI
with its default runner (auto), with each runner named (threads, processes, ray on its
long-lived local Ray started before the rows as after a first run, ray with a temporary Ray
via --ray-address local, sequential); the rivals (Daft, Ray Data) when the `bench` extra is
installed. The ratios are the default runner's. Printed as a table and ratios; written to
bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import rivals  # noqa: E402
from bench.common import PIXELMILL, make_corpus, run_watched, warm_up, write_results  # noqa: E402

SPEC = {"size": (400, 300), "filters": ("blur",), "format": "jpeg", "quality": 85}
# Rows the ratios are built from: run --repeat times, the median (by seconds) is reported,
# because a shared 2-core machine moves single runs by 10-20 %.
REPEATED = {"ceiling", "pm-auto"}


def machine_cpu_s() -> float:
    """CPU seconds used by the whole machine so far (user + system, all processes)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


def ceiling_one(args: tuple[str, str]) -> None:
    """pixelmill's kernels for one image: read, shrink-on-load resize, filter, encode, write."""
    from pixelmill.imageops import render_filters, render_resized
    from pixelmill.spec import PipelineSpec

    source, out = args
    spec = PipelineSpec(**SPEC)
    rendered = render_resized(Path(source).read_bytes(), spec)
    name = Path(source).name
    (Path(out) / f"r-{name}").write_bytes(rendered.data)
    for folder, data in render_filters(rendered.image, spec).items():
        (Path(out) / f"{folder}-{name}").write_bytes(data)


def predecessor_one(source: str, out: str) -> None:
    """The predecessors' way (the sequential baseline): full decode, LANCZOS, filter, save."""
    from PIL import Image, ImageFilter

    with Image.open(source) as image:
        resized = image.convert("RGB").resize(SPEC["size"], Image.Resampling.LANCZOS)
    name = Path(source).name
    resized.save(Path(out) / f"r-{name}", "JPEG", quality=85)
    resized.filter(ImageFilter.BLUR).save(Path(out) / f"blur-{name}", "JPEG", quality=85)


def timed(label: str, images: int, function) -> dict:
    cpu, started = machine_cpu_s(), time.perf_counter()
    extra = function() or {}
    wall = time.perf_counter() - started
    row = {"row": label, "images": images, "seconds": round(wall, 2),
           "images_per_s": round(images / wall, 2), "cpu_s": round(machine_cpu_s() - cpu, 1),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
           **extra}
    print(f"  {label:28s} {row['seconds']:7.2f} s {row['images_per_s']:7.1f} img/s", flush=True)
    return row


def run_ceiling(files: list[Path], out: Path) -> dict:
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(ceiling_one, [(str(f), str(out)) for f in files], chunksize=4))
    return {}


def run_predecessor_sequential(files: list[Path], out: Path) -> dict:
    for path in files:
        predecessor_one(str(path), str(out))
    return {}


def run_predecessor_ray(files: list[Path], out: Path) -> dict:
    import ray

    started = time.perf_counter()
    # a Ray of its own for the run, as the predecessor started one each time
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    startup = time.perf_counter() - started

    @ray.remote
    def chunk(paths: list[str], target: str) -> int:
        for path in paths:
            predecessor_one(path, target)
        return len(paths)

    cores = int(ray.cluster_resources()["CPU"])
    parts = [[str(f) for f in files[n::cores]] for n in range(cores)]
    try:
        ray.get([chunk.remote(part, str(out)) for part in parts])
    finally:
        ray.shutdown()
    return {"startup_s": round(startup, 2)}


def _chunk_task_window(output: str) -> tuple[datetime, datetime]:
    """When the run's first chunk task started running and its last one finished, read from
    the Prefect API (the flow run's URL is in the command's output)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = re.search(r"/runs/flow-run/([0-9a-f-]{36})", output).group(1)
    task_runs, page = [], 200  # the API's largest page
    with get_client(sync_client=True) as client:
        while True:
            batch = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                limit=page, offset=len(task_runs))
            task_runs += batch
            if len(batch) < page:
                break
    chunks = [run for run in task_runs if run.name.startswith(("resize-chunk", "filter-chunk"))
              and run.start_time and run.end_time]
    return min(run.start_time for run in chunks), max(run.end_time for run in chunks)


def run_pixelmill(corpus: Path, out: Path, runner: str, *options: str,
                  job: tuple[str, ...] = ("--filter", "blur")) -> dict:
    """The real CLI; times from its report (chunk finish times) and from the Prefect API.

    start-up: command -> first finished chunk (as the issue defines it); work start: command ->
    first chunk task running; processing: work start -> last chunk finished, the window in
    which the workers do the images (steady rate = images / processing); teardown: last chunk
    -> command exit (gallery, flow end, disconnect)."""
    launched = datetime.now().astimezone()
    result, wall, peak = run_watched(
        [PIXELMILL, "run", str(corpus), str(out), "--size", "400x300", *job,
         "--runner", runner, "--run-name", "bench", *options])
    report = json.loads((out / "bench/report.json").read_text())
    flow_started = datetime.fromisoformat(report["started_at"])
    first_chunk = min(chunk["finished_s"] for chunk in report["chunks"])
    work_start, work_end = _chunk_task_window(result.stdout)
    processing = (work_end - work_start).total_seconds()
    return {"driver_peak_rss_mb": round(peak, 1), "flow_s": report["duration_s"],
            "before_flow_s": round((flow_started - launched).total_seconds(), 2),
            "startup_s": round((flow_started - launched).total_seconds() + first_chunk, 2),
            "work_start_s": round((work_start - launched).total_seconds(), 2),
            "processing_s": round(processing, 2),
            "steady_images_per_s": round(report["counts"]["ok"] / processing, 2),
            "teardown_s": round(wall - (work_end - launched).total_seconds(), 2),
            "chunks": len(report["chunks"]), "ok": report["counts"]["ok"],
            "warm_host": result.warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", default="3000x2000")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--rows", default="ceiling,pred-seq,pred-ray,pm-auto,pm-threads,"
                        "pm-processes,pm-ray,pm-ray-temp,pm-seq,pm-resize,daft,ray-data")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the rows the ratios compare; the median run is kept")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    corpus = make_corpus(Path(tempfile.gettempdir()) /
                         f"pixelmill-corpus-{args.images}-{args.size}-q{args.quality}",
                         args.images, width, height, args.quality)
    files = sorted(corpus.rglob("*.jpg"))
    from cli import localray

    warm = warm_up()  # a running server, warm host and Ray, as a user who runs pixelmill twice has
    if "pm-ray" in args.rows.split(","):
        localray.ensure()
    rows = {}
    wanted = args.rows.split(",")
    print(f"{len(files)} JPEGs {args.size} q{args.quality} -> 400x300 + blur, "
          f"{os.cpu_count()} cores")
    plan = {
        "ceiling": ("kernel ceiling (mp pool)", lambda out: run_ceiling(files, out)),
        "pred-seq": ("predecessor sequential", lambda out: run_predecessor_sequential(files, out)),
        "pred-ray": ("predecessor Ray chunks", lambda out: run_predecessor_ray(files, out)),
        "pm-ray": ("pixelmill --runner ray", lambda out: run_pixelmill(corpus, out, "ray")),
        "pm-ray-temp": ("pixelmill ray, temporary Ray",
                        lambda out: run_pixelmill(corpus, out, "ray", "--ray-address", "local")),
        "pm-threads": ("pixelmill --runner threads",
                       lambda out: run_pixelmill(corpus, out, "threads")),
        "pm-processes": ("pixelmill --runner processes",
                         lambda out: run_pixelmill(corpus, out, "processes")),
        "pm-auto": ("pixelmill (--runner auto)", lambda out: run_pixelmill(corpus, out, "auto")),
        # the rivals' job is resize only (JPEG -> 400x300 -> JPEG), so is pixelmill's row for it
        "pm-resize": ("pixelmill, resize only", lambda out: run_pixelmill(corpus, out, "auto",
                                                                          job=())),
        "daft": ("Daft 0.7.26 native, resize only", lambda out: rivals.run_daft(files, out)),
        "ray-data": ("Ray Data, resize only", lambda out: rivals.run_ray_data(files, out)),
        "pm-seq": ("pixelmill --runner sequential",
                   lambda out: run_pixelmill(corpus, out, "sequential")),
    }
    # Every row's output stays until the last row is done. On a disk whose file system keeps
    # no journal (this machine's), ext4 will not reuse an inode freed in the last minutes and
    # walks past every such one for each new file: deleting a row's outputs would slow the
    # file creation of the rows after it (measured: ~30 us -> ~300 us a file).
    outputs = Path(tempfile.mkdtemp(prefix="pixelmill-bench-"))
    try:
        for key in wanted:
            label, function = plan[key]
            runs = []
            for number in range(args.repeat if key in REPEATED else 1):
                out = outputs / f"{key}-{number}"
                out.mkdir()
                runs.append(timed(label, len(files), lambda: function(out)))
            runs.sort(key=lambda row: row["seconds"])
            rows[key] = {**runs[len(runs) // 2], "runs_s": [row["seconds"] for row in runs]}
    finally:
        shutil.rmtree(outputs, ignore_errors=True)
    ratios = {}
    # the ratios are those of the command as a user runs it (the default runner, auto), or
    # of --runner ray when only that row ran
    main_row = next((key for key in ("pm-auto", "pm-ray") if key in rows), None)
    if main_row:
        ratios["row"] = main_row
        pm = rows[main_row]
        if "ceiling" in rows:
            ceiling = rows["ceiling"]
            ratios["steady/ceiling"] = round(pm["steady_images_per_s"] / ceiling["images_per_s"], 2)
            # orchestration overhead: time the workers spend on the images beyond what the
            # ceiling needs for them, as a share of the whole run (start-up and teardown apart)
            overhead = pm["processing_s"] - ceiling["seconds"]
            ratios["overhead_share"] = round(overhead / pm["seconds"], 3)
        for key in ("pred-seq", "pred-ray"):
            if key in rows:
                base = rows[key]["images_per_s"]
                ratios[f"steady/{key}"] = round(pm["steady_images_per_s"] / base, 2)
                ratios[f"pixelmill/{key}"] = round(pm["images_per_s"] / base, 2)
        if "pm-resize" in rows:  # end to end against the rivals, on their job
            for key in ("daft", "ray-data"):
                if key in rows:
                    ratios[f"pixelmill/{key}"] = round(
                        rows[key]["seconds"] / rows["pm-resize"]["seconds"], 2)
        if "ceiling" in rows:  # every runner's steady state and overhead, same ceiling
            for key, row in rows.items():
                if key.startswith("pm-") and key not in ("pm-resize", main_row):
                    ratios[f"steady/ceiling {key}"] = round(
                        row["steady_images_per_s"] / rows["ceiling"]["images_per_s"], 2)
                    ratios[f"overhead_share {key}"] = round(
                        (row["processing_s"] - rows["ceiling"]["seconds"]) / row["seconds"], 3)
        ratios["startup_s"] = pm["startup_s"]
        ratios["work_start_s"] = pm["work_start_s"]
        ratios["teardown_s"] = pm["teardown_s"]
    print("\n| row | s | images/s | machine CPU s | peak MB |\n|---|---|---|---|---|")
    for row in rows.values():
        peak = row.get("driver_peak_rss_mb", row["peak_rss_mb"])
        print(f"| {row['row']} | {row['seconds']} | {row['images_per_s']} | {row['cpu_s']} | "
              f"{peak} |")
    print("\n" + "  ".join(f"{k}={v}" for k, v in ratios.items()))
    result = {"images": len(files), "corpus": f"{args.size} q{args.quality}",
              "cores": os.cpu_count(), "warm_host": warm, "rows": rows, "ratios": ratios}
    path = Path(args.out) if args.out else write_results("speed", result)
    if args.out:
        path.write_text(json.dumps(result, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
