"""The `pixelmill` command end to end, in a subprocess, as a user types it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import ROOT
from tests.corpus import BAD, GOOD, make_source
from tests.helpers import load_report

PIXELMILL = str(Path(sys.executable).with_name("pixelmill"))


def pixelmill(*args: str, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run([PIXELMILL, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.mark.slow
def test_run_with_a_corrupt_file_exits_1_and_reports_it(tmp_path, prefect_api):
    source = make_source(tmp_path / "in")
    dest = tmp_path / "out"
    result = pixelmill("run", str(source), str(dest), "--size", "160x120", "--filter", "sharpen",
                       "--run-name", "cli")
    assert result.returncode == 1, result.stderr
    # the default runner chose threads for 9 images on one machine, and says so
    assert "runner: threads (auto: 9 images to make on one machine" in result.stdout
    report = load_report(dest / "cli/report.json")
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


NO_API = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}  # nothing answers: checks come first


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("where", ["a-file", "a-file/below/it"])
def test_a_destination_that_is_a_file_exits_2_at_once(tmp_path, where):
    source = make_source(tmp_path / "in")
    (tmp_path / "a-file").write_text("not a folder")
    result = pixelmill("run", str(source), str(tmp_path / where), env=NO_API)
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert f"DEST {tmp_path / where}" in line and "is a file" in line, line
    assert (tmp_path / "a-file").read_text() == "not a folder"


def test_a_destination_not_writable_is_refused(tmp_path, monkeypatch):
    from pixelmill import preflight
    from pixelmill.errors import UsageError

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # the tests may run as root, who may write anywhere
    monkeypatch.setattr(preflight.os, "access",
                        lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    preflight.check_destination(str(tmp_path / "open"))  # a writable parent: fine
    with pytest.raises(UsageError, match=f"DEST {locked}/out: {locked} is not writable"):
        preflight.check_destination(str(locked / "out"))
    assert not (locked / "out").exists()


@pytest.mark.slow
def test_a_destination_bucket_that_does_not_exist_exits_2_at_once(tmp_path, gcs):
    source = make_source(tmp_path / "in")
    result = pixelmill("run", str(source), "gs://no-such-bucket-pixelmill/out", env=NO_API)
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert "DEST gs://no-such-bucket-pixelmill/out" in line and "bucket not found" in line


def test_a_source_without_images_exits_2_and_says_so(tmp_path):
    source = tmp_path / "in"
    (source / "docs").mkdir(parents=True)
    (source / "docs" / "notes.txt").write_text("no pictures here")
    result = pixelmill("run", str(source), str(tmp_path / "out"), env=NO_API)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert f"no images found under SOURCE {source}" in one_error_line(result)
    assert not (tmp_path / "out").exists()
    # an image without an extension is found by its first bytes
    from pixelmill.samples import jpeg_bytes, photo

    (source / "docs" / "scan").write_bytes(jpeg_bytes(photo(40, 30)))
    from pixelmill import preflight

    preflight.check_source(str(source))


@pytest.mark.slow
def test_an_empty_gcs_prefix_exits_2_and_says_so(tmp_path, gcs):
    bucket = gcs.bucket(gcs.unique("empty"))
    bucket.blob("photos/readme.txt").upload_from_string(b"text", content_type="text/plain")
    result = pixelmill("run", f"gs://{bucket.name}/photo", str(tmp_path / "out"), env=NO_API)
    assert result.returncode == 2, (result.stdout, result.stderr)
    line = one_error_line(result)
    assert f"no images found under SOURCE gs://{bucket.name}/photo" in line
    assert "prefix" in line


def _rendered(listener) -> str:
    """The progress bar's line as a colour terminal shows it (ANSI codes included)."""
    from rich.console import Console

    screen = Console(force_terminal=True, color_system="standard", width=200, record=True)
    screen.print(listener.bar.make_tasks_table(listener.bar.tasks))
    return screen.export_text(styles=True)


