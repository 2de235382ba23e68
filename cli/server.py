"""The embedded Prefect server: started by pixelmill when PREFECT_API_URL is unset.

It runs `prefect server start` (SQLite under a pixelmill-owned PREFECT_HOME) as a detached
process that outlives the command, so the UI stays up to look at runs and the next command
starts faster. `pixelmill server stop` ends it. Ray workers inherit PREFECT_API_URL and
report to it instead of each starting a temporary server of its own.

It listens on 127.0.0.1 only. Commands that start it at the same time take turns under a lock
in PIXELMILL_HOME: one starts it, the others use it. A server that died comes back on the port
it had (same PREFECT_HOME, so the same database) unless another program took that port.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pixelmill.home import _proc, alive, command_line, home, mentions, runs  # noqa: F401

log = logging.getLogger(__name__)

# Seconds to wait for a fresh server to answer; it takes 8-10 s on 2 busy cores.
START_TIMEOUT_S = 90.0
# Seconds a running server may take to answer before it counts as hung and is replaced: one
# busy with a large flow run on 2 cores can be slow; only a hung one costs the whole wait.
BUSY_TIMEOUT_S = 10.0
PREFERRED_PORT = 4200
LOCK_FILE = "server.lock"
# Variables every pixelmill process sets before Prefect is imported.
BASE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # offline machines: telemetry only errors
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pixelmill",  # our loggers (GCS retries) reach the UI
}
# And those of a command that is not --verbose: the progress bar is the console view (logs
# still reach the API and the UI), and Prefect's background services (logs and events sent
# to the API) would print a traceback for each failed attempt when the API goes away; the
# command says so once instead.
QUIET_ENV = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
    "PREFECT_LOGGING_INTERNAL_LEVEL": "CRITICAL",
}
# /proc/net/tcp* state of a listening socket.
TCP_LISTEN = "0A"


@dataclass
class ServerInfo:
    url: str  # the API URL, http://127.0.0.1:PORT/api
    pid: int
    log: str

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 0


def _state_file(base: Path) -> Path:
    return base / "server.json"


def write_state(path: Path, data: dict) -> None:
    """Replace a state file whole: a command reading it meanwhile sees the old or the new."""
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(data))
    partial.replace(path)


@contextmanager
def locked(base: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on base/name: commands that check for a kept service and start
    it take turns, so two started together make one service and both use it. The kernel
    drops the lock when its holder exits, however it exits."""
    base.mkdir(parents=True, exist_ok=True)
    with (base / name).open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def free_port(preferred: int | None = None) -> int:
    """`preferred` if it is free on loopback, else any free loopback port. `preferred` is free
    as the servers bind it (SO_REUSEADDR): when nothing listens on it, even while connections
    of a server that died there linger in TIME_WAIT. Any port is one the kernel keeps clear of
    those, for callers that bind without SO_REUSEADDR."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket() as sock:
            if port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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


def group_members(pgid: int) -> list[int]:
    """The processes of process group `pgid` (Linux; [] where /proc cannot tell)."""
    proc = _proc()
    members = []
    for entry in proc.iterdir() if proc else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def listens(pgid: int, port: int) -> bool | None:
    """Whether a process of group `pgid` is the one listening on TCP `port`, so a health check
    on that port is answered by it and not by another program that took the port; None where
    /proc cannot tell (not Linux)."""
    proc = _proc()
    if proc is None:
        return None
    inodes = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            lines = (proc / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for pid in group_members(pgid) if inodes else ():
        try:
            fds = list((proc / str(pid) / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) in inodes:
                    return True
            except OSError:
                continue
    return False


def _marker(port: int) -> str:
    """What the command line of pixelmill's server on `port` contains."""
    return f"server start --host 127.0.0.1 --port {port}"


