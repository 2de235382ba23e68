"""The local Ray that pixelmill keeps running between commands, like its Prefect server.

Starting Ray inside every command cost 4-5 s before the flow could start and 2-3 s of
shutdown after it on 2 cores; connecting to a running one costs about 0.7 s and leaving it
0.3 s (bench/speed.py). So `pixelmill run` with `--runner ray` and no Ray address starts
`ray start --head --block` once, in its own process group, writes it down in
PIXELMILL_HOME/ray.json, and later commands connect to it. `pixelmill server stop` ends it.

It keeps to itself: every port it listens on is on 127.0.0.1, drivers need its token, and its
session files live in a temp dir of its own, so it is never the machine's "current cluster"
that a plain `ray.init()` elsewhere would join. Commands that start it at the same time take
turns under a lock in PIXELMILL_HOME: one starts it, the others use it.

Workers of a long-lived cluster inherit the environment of `ray start`, not of the command
that submits the work. So the cluster starts with pixelmill's settings variables removed, and
each run passes its own (`job_env`) in its Ray job's runtime_env: a run sees the Prefect API,
GCS emulator and credentials of the command that started it, never those of an earlier one.
The cluster is reused only from the same Python (the same venv); otherwise it is replaced.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pixelmill.server import (free_port, group_members, home, locked, mentions, runs,
                              start_detached, stop_pid, venv_tool, write_state)

START_TIMEOUT_S = 120.0
PREFERRED_PORT = 6390
# A node draining after SIGTERM waits up to 30 s for work; a local cluster pixelmill owns is
# idle when stopped, so it gets a few seconds before its process group is killed.
STOP_GRACE_S = 5.0
READY_LINE = "Ray runtime started"
LOCK_FILE = "ray.lock"
# Variables a run's workers must see as the submitting command has them (and nothing else:
# the rest of the environment is the same machine and user either way).
JOB_ENV_PREFIXES = ("PREFECT_", "PIXELMILL_", "GOOGLE_", "STORAGE_EMULATOR_HOST",
                    "CLOUD_RUN_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY",
                    "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
# Token authentication (Ray's default for local clusters since 2.59), with pixelmill's own
# token file: `ray start` does not create one, and ~/.ray is the user's.
TOKEN_FILE = "ray-auth-token"
# Ray's single-machine mode (its default on macOS and Windows). Otherwise Ray 2.60 replaces
# --node-ip-address 127.0.0.1 with the machine's external address and then binds its GCS,
# raylet, agents and client server on every interface. Drivers need it too: without it they
# turn 127.0.0.1:PORT into EXTERNAL_IP:PORT, where nothing listens.
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Ray puts its unix sockets at TEMP/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store
# (and raylet); such a path may have 103 bytes at most on macOS, 107 on Linux.
SOCKET_PATH_MAX = 103
SOCKET_PATH_TAIL = len("/session_YYYY-MM-DD_hh-mm-ss_uuuuuu_PPPPPPP/sockets/plasma_store.N")
# Ray makes its temp dir world-writable, so it is a folder inside one that is this user's
# only: PIXELMILL_HOME/ray, or a fresh /tmp/pixelmill-ray-* when the home is too deep for the
# sockets (/tmp is short everywhere).
PRIVATE_DIR = "ray"
RAY_TEMP_DIR = "tmp"
SHORT_TEMP_ROOT = Path("/tmp")
SHORT_TEMP_PREFIX = "pixelmill-ray-"


@dataclass
class RayInfo:
    address: str  # 127.0.0.1:PORT, the GCS address drivers connect to
    pid: int  # `ray start --block`, leader of the cluster's process group
    log: str
    python: str  # the interpreter the cluster's workers run
    token: str = ""  # the token file drivers authenticate with
    temp_dir: str = ""  # the cluster's session files (sockets, logs), removed when it stops

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])


def _state_file(base: Path) -> Path:
    return base / "ray.json"


def _recorded(base: Path | None) -> RayInfo | None:
    try:
        return RayInfo(**json.loads(_state_file(base or home()).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _answers(address: str, timeout: float = 2.0) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _marker(port: int) -> str:
    """What the command line of pixelmill's `ray start` on `port` contains."""
    return f"start --head --block --port {port}"


def running(base: Path | None = None) -> RayInfo | None:
    """The Ray cluster pixelmill started earlier, if it is still up and answering."""
    info = _recorded(base)
    if info and runs(info.pid, _marker(info.port)) and _answers(info.address):
        return info
    return None


def job_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a run passes to its workers (see JOB_ENV_PREFIXES)."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if key.startswith(JOB_ENV_PREFIXES)}


def join_env(info: RayInfo) -> dict[str, str]:
    """What another program sets to join this cluster on purpose (a plain `ray.init()` then
    connects to it): its address, its token, and Ray's single-machine mode."""
    return {"RAY_ADDRESS": info.address, **_auth_env(info.token), **SINGLE_MACHINE_ENV}


def temp_dir(base: Path) -> Path:
    """Where a new cluster keeps its session files (see PRIVATE_DIR). Never Ray's shared
    /tmp/ray, where the cluster would become the machine's default for a plain ray.init()."""
    private = base.resolve() / PRIVATE_DIR
    if len(str(private / RAY_TEMP_DIR).encode()) + SOCKET_PATH_TAIL > SOCKET_PATH_MAX:
        private = Path(tempfile.mkdtemp(prefix=SHORT_TEMP_PREFIX, dir=SHORT_TEMP_ROOT))
    private.mkdir(mode=0o700, exist_ok=True)
    private.chmod(0o700)
    return private / RAY_TEMP_DIR


