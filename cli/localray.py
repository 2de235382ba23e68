"""The local Ray that pixelmill keeps running between commands, like its Prefect server.

Starting Ray inside every command costs seconds before the flow can start and after it ends;
connecting to a running one is a fraction of that (docs/decisions.md, "A local Ray kept
between commands"). So `pixelmill run` with `--runner ray` and no Ray address starts
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

import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from flows.kept_ray import (  # noqa: F401  (the finding side, shared)
    JOB_ENV_PREFIXES, SINGLE_MACHINE_ENV, RayInfo, _answers, _auth_env, _marker, _recorded,
    _state_file, _use, join_env, join_running, job_env, running,
)
from cli.server import (free_port, group_members, home, locked, mentions, runs,
                              start_detached, stop_pid, venv_tool, write_state)

START_TIMEOUT_S = 120.0
PREFERRED_PORT = 6390
# A node draining after SIGTERM waits up to 30 s for work; a local cluster pixelmill owns is
# idle when stopped, so it gets a few seconds before its process group is killed.
STOP_GRACE_S = 5.0
READY_LINE = "Ray runtime started"
LOCK_FILE = "ray.lock"
# Token authentication (Ray's default for local clusters since 2.59), with pixelmill's own
# token file: `ray start` does not create one, and ~/.ray is the user's.
TOKEN_FILE = "ray-auth-token"
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


def _token(base: Path) -> Path:
    """pixelmill's token file (256 random bits, readable by this user only), written the
    first time."""
    token = base / TOKEN_FILE
    if not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    return token