def test_progress_counts_each_image_once_and_red_only_for_failures(monkeypatch):
    from cli import main as cli
    from pixelmill.models import ChunkResult, ImageResult

    listener = cli.RichProgress()
    # 3 to make in 2 chunks, 1 refused at discovery (an empty a.jpg), nothing kept
    listener.planned(chunks=2, images=3, rejected=1)
    assert "images 1/4" in _rendered(listener)
    ok = ChunkResult(index=0, images=(ImageResult(source="b.jpg", status="ok"),
                                      ImageResult(source="c.jpg", status="ok")))
    listener.chunk_done(ok, 2)
    line = _rendered(listener)
    assert "images 3/4" in line and "1 failed" in line and "\x1b[31m1 failed" in line, line
    bad = ImageResult(source="d.jpg", status="failed", error="not an image")
    listener.chunk_done(ChunkResult(index=1, images=(bad, bad)), 1)  # reported twice
    line = _rendered(listener)
    assert "images 4/4" in line and "2 failed" in line and "chunks 2/2" in line, line

    clean = cli.RichProgress()
    clean.planned(chunks=1, images=2, rejected=0)
    clean.chunk_done(ok, 2)
    line = _rendered(clean)
    assert "0 failed" in line and "\x1b[31m0 failed" not in line, line


def test_help_shows_no_type_after_flags():
    result = pixelmill("run", "--help", env={"COLUMNS": "120"})
    assert result.returncode == 0
    lines = {line.split()[1]: line for line in result.stdout.splitlines()
             if line.startswith("│ --")}
    assert "<int>" in lines["--quality"]  # options with a value still show its type
    for flag in ("--upscale", "--shared-filesystem", "--verbose", "--help"):
        assert "<bool>" not in lines[flag], lines[flag]


@pytest.mark.slow
def test_a_server_pixelmill_did_not_start_is_named_as_such(tmp_path, prefect_api):
    """The session's server is not the one recorded in a fresh PIXELMILL_HOME: pixelmill
    uses it and says it did not start it; the progress bar counts the bad image once."""
    source = tmp_path / "in"
    source.mkdir()
    from pixelmill.samples import jpeg_bytes, photo

    for name in ("a", "b"):
        (source / f"{name}.jpg").write_bytes(jpeg_bytes(photo(300, 200)))
    (source / "bad.jpg").write_text("hello")
    result = pixelmill("run", str(source), str(tmp_path / "out"), "--runner", "threads",
                       env={"PIXELMILL_HOME": str(tmp_path / "home")})
    assert result.returncode == 1, result.stderr
    assert (f"using the Prefect server at {prefect_api} (not started by pixelmill"
            in result.stderr), result.stderr
    assert "Prefect UI" not in result.stderr
    assert "images 3/3 1 failed" in result.stderr
    status = pixelmill("server", "status", env={"PIXELMILL_HOME": str(tmp_path / "home")})
    assert status.returncode == 1
    assert f"PREFECT_API_URL points at {prefect_api}, a Prefect server not started by " \
           "pixelmill" in status.stdout


@pytest.mark.slow
def test_server_start_exports_the_api_url_of_pixelmills_own_server(prefect_api):
    """`eval "$(pixelmill server start)"` sets PREFECT_API_URL, whatever port the server has;
    with that URL set, pixelmill knows the server as its own."""
    from cli import server

    home = Path(os.environ["PIXELMILL_HOME"]) / "server"  # where the session server is recorded
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env["PIXELMILL_HOME"] = str(home)
    result = subprocess.run(["bash", "-c", f'eval "$({PIXELMILL} server start --no-ray)"; '
                             'echo "API=$PREFECT_API_URL"'], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == f"API={prefect_api}", result.stdout
    # and in this process, with that URL set, the server is known as pixelmill's own
    os.environ["PIXELMILL_HOME"], saved = str(home), os.environ["PIXELMILL_HOME"]
    try:
        url, own = server.ensure_api()
    finally:
        os.environ["PIXELMILL_HOME"] = saved
    assert url == prefect_api and own is not None and own.url == prefect_api


def _events(flow_run_id: str, prefix: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(
            event=EventNameFilter(prefix=[prefix]),
            any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])),
            limit=50)
    return page.events


