"""Re-runs against a first run, in one invocation: the same command again with nothing new,
and again after 1 % new images spread over every folder.

    .venv/bin/python bench/rerun.py [--images 20000] [--folders 100] [--runner auto]

Prints the wall time of each command (what a user waits for, start-up included), the images
each one made, and the two ratios against the first run (goal: <= 0.10 each).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PIXELMILL, make_corpus, run_watched, warm_up, write_results  # noqa: E402
from cli import localray  # noqa: E402

GOAL = 0.10


def run(source: Path, dest: Path, runner: str) -> dict:
    result, wall, peak = run_watched([PIXELMILL, "run", str(source), str(dest), "--size", "100x100",
                                 "--runner", runner, "--run-name", "nightly"])
    report = json.loads((dest / "nightly/report.json").read_text())
    return {"wall_s": round(wall, 2), "flow_s": report["duration_s"],
            "made": report["counts"]["ok"], "kept": report["counts"]["skipped"],
            "failed": report["counts"]["failed"], "chunks": len(report["chunks"]),
            "driver_peak_rss_mb": round(peak, 1), "warm_host": result.warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--folders", type=int, default=100)
    parser.add_argument("--runner", default="auto")
    args = parser.parse_args()
    warm_up()
    if args.runner == "ray":
        localray.ensure()  # warm, as between nightly runs: start-up is not what is compared
    corpus = make_corpus(Path(tempfile.gettempdir()) /
                         f"pixelmill-corpus-{args.images}-{args.folders}-320x240",
                         args.images, 320, 240, folders=args.folders)
    added = max(1, args.images // 100)
    with tempfile.TemporaryDirectory() as work:
        source, dest = Path(work) / "src", Path(work) / "dst"
        # a copy of the corpus (hard links) that can grow without touching the cached one
        subprocess.run(["cp", "-al", str(corpus), str(source)], check=True)
        results = {"first": run(source, dest, args.runner)}
        print(f"first     {json.dumps(results['first'])}", flush=True)
        results["nothing_new"] = run(source, dest, args.runner)
        print(f"again     {json.dumps(results['nothing_new'])}", flush=True)
        make_corpus(source, added, 320, 240, folders=args.folders, prefix="new",
                    start=args.images)
        results["one_percent_new"] = run(source, dest, args.runner)
        print(f"+{added:<8d} {json.dumps(results['one_percent_new'])}", flush=True)
        shutil.rmtree(dest)
    first = results["first"]["wall_s"]
    ratios = {name: round(results[name]["wall_s"] / first, 3)
              for name in ("nothing_new", "one_percent_new")}
    summary = {"images": args.images, "folders": args.folders, "added": added,
               "runner": args.runner, "cores": os.cpu_count(), **results,
               "ratios": ratios,
               "goal": GOAL}
    print(f"\nfirst run {first:.1f} s for {args.images} images; the same command again "
          f"{results['nothing_new']['wall_s']:.1f} s ({ratios['nothing_new']:.3f}x, made "
          f"{results['nothing_new']['made']}); after {added} new images "
          f"{results['one_percent_new']['wall_s']:.1f} s ({ratios['one_percent_new']:.3f}x, "
          f"made {results['one_percent_new']['made']}); goal <= {GOAL:.2f}x each; "
          f"{sum(r['warm_host'] for r in results.values())} of 3 commands through the warm "
          "host")
    print(f"written to {write_results('rerun', summary)}")


if __name__ == "__main__":
    main()
