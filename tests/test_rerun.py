"""Two commands into one run folder at once, on local folders and on GCS (emulator): one
makes the run, the other is refused at once naming the folder and the run that holds it; a
default (minute-stamped) run folder in use moves on to the next free name instead."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_cli import PIXELMILL
from tests.test_crashes import make_photos as make_crash_photos
from tests.helpers import load_report, load_report_blob

pytestmark = pytest.mark.slow
IMAGES = 30
FILTERS = ("--filter", "blur", "--filter", "gaussian-blur:8")


def make_photos(folder: Path) -> Path:
    return make_crash_photos(folder, IMAGES, (1200, 800))


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([PIXELMILL, "run", *args, "--size", "1000x700", *FILTERS,
                             "--runner", "sequential", "--chunk-size", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def together(args: list[str], holds) -> list[tuple[int, str, str]]:
    """Start a command; once `holds()` says it holds its run folder, pause it (SIGSTOP, as a
    slow machine would) and run the same command again to its end, then let the first go
    on. The two really overlap, however fast either is. Returns both (exit status, stdout,
    stderr)."""
    first = start(*args)
    deadline = time.monotonic() + 120
    while not holds() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.poll() is None, "the first command ended before it held the run folder"
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = start(*args)
        second_result = second.communicate(timeout=600)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    first_result = first.communicate(timeout=600)
    return [(first.returncode, *first_result), (second.returncode, *second_result)]


def check_whole_run(report: dict) -> None:
    assert report["counts"] == {"discovered": IMAGES, "ok": IMAGES, "failed": 0, "skipped": 0}
    assert all(set(entry["outputs"]) == {"resized", "blur", "gaussian-blur-8"}
               for entry in report["images"])


def test_two_commands_into_one_local_run_folder(tmp_path, prefect_api):
    source = make_photos(tmp_path / "src")
    dest = tmp_path / "dst"
    outcomes = together([str(source), str(dest), "--run-name", "same"],
                        (dest / "same/.pixelmill-lock.json").exists)
    assert [code for code, _, _ in outcomes] == [0, 2], outcomes
    [(_, _, refusal)] = [outcome for outcome in outcomes if outcome[0] == 2]
    assert f"run folder {dest / 'same'} is in use by flow run" in refusal, refusal
    assert "Traceback" not in refusal
    check_whole_run(load_report(dest / "same/report.json"))
    assert not (dest / "same/.pixelmill-lock.json").exists()  # released at the end
    page = (dest / "same/gallery/index.html").read_text()
    assert f"Images ({IMAGES})" in page


def test_two_commands_into_one_gcs_run_folder(tmp_path, gcs, prefect_api):
    source = make_photos(tmp_path / "src")
    bucket = gcs.bucket(gcs.unique("together"))
    outcomes = together([str(source), f"gs://{bucket.name}/out", "--run-name", "same"],
                        lambda: bucket.get_blob("out/same/.pixelmill-lock.json") is not None)
    assert [code for code, _, _ in outcomes] == [0, 2], outcomes
    [(_, _, refusal)] = [outcome for outcome in outcomes if outcome[0] == 2]
    assert f"run folder gs://{bucket.name}/out/same is in use by flow run" in refusal, refusal
    report = load_report_blob(bucket, "out/same/report.json")
    check_whole_run(report)
    assert bucket.get_blob("out/same/.pixelmill-lock.json") is None


def test_two_commands_with_the_default_run_folder_get_one_each(tmp_path, prefect_api):
    source = make_photos(tmp_path / "src")
    dest = tmp_path / "dst"
    outcomes = together([str(source), str(dest)],
                        lambda: any(dest.glob("*/.pixelmill-lock.json")))
    assert [code for code, _, _ in outcomes] == [0, 0], outcomes
    runs = sorted(path.parent.name for path in dest.glob("*/report.json"))
    # the same minute gives STAMP and STAMP-2; across a minute boundary two stamps
    assert len(runs) == 2, runs
    for run in runs:
        report = load_report(dest / run / "report.json")
        assert report["run"] == run
        assert report["counts"]["ok"] + report["counts"]["skipped"] == IMAGES
