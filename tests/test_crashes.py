"""Crashes and re-runs: a killed Ray worker, a killed driver, the same command twice."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pixelmill.samples import jpeg_bytes, photo
from pixelmill.spec import PipelineSpec
from tests.test_cli import PIXELMILL
from tests.helpers import load_report

pytestmark = pytest.mark.slow


def make_photos(folder: Path, count: int, size: tuple[int, int] = (2400, 1600)) -> Path:
    for number in range(count):
        path = folder / f"set{number % 3}" / f"img-{number:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(photo(*size, seed=number)))
    return folder


def outputs(run: Path) -> dict[str, str]:
    """Every image output of a run folder with its content hash."""
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*.jpg")) if "gallery" not in p.parts}


def ray_task_pids(name: str) -> list[int]:
    """Ray names a worker process after the task it runs: `ray::resize-chunk`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(f"ray::{name}".encode()):
                pids.append(int(entry.name))
    return pids


def test_a_ray_worker_killed_mid_chunk_loses_nothing(tmp_path, ray_cluster):
    from flows.process_images import process_images

    source = make_photos(tmp_path / "src", 12)
    killed: list[int] = []
    states: list = []
    runner = threading.Thread(target=lambda: states.append(process_images(
        source=str(source), destination=str(tmp_path / "dst"), run_name="k",
        spec=PipelineSpec(size=(200, 150), filters=("emboss",)), chunk_size=6,
        return_state=True)))
    runner.start()
    deadline = time.monotonic() + 120
    while not killed and time.monotonic() < deadline and runner.is_alive():
        for pid in ray_task_pids("resize-chunk"):
            os.kill(pid, signal.SIGKILL)  # a worker process, as the OOM killer would
            killed.append(pid)
            break
        time.sleep(0.02)
    runner.join(timeout=300)
    assert killed, "never caught a resize chunk running"
    [state] = states
    assert state.is_completed(), state.message
    run = tmp_path / "dst/k"
    report = load_report(run / "report.json")
    assert report["counts"]["ok"] == 12
    for entry in report["images"]:
        for path in entry["outputs"].values():
            with Image.open(run / path) as image:
                image.load()  # whole files only
    assert not list(run.rglob(".pixelmill-tmp-*"))


def test_a_killed_driver_is_resumed_by_running_the_same_command(tmp_path, prefect_api):
    source = make_photos(tmp_path / "src", 24)
    command = [PIXELMILL, "run", str(source), str(tmp_path / "dst"), "--run-name", "r",
               "--size", "200x150", "--filter", "blur", "--runner", "sequential",
               "--chunk-size", "2"]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 180
    blurred = tmp_path / "dst/r/blur"
    # One thread runs the tasks in order, so once the 4th filter chunk writes (8 files), the
    # first 3 have finished and stored their results; the 4th may be cut off mid-chunk.
    while time.monotonic() < deadline and driver.poll() is None:
        if blurred.is_dir() and len(list(blurred.rglob("*.jpg"))) >= 8:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the run ended before it could be interrupted"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies at 3 a.m.
    driver.wait()
    assert not (tmp_path / "dst/r/report.json").exists()

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    report = load_report(tmp_path / "dst/r/report.json")
    assert report["counts"]["skipped"] >= 6  # finished chunks were reused, not redone
    assert report["counts"]["ok"] + report["counts"]["skipped"] == 24
    assert report["counts"]["failed"] == 0

    clean = subprocess.run([*command[:3], str(tmp_path / "clean"), *command[4:]],
                           capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr
    assert outputs(tmp_path / "dst/r") == outputs(tmp_path / "clean/r")


def test_same_command_twice_writes_nothing_new_and_changes_redo_only_what_they_affect(
        tmp_path, prefect_api):
    source = make_photos(tmp_path / "src", 8, size=(640, 480))
    command = [PIXELMILL, "run", str(source), str(tmp_path / "dst"), "--run-name", "i",
               "--size", "160x120", "--filter", "blur", "--runner", "threads",
               "--chunk-size", "2"]

    def run(*extra: str) -> dict:
        result = subprocess.run([*command, *extra], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return load_report(tmp_path / "dst/i/report.json")

    def mtimes() -> dict[str, int]:
        return {p.relative_to(tmp_path / "dst/i").as_posix(): p.stat().st_mtime_ns
                for p in (tmp_path / "dst/i").rglob("*.jpg") if "gallery" not in p.parts}

    first = run()
    assert first["counts"]["ok"] == 8
    before = mtimes()
    second = run()
    assert second["counts"] == {"discovered": 8, "ok": 0, "failed": 0, "skipped": 8}
    assert mtimes() == before  # no image output rewritten
    # the report and the gallery still describe the whole run folder, kept images marked
    assert [entry["outputs"] for entry in second["images"]] == \
        [entry["outputs"] for entry in first["images"]]
    page = (tmp_path / "dst/i/gallery/index.html").read_text()
    assert "Images (8)" in page and page.count('class="kept"') == 8

    # one source changes: only its outputs are made again
    changed = source / "set1/img-004.jpg"
    changed.write_bytes(jpeg_bytes(photo(640, 480, seed=99)))
    third = run()
    assert third["counts"]["ok"] == 1 and third["counts"]["skipped"] == 7
    after = mtimes()
    redone = {key for key in after if after[key] != before[key]}
    assert redone == {"resized/set1/img-004.jpg", "blur/set1/img-004.jpg"}

    # a new filter: only its outputs are made, nothing else is rewritten
    fourth = run("--filter", "emboss")
    assert fourth["counts"]["ok"] == 8  # every image got its new variant ...
    final = mtimes()
    assert all(final[key] == after[key] for key in after)
    assert len([key for key in final if key.startswith("emboss/")]) == 8

    # the destination is the truth: everything deleted is everything made again
    import shutil

    shutil.rmtree(tmp_path / "dst")
    fifth = run("--filter", "emboss")
    assert fifth["counts"] == {"discovered": 8, "ok": 8, "failed": 0, "skipped": 0}
    assert set(mtimes()) == set(final)