@pytest.mark.slow
def test_heartbeats_only_when_the_user_sets_a_frequency(tmp_path, prefect_api):
    """The command's own flow run sends no heartbeat events (ending it would wait up to 1 s
    for Prefect's heartbeat thread) unless PREFECT_FLOWS_HEARTBEAT_FREQUENCY is set."""
    import re
    import time

    source = make_source(tmp_path / "in")
    ids = {}
    for name, env in (("quiet", {}), ("asked", {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"})):
        result = pixelmill("run", str(source), str(tmp_path / "out"), "--size", "64x48",
                           "--run-name", name, env=env)
        assert result.returncode == 1, result.stderr  # the two bad files of the corpus
        ids[name] = re.search(r"/runs/flow-run/([0-9a-f-]{36})",
                              result.stdout + result.stderr).group(1)
    deadline = time.monotonic() + 30
    while not (_events(ids["asked"], "prefect.flow-run.heartbeat")
               and _events(ids["quiet"], "prefect.flow-run.Completed")):
        assert time.monotonic() < deadline, "the server never recorded the runs' events"
        time.sleep(0.5)
    assert _events(ids["quiet"], "prefect.flow-run.heartbeat") == []


@pytest.mark.slow
def test_a_dry_run_says_what_a_run_would_do_and_writes_nothing(tmp_path, prefect_api):
    """After a run, 2 new images and a deleted output: the dry run counts 6 kept and 3 to
    make (the two new, the one whose output went) plus the 2 bad files, refuses the empty
    file, names the ignored one, and touches neither folder; it needs no Prefect server."""
    source = make_source(tmp_path / "in")
    dest = tmp_path / "out"
    assert pixelmill("run", str(source), str(dest), "--size", "64x48", "--run-name", "n",
                     "--runner", "threads").returncode == 1  # the two bad files
    for name in ("new1.jpg", "new2.jpg"):
        (source / name).write_bytes((source / "e.jpg").read_bytes())
    (source / "empty.jpg").write_bytes(b"")
    (dest / "n/resized/trips/a.jpg").unlink()

    def tree(root):
        return {path: path.stat().st_mtime_ns for path in root.rglob("*")}

    before = (tree(source), tree(dest))
    result = pixelmill("run", str(source), str(dest), "--size", "64x48", "--run-name", "n",
                       "--dry-run", env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert result.returncode == 0, result.stderr
    assert "dry run, nothing written" in result.stdout
    assert ("12 images: 6 kept (their outputs are there, made from the same source version "
            "with the same settings), 5 to make, 1 refused at discovery; 1 other files "
            "ignored") in " ".join(result.stdout.split())
    assert "refused empty.jpg" in result.stdout
    assert "1 file not images: 1 .txt (left alone)" in result.stdout
    assert "runner threads (auto: 5 images to make on one machine" in result.stdout
    assert " parts" not in result.stdout  # 12 images: one part
    assert (tree(source), tree(dest)) == before

    # in parts of 3 images: the 5 to make are in fewer parts than the listing (one part's
    # images are all kept), each part's chunks counted
    parted = pixelmill("run", str(source), str(dest), "--size", "64x48", "--run-name", "n",
                       "--dry-run", "--part-size", "3",
                       env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    said = " ".join(parted.stdout.split())
    assert parted.returncode == 0, parted.stderr
    found = re.search(r"would make 5 in (\d+) chunks of up to \d+, the listing planned in "
                      r"(\d+) parts of about 3 images and made in (?:(\d+) child flow runs|"
                      r"this flow run)", said)
    assert found, said
    chunks, listed = int(found.group(1)), int(found.group(2))
    children = int(found.group(3) or 0)
    # 5 images to make, in groups of up to 3: at least two groups, each a child flow run
    assert listed >= 4 and children >= 2 and chunks >= children
    assert (tree(source), tree(dest)) == before
    refused = pixelmill("run", str(source), str(dest), "--part-size", "0", "--dry-run")
    assert refused.returncode == 2 and "--part-size 0: must be at least 1" in refused.stderr
