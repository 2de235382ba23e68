"""pixelmill against the kernel ceiling and the predecessors, on one corpus, in one run.

    .venv/bin/python bench/speed.py [--images 600] [--size 3000x2000] [--quality 90]

The job, for every row: a camera JPEG -> 400x300 -> blur -> both written as JPEG q85.
Rows: the kernel ceiling (pixelmill's own functions in a multiprocessing pool over all cores,
no Prefect, no Ray); the predecessors (full decode + LANCZOS one image at a time, and the
same split into one Ray task per core, on a Ray started for the run); pixelmill's real CLI
with --runner ray on its long-lived local Ray (started before the rows, as after a first
run), the same with a temporary Ray (--ray-address local), and --runner sequential.
Printed as a table and ratios; written to bench/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PIXELMILL, make_corpus, run_watched, write_results  # noqa: E402

SPEC = {"size": (400, 300), "filters": ("blur",), "format": "jpeg", "quality": 85}
# Rows the ratios are built from: run --repeat times, the median (by seconds) is reported,
# because a shared 2-core machine moves single runs by 10-20 %.
REPEATED = {"ceiling", "pm-ray"}


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
    """The predecessors' way (Lattice's sequential row): full decode, LANCZOS, filter, save."""
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


def run_pixelmill(corpus: Path, out: Path, runner: str, *options: str) -> dict:
    from datetime import datetime

    launched = datetime.now().astimezone()
    _, wall, peak = run_watched(
        [PIXELMILL, "run", str(corpus), str(out), "--size", "400x300", "--filter", "blur",
         "--runner", runner, "--run-name", "bench", *options])
    report = json.loads((out / "bench/report.json").read_text())
    chunks = sorted(report["chunks"], key=lambda chunk: chunk["finished_s"])
    finished = [chunk["finished_s"] for chunk in chunks]
    flow_s = report["duration_s"]
    to_flow = (datetime.fromisoformat(report["started_at"]) - launched).total_seconds()
    startup = to_flow + finished[0]  # command start -> first finished chunk
    teardown = wall - to_flow - flow_s  # flow end -> command exit (Ray shutdown, flush)
    # Steady state: after the first wave (one chunk per core) until the last chunk.
    wave = min(os.cpu_count() or 1, len(chunks)) - 1
    later = sum(chunk["images"] for chunk in chunks[wave + 1:])
    span = finished[-1] - finished[wave]
    steady = later / span if later and span > 0 else None
    return {"driver_peak_rss_mb": round(peak, 1), "flow_s": flow_s,
            "startup_s": round(startup, 2), "before_flow_s": round(to_flow, 2),
            "teardown_s": round(teardown, 2), "steady_images_per_s": steady and round(steady, 2),
            "chunks": len(finished), "ok": report["counts"]["ok"],
            "first_chunk_images": chunks[0]["images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--size", default="3000x2000")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--rows", default="ceiling,pred-seq,pred-ray,pm-ray,pm-ray-temp,pm-seq")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs of the rows the ratios compare; the median run is kept")
    parser.add_argument("--out", default=None, help="JSON path (default bench/results)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    corpus = make_corpus(Path(tempfile.gettempdir()) /
                         f"pixelmill-corpus-{args.images}-{args.size}-q{args.quality}",
                         args.images, width, height, args.quality)
    files = sorted(corpus.rglob("*.jpg"))
    from pixelmill import localray, server

    server.ensure_api()  # a running server and Ray, as a user who runs pixelmill twice has
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
        "pm-seq": ("pixelmill --runner sequential",
                   lambda out: run_pixelmill(corpus, out, "sequential")),
    }
    for key in wanted:
        label, function = plan[key]
        runs = []
        for _ in range(args.repeat if key in REPEATED else 1):
            out = Path(tempfile.mkdtemp(prefix=f"pixelmill-bench-{key}-"))
            try:
                runs.append(timed(label, len(files), lambda: function(out)))
            finally:
                shutil.rmtree(out, ignore_errors=True)
        runs.sort(key=lambda row: row["seconds"])
        rows[key] = {**runs[len(runs) // 2], "runs_s": [row["seconds"] for row in runs]}
    ratios = {}
    if "pm-ray" in rows:
        pm = rows["pm-ray"]
        steady = pm.get("steady_images_per_s") or pm["images_per_s"]
        for key, name in (("ceiling", "steady/ceiling"), ("pred-seq", "pixelmill/pred-seq"),
                          ("pred-ray", "pixelmill/pred-ray")):
            if key in rows:
                base = rows[key]["images_per_s"]
                ratios[name] = round((steady if key == "ceiling" else pm["images_per_s"]) / base, 2)
        if "ceiling" in rows:
            # orchestration overhead: pixelmill's time after its first chunk (start-up) and
            # before its exit (teardown), minus what the ceiling needs for the same images
            remaining = 1 - pm["first_chunk_images"] / pm["ok"]
            overhead = (pm["seconds"] - pm["startup_s"] - pm["teardown_s"]
                        - rows["ceiling"]["seconds"] * remaining)
            ratios["overhead_share"] = round(max(overhead, 0) / pm["seconds"], 3)
        ratios["startup_s"] = pm["startup_s"]
    print("\n| row | s | images/s | machine CPU s | peak MB |\n|---|---|---|---|---|")
    for row in rows.values():
        peak = row.get("driver_peak_rss_mb", row["peak_rss_mb"])
        print(f"| {row['row']} | {row['seconds']} | {row['images_per_s']} | {row['cpu_s']} | "
              f"{peak} |")
    print("\n" + "  ".join(f"{k}={v}" for k, v in ratios.items()))
    result = {"images": len(files), "corpus": f"{args.size} q{args.quality}",
              "cores": os.cpu_count(), "rows": rows, "ratios": ratios}
    path = Path(args.out) if args.out else write_results("speed", result)
    if args.out:
        path.write_text(json.dumps(result, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
