"""The Prefect server goes away in the middle of a run: brought back by `pixelmill server
start` it returns on the same port and the run carries on; gone for good, the command ends
with exit 3 and one line that says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli import server
from tests.test_cli import PIXELMILL
from tests.test_crashes import make_photos

pytestmark = pytest.mark.slow
IMAGES = 40


def photos(folder: Path) -> Path:
    return make_photos(folder, IMAGES, (1200, 800))


def start_run(source: Path, dest: Path, env: dict[str, str]) -> subprocess.Popen:
    # one thread, two filters, big outputs: the run is still going when the server dies
    return subprocess.Popen([PIXELMILL, "run", str(source), str(dest), "--run-name", "o",
                             "--size", "1000x700", "--filter", "blur", "--filter",
                             "gaussian-blur:8", "--runner", "sequential", "--chunk-size", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_once_writing(run: subprocess.Popen, dest: Path, pid: int) -> None:
    blurred = dest / "o/blur"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.poll() is None:
        if blurred.is_dir() and len(list(blurred.rglob("*.jpg"))) >= 2:
            break
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before the server could be killed"
    os.killpg(pid, signal.SIGKILL)  # a crash, not a shutdown


def test_a_server_brought_back_on_its_port_lets_the_run_finish(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "PIXELMILL_HOME": str(home)}
    env.pop("PREFECT_API_URL")  # pixelmill starts and keeps its own server
    source, dest = photos(tmp_path / "src"), tmp_path / "dst"
    run = start_run(source, dest, env)
    try:
        deadline = time.monotonic() + 120
        while not (home / "server.json").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        before = json.loads((home / "server.json").read_text())
        kill_once_writing(run, dest, before["pid"])
        again = subprocess.run([PIXELMILL, "server", "start", "--no-ray"], env=env,
                               capture_output=True, text=True, timeout=180)
        assert again.returncode == 0, again.stderr
        after = json.loads((home / "server.json").read_text())
        assert after["url"] == before["url"] and after["pid"] != before["pid"]
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-3000:]
        assert f"processed {IMAGES} ok, 0 failed" in out
        assert "Traceback" not in err
    finally:
        if run.poll() is None:
            run.kill()
        subprocess.run([PIXELMILL, "server", "stop"], env=env, capture_output=True, timeout=120)


def test_a_run_that_loses_its_api_for_good_ends_with_exit_3_and_one_line(tmp_path):
    info = server.start(base=tmp_path / "server", port=server.free_port())
    # the client gives up after one retry instead of five: the same path, sooner
    env = {**os.environ, "PREFECT_API_URL": info.url, "PREFECT_CLIENT_MAX_RETRIES": "1"}
    source, dest = photos(tmp_path / "src"), tmp_path / "dst"
    run = start_run(source, dest, env)
    try:
        kill_once_writing(run, dest, info.pid)
        out, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
        server.stop_pid(info.pid)
    assert run.returncode == 3, out + err
    assert f"lost the Prefect API at {info.url} during the run" in err
    assert "Traceback" not in err and "Error logging to API" not in err
    assert len(err.strip().splitlines()) <= 5, err  # API line, progress, the error
    assert (dest / "o/resized").is_dir()  # what was written is kept
