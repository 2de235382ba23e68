"""Several renditions per image against one, in one invocation, on the same 6 MP corpus.

    .venv/bin/python bench/renditions.py [--images 400] [--runner threads]

Rows, each a whole `pixelmill run` (start-up included):
- `one`: the largest size in the first format, alone (1600x1200 JPEG): what any run of these
  renditions must decode anyway;
- `several`: 3 sizes x 2 formats (1600x1200, 400x300, 100x100; JPEG and WebP) in one run;
- `naive`: the same six renditions as six runs of one each (each decodes every source);
- `kernel`: the image work alone, outside pixelmill (`imageops.render_renditions` on one
  thread per core over the same sources held in memory; no storage, no Prefect), one
  rendition and the six: the ratio the image code itself sets, below which no pipeline can go.
Prints `several`, `naive` and the kernel's ratio against `one` (goal: several <= 1.8x).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PIXELMILL, make_corpus, run_watched, write_results  # noqa: E402
from cli import server  # noqa: E402

GOAL = 1.8
SIZES = ("1600x1200", "400x300", "100x100")
FORMATS = ("jpeg", "webp")


def run(source: Path, dest: Path, name: str, runner: str, sizes: tuple[str, ...],
        formats: tuple[str, ...]) -> dict:
    options = [*(f for size in sizes for f in ("--size", size)),
               *(f for fmt in formats for f in ("--format", fmt))]
    _, wall, _ = run_watched([PIXELMILL, "run", str(source), str(dest), *options,
                              "--runner", runner, "--run-name", name])
    report = json.loads((dest / name / "report.json").read_text())
    assert report["counts"]["ok"] == report["counts"]["discovered"], report["counts"]
    return {"wall_s": round(wall, 2), "flow_s": report["duration_s"],
            "renditions": len(sizes) * len(formats)}


def kernel(corpus: Path, sizes: tuple[str, ...], formats: tuple[str, ...],
           repeats: int = 3) -> float:
    """Seconds per image of the image work alone for these renditions, on one thread per
    core (the best of `repeats` passes over up to 100 sources read into memory first)."""
    from pixelmill.imageops import render_renditions
    from pixelmill.spec import PipelineSpec

    spec = PipelineSpec(sizes=list(sizes), formats=list(formats))
    sources = [path.read_bytes() for path in sorted(corpus.rglob("*.jpg"))[:100]]
    best = float("inf")
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(lambda data: render_renditions(data, spec, spec.renditions), sources))
            best = min(best, (time.perf_counter() - started) / len(sources))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--runner", default="threads")
    args = parser.parse_args()
    server.ensure_api()
    corpus = make_corpus(Path(tempfile.gettempdir()) /
                         f"pixelmill-corpus-{args.images}-3000x2000-q90",
                         args.images, 3000, 2000)
    with tempfile.TemporaryDirectory() as work:
        dest = Path(work)
        results = {"one": run(corpus, dest, "one", args.runner, SIZES[:1], FORMATS[:1])}
        print(f"one      {json.dumps(results['one'])}", flush=True)
        results["several"] = run(corpus, dest, "several", args.runner, SIZES, FORMATS)
        print(f"several  {json.dumps(results['several'])}", flush=True)
        naive = [run(corpus, dest, f"naive-{size}-{fmt}", args.runner, (size,), (fmt,))
                 for size in SIZES for fmt in FORMATS]
        results["naive"] = {"wall_s": round(sum(r["wall_s"] for r in naive), 2),
                            "flow_s": round(sum(r["flow_s"] for r in naive), 2),
                            "runs": naive}
        print(f"naive    {json.dumps({k: results['naive'][k] for k in ('wall_s', 'flow_s')})}",
              flush=True)
    # one after the other, twice, so that a slower minute of the machine falls on both
    passes = [(kernel(corpus, SIZES[:1], FORMATS[:1]), kernel(corpus, SIZES, FORMATS))
              for _ in range(2)]
    results["kernel"] = {"one_ms": round(min(p[0] for p in passes) * 1000, 1),
                         "several_ms": round(min(p[1] for p in passes) * 1000, 1)}
    print(f"kernel   {json.dumps(results['kernel'])}", flush=True)
    one = results["one"]["wall_s"]
    ratios = {name: round(results[name]["wall_s"] / one, 2) for name in ("several", "naive")}
    ratios["kernel"] = round(results["kernel"]["several_ms"] / results["kernel"]["one_ms"], 2)
    summary = {"images": args.images, "runner": args.runner, "cores": os.cpu_count(),
               "sizes": SIZES, "formats": FORMATS, **results, "ratios": ratios, "goal": GOAL}
    print(f"\n{args.images} camera JPEGs (3000x2000): one rendition (1600x1200 JPEG) "
          f"{one:.1f} s; 3 sizes x 2 formats from one decode "
          f"{results['several']['wall_s']:.1f} s ({ratios['several']:.2f}x, goal <= "
          f"{GOAL}x); the same six as six runs {results['naive']['wall_s']:.1f} s "
          f"({ratios['naive']:.2f}x); the image work alone, outside pixelmill: "
          f"{ratios['kernel']:.2f}x ({results['kernel']['one_ms']} ms and "
          f"{results['kernel']['several_ms']} ms per image on {os.cpu_count()} threads)")
    print(f"written to {write_results('renditions', summary)}")


if __name__ == "__main__":
    main()
