"""Shared pieces of the benchmarks: corpus generation, services, running the real CLI."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIXELMILL = str(Path(sys.executable).with_name("pixelmill"))


def _one(args: tuple[Path, int, int, int, int, int, str]) -> None:
    from pixelmill.samples import jpeg_bytes, photo

    folder, number, width, height, quality, folders, prefix = args
    path = folder / f"set{number % folders}" / f"{prefix}-{number:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(photo(width, height, seed=number), quality=quality))


def make_corpus(folder: Path, count: int, width: int, height: int, quality: int = 90,
                folders: int = 10, prefix: str = "img", start: int = 0) -> Path:
    """`count` photo-like JPEGs spread over `folders` sub-folders; reused when already there."""
    stamp = folder / f".corpus-{prefix}.json"
    wanted = {"count": count, "width": width, "height": height, "quality": quality,
              "folders": folders, "start": start}
    if stamp.exists() and json.loads(stamp.read_text()) == wanted:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor() as pool:
        list(pool.map(_one, [(folder, n, width, height, quality, folders, prefix)
                             for n in range(start, start + count)], chunksize=8))
    stamp.write_text(json.dumps(wanted))
    return folder


def run_cli(*args: str, env: dict[str, str] | None = None) -> dict:
    """Run `pixelmill run ...`; returns wall seconds, CPU seconds of children, and the report."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run([PIXELMILL, "run", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode not in (0, 1):
        raise RuntimeError(f"pixelmill run failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "peak_rss_mb": after.ru_maxrss / 1024, "stdout": result.stdout}


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), in MB; 0 once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    line = next((l for l in status.splitlines() if l.startswith("VmHWM:")), "VmHWM: 0 kB")
    return int(line.split()[1]) / 1024


def warm_up() -> bool:
    """pixelmill's Prefect server and warm host up and ready, as between a user's commands
    (a bench compares runs, not services starting); True when commands go through the warm
    host (PIXELMILL_WARM=0: never)."""
    from cli import server, warm
    from pixelmill.home import home

    server.ensure_api()
    if os.environ.get("PIXELMILL_WARM") == "0" or warm.ensure_started(home()) is None:
        return False
    path = warm.socket_path(home())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if path.exists() and "ready" in (home() / warm.LOG).read_text(errors="replace"):
            return True
        time.sleep(0.2)
    raise RuntimeError(f"pixelmill's warm host did not start; see {home() / warm.LOG}")


def _handed_child(log: Path, offset: int) -> int | None:
    """The child the warm host ran a command in, from its log past `offset`."""
    try:
        with log.open("rb") as handle:
            handle.seek(offset)
            lines = handle.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    found = [line.rsplit(" ", 1)[1] for line in lines if " handed to child " in line]
    return int(found[-1]) if found else None


def run_watched(command: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command, sampling its peak memory (the warm host's child's, when it ran the
    command); returns (result with stdout and stderr in `stdout`, wall seconds, peak MB).
    Output goes to a file, so a chatty command never blocks on a full pipe while it is
    being sampled."""
    from cli import warm
    from pixelmill.home import home

    log = home() / warm.LOG
    offset = log.stat().st_size if log.exists() else 0
    started, peak, child = time.perf_counter(), 0.0, None
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            child = child or _handed_child(log, offset)
            peak = max(peak, peak_rss_mb(process.pid), peak_rss_mb(child) if child else 0.0)
            time.sleep(0.1)
        wall = time.perf_counter() - started
        output.seek(0)
        stdout = output.read()
    result = subprocess.CompletedProcess(command, process.returncode, stdout, "")
    result.warm = child is not None  # type: ignore[attr-defined]  # the warm host ran it
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {result.returncode}: {stdout[-2000:]}")
    return result, wall, peak


def write_results(name: str, data: dict) -> Path:
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
