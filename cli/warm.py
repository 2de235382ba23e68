"""pixelmill's warm host: a process that has loaded Prefect and the flow code once, and forks a
child to run each `pixelmill run` (or `demo`) command sent to it.

Loading Prefect and the flows takes ~1.2 s of every command, the largest part of a re-run
that finds nothing new (docs/decisions.md, "A warm host for commands"). The host is one of
the local services pixelmill keeps, like its Prefect server and Ray: it starts with the
server (`pixelmill server start`, or the first run that starts the server) and
`pixelmill server stop` ends it. It costs 110-150 MB while it waits, and no CPU.

How a command is handed over (the other side is cli/launch.py, the `pixelmill` script):
- The host listens on a Unix socket in a folder of PIXELMILL_HOME that only this user can
  enter, and answers only this user's processes (the peer's uid is checked).
- The command sends its arguments, environment, working directory and umask, with its
  stdin, stdout and stderr themselves (file descriptors), so the child draws on the same
  terminal or writes into the same pipe.
- The host forks at once (it never runs a command itself, so every child starts from the
  same clean state) and the child takes over all of that, in a session of its own: stopping
  the host never stops a command under way. It answers with its pid; the command passes
  Ctrl-C and SIGTERM on to it and waits for its exit status. If the command is killed, the
  child is stopped too.
- The host declines, and the command runs by itself as before, when a Python source it has
  loaded changed since it started (it then exits, and the command starts a fresh one for
  the commands after it), or when the command's Python or what Python reads when it starts
  (PYTHONPATH, PYTHONIOENCODING, ... and LD_* variables) differ from the host's. It ends by itself when the server is gone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import threading
import types
from pathlib import Path

FOLDER = "warm"  # in PIXELMILL_HOME, mode 0700
SOCKET = "sock"
STATE = "warm.json"  # in PIXELMILL_HOME: pid and log of the running host
LOG = "warm.log"
# What the host loads before it waits: what every run needs and takes ~1.2 s to import.
PRELOAD = ("prefect", "prefect.flow_engine", "prefect.task_engine", "flows.process_images",
           "flows.ray_runner", "pixelmill.progress", "cli.main",
           # and what every run imports on first use: Prefect serializes a flow run's
           # parameters with FastAPI's encoder (~90 ms to import), and so on
           "fastapi.encoders", "prefect.utilities.visualization", "anyio._backends._asyncio",
           "anyio.streams.memory", "http.cookies", "encodings.idna", "pydantic.color",
           "rich._emoji_codes", "typer._adapters")
# What Python reads from the environment when it starts (import paths, I/O encoding and
# buffering, warnings, hashing, ...; PYTHONBREAKPOINT, read when used, is not one) and the
# dynamic loader's LD_* variables: a command whose values differ from the host's runs by
# itself.
STARTUP_ENV = frozenset({
    "PYTHONPATH", "PYTHONHOME", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONUSERBASE",
    "PYTHONPLATLIBDIR", "PYTHONOPTIMIZE", "PYTHONDEBUG", "PYTHONIOENCODING", "PYTHONUTF8",
    "PYTHONLEGACYWINDOWSSTDIO", "PYTHONUNBUFFERED", "PYTHONWARNINGS", "PYTHONDEVMODE",
    "PYTHONMALLOC", "PYTHONHASHSEED", "PYTHONINTMAXSTRDIGITS", "PYTHONFAULTHANDLER",
    "PYTHONTRACEMALLOC", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE", "PYTHONVERBOSE",
    "PYTHONCASEOK", "PYTHONEXECUTABLE", "PYTHONNODEBUGRANGES", "PYTHONPROFILEIMPORTTIME",
})
# Unix socket paths hold at most 107 bytes on Linux; a deeper home has no warm host.
SOCKET_PATH_MAX = 100
HEADER = struct.Struct("!I")  # the length of a JSON message that follows
# Seconds between the host's checks that the kept Prefect server it belongs to still runs.
CHECK_S = 10.0


def socket_path(base: Path) -> Path | None:
    path = base / FOLDER / SOCKET
    return path if len(os.fsencode(str(path))) <= SOCKET_PATH_MAX else None


def startup_env(environ) -> dict[str, str]:
    """The variables of `environ` that Python or the loader read at start-up."""
    return {key: value for key, value in environ.items()
            if key in STARTUP_ENV or key.startswith("LD_")}


def send_message(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    data = HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(conn, [data], fds)
        data = data[sent:]
    conn.sendall(data)


def _exactly(conn: socket.socket, size: int, first: bytes = b"") -> bytes:
    data = bytearray(first)
    while len(data) < size:
        piece = conn.recv(size - len(data))
        if not piece:
            raise EOFError("the other side closed the connection")
        data += piece
    return bytes(data)


def receive_message(conn: socket.socket, max_fds: int = 0) -> tuple[dict, list[int]]:
    """One message (and the file descriptors sent with its first bytes)."""
    fds: list[int] = []
    if max_fds:
        data, fds, _, _ = socket.recv_fds(conn, HEADER.size, max_fds)
        if not data:
            raise EOFError("the other side closed the connection")
    else:
        data = b""
    head = _exactly(conn, HEADER.size, data)
    (length,) = HEADER.unpack(head)
    return json.loads(_exactly(conn, length)), fds


# -- keeping it (the command line's side) ----------------------------------------------------

def _marker(base: Path) -> str:
    return f"cli.warm {base}"


def running(base: Path) -> dict | None:
    """The recorded host, if it still runs (its pid still runs the host for `base`)."""
    from cli.server import runs

    try:
        info = json.loads((base / STATE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and runs(int(info.get("pid", 0)),
                                                   _marker(base)) else None


def ensure_started(base: Path) -> dict | None:
    """Start the host for `base` unless one runs; does not wait for it to load (the next
    command uses it once it listens). None where a socket path there would be too long."""
    import subprocess

    from cli.server import locked, write_state

    base = base.absolute()
    if socket_path(base) is None:
        return None
    with locked(base, "warm.lock"):
        info = running(base)
        if info is not None:
            return info
        with (base / LOG).open("ab") as log_file:
            # -P: its folder is not put on sys.path; the host runs in PIXELMILL_HOME
            process = subprocess.Popen([sys.executable, "-P", "-m", "cli.warm", str(base)],
                                       stdout=log_file, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       cwd=base)
        info = {"pid": process.pid, "log": str(base / LOG)}
        write_state(base / STATE, info)
        return info


def stop(base: Path) -> dict | None:
    """Stop the host (commands it handed to children keep running); returns it if it ran."""
    from cli.server import locked, stop_pid

    base = base.absolute()
    with locked(base, "warm.lock"):
        info = running(base)
        if info is not None:
            stop_pid(int(info["pid"]), timeout=5.0)
        (base / STATE).unlink(missing_ok=True)
        path = socket_path(base)
        if path is not None:
            path.unlink(missing_ok=True)
        return info


# -- the host ---------------------------------------------------------------------------------

def _sources() -> dict[str, int]:
    """Every loaded module's source file and its mtime: a change means the host is stale."""
    found = {}
    for module in list(sys.modules.values()):
        if type(module) is not types.ModuleType:  # a lazy module: asking would load it (Ray)
            continue
        path = getattr(module, "__file__", None)
        if path and path not in found:
            try:
                found[path] = os.stat(path).st_mtime_ns
            except OSError:
                continue
    return found