def _recorded(base: Path | None) -> ServerInfo | None:
    """The server pixelmill wrote down when it started one, if any."""
    try:
        return ServerInfo(**json.loads(_state_file(base or home()).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def running(base: Path | None = None, timeout: float = 2.0) -> ServerInfo | None:
    """The server pixelmill started earlier, if it is still up and answering on its port
    itself (not another program that took the port)."""
    info = _recorded(base)
    if info and runs(info.pid, _marker(info.port)) and healthy(info.url, timeout) and listens(
            info.pid, info.port) is not False:
        return info
    return None


def venv_tool(name: str) -> str:
    """A console script of this Python's venv (`prefect`, `ray`), else the one on PATH."""
    tool = Path(sys.executable).with_name(name)
    return str(tool) if tool.exists() else name


def start_detached(command: list[str], env: dict[str, str], log_path: Path,
                   ready: Callable[[int], bool], timeout: float, what: str,
                   cwd: Path | None = None, stop_timeout: float = 15.0) -> int:
    """Start `command` in a session of its own (it outlives this process), its output appended
    to `log_path`, and wait until `ready(pid)` while it still runs; returns its pid. If it
    exits first or is not ready in time, it is stopped and RuntimeError carries the end of
    its log."""
    with log_path.open("ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is None and ready(process.pid) and process.poll() is None:
            return process.pid
        if process.returncode is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{tail}")
        time.sleep(0.25)
    stop_pid(process.pid, timeout=stop_timeout)
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s; see {log_path}")


def start(base: Path | None = None, port: int | None = None,
          timeout: float = START_TIMEOUT_S) -> ServerInfo:
    """Start `prefect server start` on loopback and wait until it answers on its port."""
    base = (base or home()).absolute()
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port(PREFERRED_PORT)
    log_path = base / "server.log"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(BASE_ENV)
    env["PREFECT_HOME"] = str(base / "prefect")
    env["PREFECT_UI_API_URL"] = f"http://127.0.0.1:{port}/api"
    url = f"http://127.0.0.1:{port}/api"

    def ready(pid: int) -> bool:  # answered by our process, not one that took the port first
        return healthy(url) and listens(pid, port) is not False

    pid = start_detached([venv_tool("prefect"), "server", "start", "--host", "127.0.0.1",
                          "--port", str(port)], env, log_path, ready, timeout,
                         "prefect server", cwd=base)
    info = ServerInfo(url=url, pid=pid, log=str(log_path))
    write_state(_state_file(base), asdict(info))
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


def _stop(base: Path) -> ServerInfo | None:
    """Stop the recorded server if it still runs and forget it; returns it if it ran. A
    record whose pid now belongs to another program (after a reboot) is only forgotten."""
    info = _recorded(base)
    if info is None:
        return None
    ran = runs(info.pid, _marker(info.port))
    if ran:
        stop_pid(info.pid)
    _state_file(base).unlink(missing_ok=True)
    return info if ran else None


def stop(base: Path | None = None) -> ServerInfo | None:
    """Stop the server pixelmill started (if any); returns what was stopped."""
    base = base or home()
    with locked(base, LOCK_FILE):
        return _stop(base)


def ensure(base: Path | None = None) -> ServerInfo:
    """pixelmill's server, started now if it is not running: on the port it had before when
    that port is free (its database is the same), else on another, with a warning."""
    base = base or home()
    with locked(base, LOCK_FILE):
        info = running(base, timeout=BUSY_TIMEOUT_S)
        if info is not None:
            return info
        before = _recorded(base)
        _stop(base)  # one of ours that stopped answering
        port = free_port(before.port if before else PREFERRED_PORT)
        if before and port != before.port:
            log.warning("port %d, where pixelmill's Prefect server was, is taken by another "
                        "program; starting it on port %d", before.port, port)
        return start(base, port)


def foreign_api_url(own: ServerInfo | None) -> str | None:
    """PREFECT_API_URL when it names a server other than pixelmill's own `own`, else None."""
    url = os.environ.get("PREFECT_API_URL")
    if not url or (own is not None and _same_api(url, own.url)):
        return None
    return url


def _same_api(first: str, second: str) -> bool:
    """The same API, written with or without a trailing slash or as localhost."""
    def norm(url: str) -> str:
        return url.rstrip("/").replace("://localhost:", "://127.0.0.1:")

    return norm(first) == norm(second)


def ensure_api() -> tuple[str, ServerInfo | None]:
    """Make sure a Prefect API answers and PREFECT_API_URL points at it.

    Returns (api_url, pixelmill's server, or None when PREFECT_API_URL names a server
    pixelmill did not start: it is used, never taken for pixelmill's own).
    """
    for key, value in BASE_ENV.items():
        os.environ.setdefault(key, value)
    url = os.environ.get("PREFECT_API_URL")
    if url:
        if not healthy(url, timeout=10):
            raise RuntimeError(f"PREFECT_API_URL={url} does not answer; start it or unset it")
        own = running()
        return url, (own if own is not None and _same_api(url, own.url) else None)
    info = ensure()
    os.environ["PREFECT_API_URL"] = info.url
    return info.url, info
