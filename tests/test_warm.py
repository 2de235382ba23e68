"""The warm host (cli/warm.py) with the real `pixelmill` script, a real Prefect server and
real processes: a command it takes runs as it would by itself (its folder, environment,
streams and exit status), and it steps aside whenever it could run a command differently."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import warm
from cli.server import free_port
from pixelmill.home import alive
from PIL import Image

PIXELMILL = str(Path(sys.executable).with_name("pixelmill"))


def make_jpegs(folder: Path, count: int, size: tuple[int, int] = (64, 48)) -> Path:
    folder.mkdir(parents=True)
    for n in range(count):
        Image.new("RGB", size, (n % 256, 80, 160)).save(folder / f"img-{n:04d}.jpg")
    return folder


def _wait(predicate, timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def host(tmp_path, prefect_api):
    """A warm host of its own home, started with a Prefect API URL that answers nothing: a
    command it runs reaches the session's server only with the command's own environment."""
    base = tmp_path / "home"
    base.mkdir()
    # the kept server the host lives as long as: this test's process stands in for it
    (base / "server.json").write_text(json.dumps({"url": prefect_api, "pid": os.getpid(),
                                                  "log": ""}))
    env = {**os.environ, "PIXELMILL_HOME": str(base),
           "PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        info = warm.ensure_started(base)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _wait(lambda: "ready" in (base / warm.LOG).read_text(), what="the warm host")
    yield base, info
    warm.stop(base)


def _handed(base: Path) -> list[int]:
    """The children the host handed commands to, from its log."""
    return [int(line.rsplit(" ", 1)[1]) for line in (base / warm.LOG).read_text().splitlines()
            if " handed to child " in line]


def _run(args, base: Path, cwd: Path, drop: tuple[str, ...] = (), **env):
    environ = {key: value for key, value in os.environ.items() if key not in drop}
    return subprocess.run([PIXELMILL, *args], capture_output=True, text=True, cwd=cwd,
                          env={**environ, "PIXELMILL_HOME": str(base), **env}, timeout=300)


def test_a_command_handed_over_runs_in_its_own_folder_environment_and_streams(tmp_path, host):
    base, info = host
    source = make_jpegs(tmp_path / "src", 3)
    work = tmp_path / "work"
    work.mkdir()
    done = _run(["run", str(source), "out", "--run-name", "w", "--runner", "threads"], base,
                work)
    assert done.returncode == 0, done.stderr
    assert len(_handed(base)) == 1  # the host ran it, not the script itself
    report = json.loads((work / "out/w/report.json").read_text())  # relative to its folder
    assert report["counts"]["ok"] == 3
    assert "gallery:" in done.stdout or "gallery:" in done.stderr  # its own pipes
    assert os.stat(base / warm.FOLDER).st_mode & 0o777 == 0o700

    refused = _run(["run", str(tmp_path / "nothing-here"), "out"], base, work)
    assert refused.returncode == 2
    assert "nothing-here" in refused.stderr
    assert len(_handed(base)) == 2
    assert alive(info["pid"])  # the host itself never runs a command


def test_a_verbose_command_gets_prefects_logs_on_its_console(tmp_path, host):
    base, _ = host
    source = make_jpegs(tmp_path / "src", 2)
    as_users = ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL",)  # the tests' quiet default
    quiet = _run(["run", str(source), str(tmp_path / "a"), "--runner", "threads"], base,
                 tmp_path, drop=as_users)
    loud = _run(["run", str(source), str(tmp_path / "b"), "--runner", "threads", "--verbose"],
                base, tmp_path, drop=as_users)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert len(_handed(base)) == 2
    assert "Beginning flow run" not in quiet.stdout + quiet.stderr
    # the host set Prefect's logging up for quiet commands; this one's is set up again
    assert "Beginning flow run" in loud.stdout + loud.stderr


def test_the_host_steps_aside_for_other_import_settings_or_changed_code(tmp_path, host):
    base, info = host
    source = make_jpegs(tmp_path / "src", 2)
    # read only when used (ray.init() sets it in its process): no reason to step aside
    same = _run(["run", str(source), str(tmp_path / "s"), "--runner", "threads"], base,
                tmp_path, PYTHONBREAKPOINT="ray.util.rpdb._driver_set_trace")
    assert same.returncode == 0, same.stderr
    assert len(_handed(base)) == 1
    other = _run(["run", str(source), str(tmp_path / "a"), "--runner", "threads"], base,
                 tmp_path, PYTHONPATH=str(tmp_path / "elsewhere"))
    assert other.returncode == 0, other.stderr
    assert len(_handed(base)) == 1  # declined before anything ran: the script ran it itself
    assert "other import settings" in (base / warm.LOG).read_text()
    assert alive(info["pid"])

    loaded = Path(warm.__file__).with_name("main.py")
    before = loaded.stat()
    os.utime(loaded, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    try:
        changed = _run(["run", str(source), str(tmp_path / "b"), "--runner", "threads"], base,
                       tmp_path)
    finally:
        os.utime(loaded, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert changed.returncode == 0, changed.stderr
    assert len(_handed(base)) == 1
    _wait(lambda: not alive(info["pid"]) or _zombie(info["pid"]), 10, "the stale host to exit")
    assert "changed since the host started" in (base / warm.LOG).read_text()


@pytest.mark.parametrize("how", ["interrupt", "kill"])
def test_a_command_stopped_or_killed_stops_its_child(tmp_path, host, how):
    base, _ = host
    source = make_jpegs(tmp_path / "src", 400, size=(640, 480))
    command = subprocess.Popen(
        [PIXELMILL, "run", str(source), str(tmp_path / "out"), "--runner", "threads",
         "--chunk-size", "10"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "PIXELMILL_HOME": str(base)})
    _wait(lambda: _handed(base), what="the command to be handed over")
    child = _handed(base)[0]
    _wait(lambda: (tmp_path / "out").exists(), what="the run to start")
    if how == "interrupt":
        command.send_signal(signal.SIGINT)  # Ctrl-C reaches the script; it passes it on
        said = command.communicate(timeout=120)[0].decode()
        assert command.returncode == 130  # as the command run by itself ends on Ctrl-C
        assert "interrupt" in said  # the child's own Prefect saw the interrupt
    else:
        command.kill()
        command.wait(timeout=10)
    _wait(lambda: not alive(child) or _zombie(child), 60, "the child to stop")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_the_host_ends_with_the_kept_server_however_that_ends(host):
    base, info = host
    (base / "server.json").unlink()  # as when the server is stopped by other means
    _wait(lambda: not alive(info["pid"]) or _zombie(info["pid"]), warm.CHECK_S + 20,
          "the host to exit")
    assert "server it came with is gone" in (base / warm.LOG).read_text()
    assert not warm.socket_path(base).exists()
