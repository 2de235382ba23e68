"""Inputs: pixelmill over Pillow's own test images (the `Tests/images` folder of the installed
Pillow's source archive, fetched from the package registry: ~1,060 files in every format
Pillow reads, damaged files and fuzzers' crashers among them).

    .venv/bin/python bench/inputs.py

Prints what was made, what failed (the most common reasons), what was left alone as not an
image (by extension) and the wall time; checks that nothing crashed or hung, that no reason
shows a Python object and that the BigTIFF is read.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PIXELMILL, write_results  # noqa: E402
from cli import server  # noqa: E402

TIMEOUT_S = 600


def pillow_test_images() -> Path:
    """Pillow's Tests/images for the installed version, downloaded once into the temp dir."""
    from PIL import __version__

    root = Path(tempfile.gettempdir()) / f"pixelmill-pillow-{__version__}"
    images = root / f"pillow-{__version__}" / "Tests" / "images"
    if images.is_dir():
        return images
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--no-binary", ":all:", f"pillow=={__version__}", "-d", str(root)],
                   check=True)
    with tarfile.open(root / f"pillow-{__version__}.tar.gz") as archive:
        members = [m for m in archive.getmembers() if "/Tests/images/" in m.name]
        archive.extractall(root, members=members, filter="data")
    return images


def main() -> None:
    images = pillow_test_images()
    files = sum(1 for path in images.rglob("*") if path.is_file())
    server.ensure_api()
    with tempfile.TemporaryDirectory() as dest:
        started = time.perf_counter()
        # exit 1 is expected: some of these files are damaged on purpose
        result = subprocess.run([PIXELMILL, "run", str(images), dest, "--size", "200x200",
                                 "--run-name", "t"], capture_output=True, text=True,
                                timeout=TIMEOUT_S)
        wall = time.perf_counter() - started
        if result.returncode not in (0, 1):
            raise SystemExit(f"pixelmill run ended {result.returncode}:\n{result.stdout[-3000:]}"
                             f"{result.stderr[-3000:]}")
        report = json.loads((Path(dest) / "t/report.json").read_text())
        records = [json.loads(line) for line in (Path(dest) / "t/images.jsonl").open()]
    reasons = Counter(re.sub(r"\d+", "N", record["error"])[:80]
                      for record in records if record["status"] == "failed")
    objects = [record for record in records if "object at 0x" in (record.get("error") or "")]
    bigtiff = [record["status"] for record in records if record["source"] == "hopper_bigtiff.tif"]
    summary = {"files": files, "wall_s": round(wall, 1),
               "counts": report["counts"], "not_images": report["not_images"],
               "reasons": dict(reasons.most_common(10)),
               "reasons_with_a_python_object": len(objects), "bigtiff": bigtiff}
    print(json.dumps(summary, indent=2))
    print(f"\n{files} files: {report['counts']['ok']} made, {report['counts']['failed']} failed "
          f"with a reason, {report['not_images']['total']} not images, in {wall:.1f} s; "
          f"reasons showing a Python object: {len(objects)}; BigTIFF: {bigtiff}")
    print(f"written to {write_results('inputs', summary)}")


if __name__ == "__main__":
    main()