def _stale(sources: dict[str, int]) -> str | None:
    for path, mtime in sources.items():
        try:
            if os.stat(path).st_mtime_ns != mtime:
                return path
        except OSError:
            return path
    return None


def serve(base: Path) -> None:
    """Load, listen, and fork a child per accepted command until stopped or stale."""
    import importlib

    from cli.server import BASE_ENV, QUIET_ENV

    for key, value in {**BASE_ENV, **QUIET_ENV}.items():  # as a command sets them
        os.environ.setdefault(key, value)
    for name in PRELOAD:
        importlib.import_module(name)
    importlib.import_module("PIL.Image").init()  # every image format's plugin
    importlib.import_module("tasks.prefect_costs").tls_context()  # built once, not per run
    command_line = importlib.import_module("cli.main")
    command_line.remember_logging()  # a child with other logging settings sets it up again
    command_line.settle_heap()  # also: children copy fewer pages
    sources = _sources()
    own_env = startup_env(os.environ)
    folder = base / FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    path = socket_path(base)
    if path is None:
        raise SystemExit(f"{folder} is too deep for a Unix socket")
    partial = folder / f"{SOCKET}.{os.getpid()}"
    partial.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(partial))
    listener.listen(64)
    os.replace(partial, path)  # commands see a socket that already answers, or none
    own = os.stat(path).st_ino  # a newer host may replace the file; then it is not ours
    os.chdir(folder)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print(f"warm host {os.getpid()} ready at {path}", flush=True)
    listener.settimeout(CHECK_S)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            if _server_gone(base):
                print("the Prefect server it came with is gone: exiting", flush=True)
                if _owns(path, own):
                    path.unlink(missing_ok=True)
                return
            continue
        conn.settimeout(None)
        fds: list[int] = []
        try:
            pid, uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != os.getuid():
                conn.close()
                continue
            conn.settimeout(5.0)  # a command sends its request at once
            request, fds = receive_message(conn, max_fds=3)
            conn.settimeout(None)
            changed = _stale(sources)
            declined = (f"{changed} changed since the host started" if changed else
                        "another Python or other import settings"
                        if len(fds) != 3 or request.get("python") != sys.executable
                        or startup_env(request.get("env", {})) != own_env else None)
            if declined:
                send_message(conn, {"declined": declined})
                fds = _close(fds)
                conn.close()
                print(f"declined a command of pid {pid}: {declined}", flush=True)
                if changed:  # the declined command starts a host with the new code
                    if _owns(path, own):
                        path.unlink(missing_ok=True)
                    return
                continue
            child = os.fork()
            if child == 0:
                listener.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                _child(conn, request, fds)  # never returns
            fds = _close(fds)  # the child has them
            print(f"command of pid {pid} handed to child {child}", flush=True)
        except (OSError, EOFError, ValueError) as exc:
            print(f"a command could not be handed over: {exc}", flush=True)
            _close(fds)  # received before the failure: the command keeps its own
        conn.close()