def remove_temp_dir(base: Path, path: Path) -> None:
    """Remove a cluster's temp dir with its private folder, if `temp_dir(base)` made them (a
    damaged record must not name any other folder)."""
    private = path.parent
    if path.name == RAY_TEMP_DIR and (private == base.resolve() / PRIVATE_DIR or (
            private.parent == SHORT_TEMP_ROOT and private.name.startswith(SHORT_TEMP_PREFIX))):
        shutil.rmtree(private, ignore_errors=True)


def start(base: Path | None = None, port: int | None = None,
          timeout: float = START_TIMEOUT_S) -> RayInfo:
    """`ray start --head --block` on loopback; returns once the cluster accepts drivers."""
    base = (base or home()).absolute()
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port(PREFERRED_PORT)
    log_path = base / "ray.log"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(JOB_ENV_PREFIXES) and key != "RAY_ADDRESS"}
    token = _token(base)
    env.update(_auth_env(token), **SINGLE_MACHINE_ENV)
    temp = temp_dir(base)
    # The client server's port is chosen here: its default, 10001, is shared by every Ray on
    # the machine, and gRPC's SO_REUSEPORT lets two clusters listen on it at once. The
    # dashboard agent picks its own (0) instead of the shared default.
    command = [venv_tool("ray"), "start", "--head", "--block", "--port", str(port),
               "--node-ip-address", "127.0.0.1", "--ray-client-server-port", str(free_port()),
               "--dashboard-agent-listen-port", "0", "--temp-dir", str(temp),
               "--include-dashboard=false", "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    offset = log_path.stat().st_size if log_path.exists() else 0

    def ready(pid: int) -> bool:
        with log_path.open("rb") as log:
            log.seek(offset)
            return READY_LINE.encode() in log.read() and _answers(address)

    try:
        pid = start_detached(command, env, log_path, ready, timeout, "ray start", cwd=base,
                             stop_timeout=STOP_GRACE_S)
    except RuntimeError:
        remove_temp_dir(base, temp)
        raise
    info = RayInfo(address=address, pid=pid, log=str(log_path), python=sys.executable,
                   token=str(token), temp_dir=str(temp))
    write_state(_state_file(base), asdict(info))
    return info


def _stop(base: Path) -> RayInfo | None:
    """Stop the recorded cluster and whatever is left of it, remove its temp dir and forget
    it; returns it if it ran. A record whose pid now belongs to another program (after a
    reboot) is only forgotten."""
    info = _recorded(base)
    if info is None:
        return None
    ran = runs(info.pid, _marker(info.port))
    if ran:
        stop_pid(info.pid, timeout=STOP_GRACE_S)
    # Members of the group still draining after their leader left: ours if we just stopped
    # the leader, or if they carry the cluster's token (a group outlives its leader's crash).
    if ran or any(mentions(pid, info.token or info.temp_dir or str(base))
                  for pid in group_members(info.pid)):
        try:
            os.killpg(info.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + STOP_GRACE_S
        while group_members(info.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    if info.temp_dir:
        remove_temp_dir(base, Path(info.temp_dir))
    _state_file(base).unlink(missing_ok=True)
    return info if ran else None


def stop(base: Path | None = None) -> RayInfo | None:
    """Stop the Ray cluster pixelmill started (if any); returns what was stopped."""
    base = base or home()
    with locked(base, LOCK_FILE):
        return _stop(base)


def ensure(base: Path | None = None) -> tuple[RayInfo, bool]:
    """The running pixelmill Ray (started if needed) and whether it was started now.

    Sets this process up to connect to it (token authentication, single-machine mode)."""
    base = base or home()
    with locked(base, LOCK_FILE):
        info = running(base)
        # another venv's cluster would run this run's tasks with its own code; one without a
        # token or temp dir of its own is of a kind that other programs could join
        if info is not None and (info.python != sys.executable or not info.token
                                 or not info.temp_dir):
            info = None
        started = info is None
        if started:
            _stop(base)
            info = start(base)
    _use(info)
    return info, started


def join_running(base: Path | None = None) -> RayInfo | None:
    """pixelmill's local Ray if it is up and runs this Python's code, with this process set
    up to connect to it; None otherwise (nothing is started)."""
    info = running(base)
    if info is None or info.python != sys.executable or not info.token or not info.temp_dir:
        return None
    _use(info)
    return info


def _token(base: Path) -> Path:
    """pixelmill's token file (256 random bits, readable by this user only), written the
    first time."""
    token = base / TOKEN_FILE
    if not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    return token


def _auth_env(token: str | Path) -> dict[str, str]:
    """The variables that make Ray use token authentication with the token in `token`."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def _use(info: RayInfo) -> None:
    """Drivers of this process connect to the cluster: its token and single-machine mode. Ray
    reads both once, at import: if it is imported already, refresh them (the token as Ray's
    own token set-up does)."""
    os.environ.update(_auth_env(info.token), **SINGLE_MACHINE_ENV)
    if "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")
