"""Driver memory under load: 5,000 small images against 200, in one invocation.

    .venv/bin/python bench/memory.py [--small 200] [--large 5000] [--runner ray]

Prints the driver's peak RSS (VmHWM of the `pixelmill run` process) for both runs, the ratio
(goal: <= 1.25x), and the number of task runs of the large flow run (goal: a few hundred).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PIXELMILL, make_corpus, run_watched, write_results  # noqa: E402
from cli import server  # noqa: E402


def run(source: Path, dest: Path, runner: str) -> dict:
    _, wall, peak = run_watched([PIXELMILL, "run", str(source), str(dest), "--size", "64x64",
                                 "--filter", "blur", "--runner", runner, "--run-name", "m"])
    report = json.loads((dest / "m/report.json").read_text())
    return {"images": report["counts"]["ok"], "wall_s": round(wall, 2),
            "flow_s": report["duration_s"], "driver_peak_rss_mb": round(peak, 1),
            "chunks": len(report["chunks"]),
            "task_runs": 2 + len(report["chunks"]) * 2 + 1}  # discover, chunks x2, gallery


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=5000)
    parser.add_argument("--runner", default="ray")
    args = parser.parse_args()
    server.ensure_api()
    results = {}
    for label, count in (("small", args.small), ("large", args.large)):
        corpus = make_corpus(Path(tempfile.gettempdir()) / f"pixelmill-corpus-{count}-160x120",
                             count, 160, 120)
        with tempfile.TemporaryDirectory() as dest:
            results[label] = run(corpus, Path(dest), args.runner)
        print(f"{label:5s} {json.dumps(results[label])}", flush=True)
    ratio = results["large"]["driver_peak_rss_mb"] / results["small"]["driver_peak_rss_mb"]
    summary = {"runner": args.runner, "cores": os.cpu_count(), **results,
               "driver_peak_ratio": round(ratio, 3), "goal": 1.25}
    print(f"\ndriver peak RSS: {results['small']['driver_peak_rss_mb']:.0f} MB for "
          f"{args.small} images, {results['large']['driver_peak_rss_mb']:.0f} MB for "
          f"{args.large}: ratio {ratio:.2f}x (goal <= 1.25x); "
          f"{results['large']['task_runs']} task runs in the large flow run")
    print(f"written to {write_results('memory', summary)}")


if __name__ == "__main__":
    main()