def _close(fds: list[int]) -> list[int]:
    """Close descriptors received from a command; returns none left to close."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    return []


def _server_gone(base: Path) -> bool:
    """Whether the Prefect server recorded in `base` (the one the host was started with) has
    stopped, or its home is gone: the host lives as long as the kept server, even when the
    server is ended some other way than `pixelmill server stop`."""
    from cli.server import _recorded
    from pixelmill.home import alive

    recorded = _recorded(base)
    return recorded is None or not alive(recorded.pid)


def _owns(path: Path, inode: int) -> bool:
    """Whether the socket file at `path` is still this host's (inode `inode`)."""
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Take over the command's streams, environment and folder, run it, send its status."""
    try:
        os.setsid()  # stopping the host (its process group) leaves this command running
        for number, fd in enumerate(fds):
            os.dup2(fd, number)
            os.close(fd)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        sys.argv = request["argv"]
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())
        import random

        random.seed()  # not the host's sequence, shared by every child
        send_message(conn, {"pid": os.getpid()})
    except BaseException as exc:  # noqa: BLE001 - nothing ran yet: the command runs by itself
        try:
            send_message(conn, {"declined": f"{type(exc).__name__}: {exc}"})
        finally:
            os._exit(0)

    def orphaned() -> None:  # the command that sent us was killed: stop, as it would have
        try:
            while conn.recv(64):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, name="pixelmill-warm-watch", daemon=True).start()

    def report(status: int) -> None:
        try:
            send_message(conn, {"exit": status})
        except OSError:
            pass

    # From here on the child is the command: its exit handlers run as they would in its own
    # process, and the last of them (cli.main's) reports the status and ends the process.
    from cli import main as cli_main

    cli_main.fresh_consoles()
    cli_main.main(on_exit=report)
    report(0)
    os._exit(0)


def main() -> None:
    base = Path(sys.argv[1]).absolute()
    serve(base)


if __name__ == "__main__":
    main()
