"""The `pixelmill` command end to end, in a subprocess, as a user types it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.corpus import BAD, GOOD, make_source

PIXELMILL = str(Path(sys.executable).with_name("pixelmill"))


def pixelmill(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run([PIXELMILL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.mark.slow
def test_run_with_a_corrupt_file_exits_1_and_reports_it(tmp_path, prefect_api):
    source = make_source(tmp_path / "in")
    dest = tmp_path / "out"
    result = pixelmill("run", str(source), str(dest), "--size", "160x120", "--filter", "sharpen",
                       "--runner", "threads", "--run-name", "cli")
    assert result.returncode == 1, result.stderr
    report = json.loads((dest / "cli/report.json").read_text())
    assert report["counts"]["ok"] == len(GOOD)
    failed = {e["source"]: e["error"] for e in report["images"] if e["status"] == "failed"}
    assert set(failed) == set(BAD)
    assert "broken.jpg" in result.stdout and "failed" in result.stdout
    assert f"processed {len(GOOD)} ok, {len(BAD)} failed" in result.stdout
    with Image.open(dest / "cli/sharpen/trips/a.jpg") as image:
        assert image.size == (160, 120)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--size", "400by300"], "--size '400by300'"),
        (["--size", "0x300"], "between 1 and"),
        (["--filter", "sepia"], "unknown filter; choose from blur, sharpen"),
        (["--format", "bmp"], "--format"),
        (["--quality", "0"], "--quality"),
        (["--fit", "stretch"], "--fit"),
        (["--runner", "dask"], "--runner 'dask'"),
        (["--run-name", "../up"], "--run-name"),
        (["--chunk-size", "0"], "--chunk-size"),
    ],
)
def test_bad_usage_exits_2_with_one_line_and_writes_nothing(tmp_path, args, needle):
    source = make_source(tmp_path / "in")
    dest = tmp_path / "out"
    # no Prefect server needed: usage is checked before anything starts
    result = pixelmill("run", str(source), str(dest), *args,
                       env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not dest.exists()


def test_missing_source_exits_2(tmp_path):
    result = pixelmill("run", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no such folder" in result.stderr
    assert not (tmp_path / "out").exists()


def test_resize_one_image(tmp_path):
    from pixelmill.samples import jpeg_bytes, photo

    source = tmp_path / "in.jpg"
    source.write_bytes(jpeg_bytes(photo(1200, 800), orientation=6))
    result = pixelmill("resize", str(source), str(tmp_path / "out.webp"), "--size", "300x300")
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "out.webp") as image:
        assert image.format == "WEBP" and image.size == (300, 200)  # upright landscape despite sideways storage
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    result = pixelmill("resize", str(bad), str(tmp_path / "bad-out.jpg"))
    assert result.returncode == 1 and "not an image" in result.stderr
    assert not (tmp_path / "bad-out.jpg").exists()


@pytest.mark.slow
def test_check_reports_ray_prefect_and_storage(tmp_path, prefect_api):
    result = pixelmill("check", "--storage", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ok Prefect API answers" in result.stdout
    assert "ok Ray ran a remote task" in result.stdout
    assert f"ok storage {tmp_path} is writable" in result.stdout
    assert list(tmp_path.iterdir()) == []  # the probe object is cleaned up
