"""The embedded Prefect server: started by pixelmill when PREFECT_API_URL is unset.

It runs `prefect server start` (SQLite under a pixelmill-owned PREFECT_HOME) as a detached
process that outlives the command, so the UI stays up to look at runs and the next command
starts faster. `pixelmill server stop` ends it. Ray workers inherit PREFECT_API_URL and
report to it instead of each starting a temporary server (PLATFORM.md).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

# Seconds to wait for a fresh server to answer; it takes 8-10 s on 2 busy cores.
START_TIMEOUT_S = 90.0
PREFERRED_PORT = 4200
# Variables every pixelmill process sets before Prefect is imported.
BASE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline machines: telemetry only errors
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pixelmill",  # our loggers (GCS retries) reach the UI
}


@dataclass
class ServerInfo:
    url: str  # the API URL, http://127.0.0.1:PORT/api
    pid: int
    log: str

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


def home() -> Path:
    """pixelmill's own folder: PIXELMILL_HOME or ~/.pixelmill."""
    return Path(os.environ.get("PIXELMILL_HOME") or Path.home() / ".pixelmill").expanduser()


def _state_file(base: Path) -> Path:
    return base / "server.json"


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it is free on loopback, else any free loopback port."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    """True when the Prefect API at `api_url` answers its health check."""
    try:
        with urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=timeout) as reply:
            return reply.status == 200
    except OSError:
        return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _recorded(base: Path | None) -> ServerInfo | None:
    """The server pixelmill wrote down when it started one, if any."""
    try:
        return ServerInfo(**json.loads(_state_file(base or home()).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def running(base: Path | None = None) -> ServerInfo | None:
    """The server pixelmill started earlier, if it is still up and answering."""
    info = _recorded(base)
    return info if info and alive(info.pid) and healthy(info.url) else None


def venv_tool(name: str) -> str:
    """A console script of this Python's venv (`prefect`, `ray`), else the one on PATH."""
    tool = Path(sys.executable).with_name(name)
    return str(tool) if tool.exists() else name


def start_detached(command: list[str], env: dict[str, str], log_path: Path,
                   ready: Callable[[], bool], timeout: float, what: str,
                   cwd: Path | None = None, stop_timeout: float = 15.0) -> int:
    """Start `command` in a session of its own (it outlives this process), its output appended
    to `log_path`, and wait until `ready()`; returns its pid. If it exits first or is not ready
    in time, it is stopped and RuntimeError carries the end of its log."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        if ready():
            return process.pid
        time.sleep(0.25)
    stop_pid(process.pid, timeout=stop_timeout)
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s; see {log_path}")


def start(base: Path | None = None, port: int | None = None,
          timeout: float = START_TIMEOUT_S) -> ServerInfo:
    """Start `prefect server start` on loopback and wait until its API answers."""
    base = base or home()
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port(PREFERRED_PORT)
    log_path = base / "server.log"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(BASE_ENV)
    env["PREFECT_HOME"] = str(base / "prefect")
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    url = f"http://127.0.0.1:{port}/api"
    pid = start_detached([venv_tool("prefect"), "server", "start", "--host", "127.0.0.1",
                          "--port", str(port)], env, log_path, lambda: healthy(url), timeout,
                         "prefect server")
    info = ServerInfo(url=url, pid=pid, log=str(log_path))
    _state_file(base).write_text(json.dumps(asdict(info)))
    return info


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """End a server process group we started: SIGTERM, then SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = 0 if alive(pid) else pid
            if done or not alive(pid):
                return
            time.sleep(0.2)


def stop(base: Path | None = None) -> ServerInfo | None:
    """Stop the server pixelmill started (if any); returns what was stopped."""
    info = _recorded(base)
    if info is None:
        return None
    if alive(info.pid):
        stop_pid(info.pid)
    _state_file(base or home()).unlink(missing_ok=True)
    return info


def ensure_api() -> tuple[str, ServerInfo | None]:
    """Make sure a Prefect API answers and PREFECT_API_URL points at it.

    Returns (api_url, the embedded server or None when the user's own API is used).
    """
    for key, value in BASE_ENV.items():
        os.environ.setdefault(key, value)
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not healthy(url, timeout=10):
            raise RuntimeError(f"PREFECT_API_URL={url} does not answer; start it or unset it")
        return url, None
    info = running() or start()
    os.environ["PREFECT_API_URL"] = info.url
    return info.url, info
