"""The same run local->local and gcs->gcs (fake-gcs-server), printed as a ratio.

    .venv/bin/python bench/gcs_vs_local.py [--images 200] [--repeat 2]

Goal (GCS issue): GCS within 1.3x of local, with I/O overlapped with decoding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import make_corpus, run_cli, write_results  # noqa: E402
from cli import server  # noqa: E402
from cli.emulator import Emulator  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="1600x1200", help="corpus image size")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--runner", default="ray")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    work = Path(tempfile.mkdtemp(prefix="pixelmill-bench-"))
    corpus = make_corpus(Path(tempfile.gettempdir()) / f"pixelmill-corpus-{args.images}-{args.size}",
                         args.images, width, height)
    server.ensure_api()
    common = ["--size", "400x300", "--filter", "blur", "--runner", args.runner]
    timings: dict[str, list[dict]] = {"local": [], "gcs": []}
    with Emulator() as emulator:
        client = emulator.client()
        client.create_bucket("bench-in")
        client.create_bucket("bench-out")
        bucket = client.bucket("bench-in")
        files = sorted(p for p in corpus.rglob("*.jpg"))
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda p: bucket.blob(f"in/{p.relative_to(corpus).as_posix()}")
                          .upload_from_filename(str(p), content_type="image/jpeg"), files))
        gcs_env = {"STORAGE_EMULATOR_HOST": emulator.url}
        for attempt in range(args.repeat):
            for kind in ("local", "gcs"):
                name = f"{kind}-{attempt}"
                if kind == "local":
                    result = run_cli(str(corpus), str(work / "out"), *common, "--run-name", name)
                else:
                    result = run_cli("gs://bench-in/in/", "gs://bench-out/out/", *common,
                                     "--run-name", name, env=gcs_env)
                report_line = [line for line in result["stdout"].splitlines()
                               if line.startswith("processed")][0]
                result["flow_s"] = float(report_line.split(" in ")[1].split(" s")[0])
                del result["stdout"]
                timings[kind].append(result)
                print(f"{name:8s} flow {result['flow_s']:6.2f} s  wall {result['wall_s']:6.2f} s",
                      flush=True)
    local = statistics.median(r["flow_s"] for r in timings["local"])
    gcs = statistics.median(r["flow_s"] for r in timings["gcs"])
    summary = {"images": args.images, "corpus": args.size, "runner": args.runner,
               "cores": os.cpu_count(), "local_flow_s": local, "gcs_flow_s": gcs,
               "ratio_gcs_over_local": gcs / local, "goal": 1.3, "runs": timings}
    print(f"\n{args.images} images, {args.size} -> 400x300 + blur, runner {args.runner}, "
          f"{os.cpu_count()} cores")
    print(f"local->local {local:6.2f} s ({args.images / local:5.1f} img/s)")
    print(f"gcs->gcs     {gcs:6.2f} s ({args.images / gcs:5.1f} img/s)")
    print(f"ratio gcs/local = {gcs / local:.2f}x (goal <= 1.3x)")
    print(f"written to {write_results('gcs_vs_local', summary)}")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}))


if __name__ == "__main__":
    main()
