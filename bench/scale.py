"""Scale: a big run end to end, a dry run over a million listed objects, and the object reads
discovery makes in a bucket, in one invocation.

    .venv/bin/python bench/scale.py [--images 200000] [--listed 1000000] [--objects 10000]
                                    [--skip run,dry,reads]

- run: `--images` small JPEGs (160x120, 100 folders) -> 64x64: images/s against the kernel
  ceiling at the same image size (pixelmill's kernels in a process pool over every core, on a
  sample; goal >= 0.8x), the driver's peak RSS, the task runs of each flow run (goal <= 300),
  the flow runs (a parent and its parts) and the largest gallery page.
- dry: `pixelmill run --dry-run` over `--listed` one-byte .jpg files (a dry run reads no
  pixels): seconds and the driver's peak RSS (goal <= 500 MB).
- reads: `--objects` objects in the GCS emulator, 1 % of them JPEGs without an extension:
  the objects discovery reads (goal: only those 1 %).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PIXELMILL, make_corpus, run_watched, write_results  # noqa: E402
from cli import server  # noqa: E402

SIZE = (64, 64)
CEILING_SAMPLE = 10_000


def ceiling_one(args: tuple[str, str]) -> None:
    from pixelmill.imageops import render_resized
    from pixelmill.spec import PipelineSpec

    source, out = args
    rendered = render_resized(Path(source).read_bytes(), PipelineSpec(size=SIZE))
    (Path(out) / Path(source).name).write_bytes(rendered.data)


def ceiling(corpus: Path, out: str) -> float:
    """Images/s of the kernels alone on a sample, written to `out`. The caller deletes `out`
    only after the run it compares with: on a file system without a journal (this
    machine's), ext4 walks past every inode freed in the last minutes for each new file, so
    deleting the sample's outputs first would slow the run's file creation, not the
    ceiling's."""
    files = sorted(corpus.rglob("*.jpg"))
    sample = random.Random(1).sample(files, min(CEILING_SAMPLE, len(files)))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        started = time.perf_counter()
        list(pool.map(ceiling_one, [(str(f), out) for f in sample], chunksize=64))
        return len(sample) / (time.perf_counter() - started)


def task_runs_per_flow_run(since: datetime) -> dict[str, int]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter, FlowRunFilterId, FlowRunFilterStartTime,
    )

    counts: dict[str, int] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            start_time=FlowRunFilterStartTime(after_=since)), limit=200)
        for run in runs:
            offset, total = 0, 0
            while True:
                page = client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])),
                    limit=200, offset=offset)
                total += len(page)
                offset += len(page)
                if len(page) < 200:
                    break
            counts[run.name] = total
    return counts


def bench_run(images: int) -> dict:
    corpus = make_corpus(Path(tempfile.gettempdir()) / f"pixelmill-corpus-{images}-100-160x120",
                         images, 160, 120, folders=100)
    print(f"corpus of {images} images ready; kernel ceiling on a sample...", flush=True)
    with tempfile.TemporaryDirectory() as sample_out, tempfile.TemporaryDirectory() as dest:
        top = ceiling(corpus, sample_out)
        print(f"ceiling {top:.0f} images/s", flush=True)
        since = datetime.now(timezone.utc)
        result, wall, peak = run_watched([PIXELMILL, "run", str(corpus), dest, "--size",
                                          f"{SIZE[0]}x{SIZE[1]}", "--run-name", "scale"])
        report = json.loads((Path(dest) / "scale/report.json").read_text())
        pages = sorted((Path(dest) / "scale/gallery").glob("*.html"))
        largest = max(pages, key=lambda page: page.stat().st_size)
        runs = task_runs_per_flow_run(since)
        rate = report["counts"]["ok"] / report["duration_s"]
        return {"images": images, "made": report["counts"]["ok"],
                "failed": report["counts"]["failed"], "wall_s": round(wall, 1),
                "flow_s": report["duration_s"], "images_per_s": round(rate, 1),
                "ceiling_images_per_s": round(top, 1), "vs_ceiling": round(rate / top, 2),
                "wall_vs_ceiling": round(images / wall / top, 2),
                "driver_peak_rss_mb": round(peak, 1), "flow_runs": len(runs),
                "most_task_runs_in_a_flow_run": max(runs.values()),
                "gallery_pages": len(pages), "largest_page": largest.name,
                "largest_page_kb": round(largest.stat().st_size / 1024, 1),
                "summary": result.stdout.strip().splitlines()[-3:]}


