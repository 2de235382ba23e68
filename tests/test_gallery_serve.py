"""`pixelmill gallery DEST/RUN` serves a run's gallery on 127.0.0.1, from a local folder or a
bucket (the emulator), with every link of the page answering and nothing outside the run."""

from __future__ import annotations

import re
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from pixelmill.spec import PipelineSpec
from tests.test_cli import PIXELMILL

pytestmark = pytest.mark.slow


def photos(folder: Path) -> Path:
    folder.mkdir()
    for number in range(3):
        Image.new("RGB", (160, 120), (80 * number, 40, 200)).save(folder / f"p {number}.jpg")
    return folder


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, "", b""


def serve_and_check(run_uri: str) -> None:
    server = subprocess.Popen([PIXELMILL, "gallery", run_uri], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        address = re.search(r"http://127\.0\.0\.1:\d+/gallery/index\.html", line)
        assert address, line + server.stderr.read()
        status, kind, page = get(address[0])
        assert status == 200 and kind == "text/html" and b"pixelmill run" in page
        links = re.findall(r'(?:href|src)="\.\./([^"]+)"', page.decode())
        assert len(links) >= 6
        base = address[0].rsplit("/gallery/", 1)[0]
        for link in links:
            status, kind, _ = get(f"{base}/{link}")
            assert status == 200, link
        status, kind, body = get(f"{base}/resized/p%200.jpg")
        assert kind == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
        assert get(f"{base}/../../etc/passwd")[0] == 404
        assert get(f"{base}/%2e%2e/%2e%2e/etc/passwd")[0] == 404
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0


def test_a_local_run_folders_gallery_is_served_on_loopback(tmp_path, prefect_api):
    from flows.process_images import make_task_runner, process_images

    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    state = flow(source=str(photos(tmp_path / "src")), destination=str(tmp_path / "dst"),
                 spec=PipelineSpec(size=(80, 60), filters=("blur",)), run_name="s",
                 return_state=True)
    assert state.is_completed()
    serve_and_check(str(tmp_path / "dst/s"))


def test_a_buckets_gallery_is_served_on_loopback(tmp_path, gcs, prefect_api):
    from flows.process_images import make_task_runner, process_images

    bucket = gcs.bucket(gcs.unique("shown"))
    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    state = flow(source=str(photos(tmp_path / "src")), destination=f"gs://{bucket.name}/out",
                 spec=PipelineSpec(size=(80, 60), filters=("blur",)), run_name="s",
                 return_state=True)
    assert state.is_completed()
    serve_and_check(f"gs://{bucket.name}/out/s")


def test_a_folder_without_a_gallery_is_refused_in_one_line(tmp_path):
    result = subprocess.run([PIXELMILL, "gallery", str(tmp_path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert f"{tmp_path}: no gallery/index.html there" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