def bench_dry(listed: int) -> dict:
    root = Path(tempfile.gettempdir()) / f"pixelmill-listed-{listed}"
    stamp = root.parent / f"{root.name}.made"  # beside it: the dry run lists the folder
    if not stamp.exists():
        for folder in range(-(-listed // 1000)):
            path = root / f"d{folder:04d}"
            path.mkdir(parents=True, exist_ok=True)
            for number in range(min(1000, listed - folder * 1000)):
                (path / f"img{number:04d}.jpg").write_bytes(b"x")
        stamp.write_text("")
    with tempfile.TemporaryDirectory() as dest:
        result, wall, peak = run_watched([PIXELMILL, "run", str(root), dest, "--run-name", "d",
                                          "--dry-run"])
    return {"listed": listed, "wall_s": round(wall, 1), "driver_peak_rss_mb": round(peak, 1),
            "printed": result.stdout.strip().splitlines()}


def bench_reads(objects: int) -> dict:
    from pixelmill import pipeline
    from cli.emulator import Emulator
    from pixelmill.gcs import GcsStorage, default_client
    from pixelmill.models import Job
    from pixelmill.samples import jpeg_bytes, photo

    bare = max(1, objects // 100)
    jpeg = jpeg_bytes(photo(32, 24, seed=1))
    with Emulator() as emulator:
        os.environ["STORAGE_EMULATOR_HOST"] = emulator.url
        client = default_client(emulator.url)
        bucket = client.create_bucket("scale")

        def upload(number: int) -> None:
            name = f"in/f{number % 50:02d}/o{number:06d}" + ("" if number < bare else ".jpg")
            bucket.blob(name).upload_from_string(jpeg, content_type="application/octet-stream")

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(upload, range(objects)))
        reads: list[str] = []

        class Counting(GcsStorage):
            def read_head(self, key: str, length: int) -> bytes:
                reads.append(key)
                return super().read_head(key, length)

            def read(self, key: str) -> bytes:
                reads.append(key)
                return super().read(key)

        source = Counting("gs://scale/in", client=client)
        destination = GcsStorage("gs://scale/out", client=client)
        job = Job(source=source.uri, destination=destination.uri, run="r")
        started = time.perf_counter()
        found = pipeline.survey(source, destination, job)
        seconds = time.perf_counter() - started
    return {"objects": objects, "without_extension": bare, "discovered": found.discovered,
            "object_reads": len(reads), "seconds": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--listed", type=int, default=1_000_000)
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--skip", default="", help="comma-separated: run, dry, reads")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, dict] = {"cores": {"count": os.cpu_count()}}
    if "reads" not in skip:
        results["reads"] = bench_reads(args.objects)
        print(f"reads {json.dumps(results['reads'])}", flush=True)
    if "dry" not in skip:
        results["dry"] = bench_dry(args.listed)
        print(f"dry   {json.dumps(results['dry'])}", flush=True)
    if "run" not in skip:
        server.ensure_api()
        results["run"] = bench_run(args.images)
        print(f"run   {json.dumps(results['run'])}", flush=True)
    print()
    if "reads" in results:
        r = results["reads"]
        print(f"discovery read {r['object_reads']} of {r['objects']} objects "
              f"({r['without_extension']} have no image extension; goal: only those)")
    if "dry" in results:
        d = results["dry"]
        print(f"dry run over {d['listed']} listed objects: {d['wall_s']} s, driver peak "
              f"{d['driver_peak_rss_mb']:.0f} MB (goal <= 500 MB)")
    if "run" in results:
        r = results["run"]
        print(f"{r['images']} images: {r['images_per_s']} images/s in the flow, "
              f"{r['vs_ceiling']}x the kernel ceiling of {r['ceiling_images_per_s']} "
              f"(goal >= 0.8x; {r['wall_vs_ceiling']}x counting start-up); driver peak "
              f"{r['driver_peak_rss_mb']:.0f} MB; {r['flow_runs']} flow runs, at most "
              f"{r['most_task_runs_in_a_flow_run']} task runs in one (goal <= 300); "
              f"{r['gallery_pages']} gallery pages, the largest {r['largest_page_kb']} kB")
    print(f"written to {write_results('scale', results)}")


if __name__ == "__main__":
    main()
