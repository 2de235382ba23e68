"""The local Ray that pixelmill keeps running between commands, like its Prefect server.

Starting Ray inside every command cost 4-5 s before the flow could start and 2-3 s of
shutdown after it on 2 cores; connecting to a running one costs about 0.7 s and leaving it
0.3 s (bench/speed.py). So `pixelmill run` with `--runner ray` and no Ray address starts
`ray start --head --block` once, on loopback, in its own process group, writes it down in
PIXELMILL_HOME/ray.json, and later commands connect to it. `pixelmill server stop` ends it.

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
import signal
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from pixelmill.server import alive, free_port, home, start_detached, stop_pid, venv_tool

START_TIMEOUT_S = 120.0
PREFERRED_PORT = 6390
# A node draining after SIGTERM waits up to 30 s for work; a local cluster pixelmill owns is
# idle when stopped, so it gets a few seconds before its process group is killed.
STOP_GRACE_S = 5.0
READY_LINE = "Ray runtime started"
# Variables a run's workers must see as the submitting command has them (and nothing else:
# the rest of the environment is the same machine and user either way).
JOB_ENV_PREFIXES = ("PREFECT_", "PIXELMILL_", "GOOGLE_", "STORAGE_EMULATOR_HOST",
                    "CLOUD_RUN_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY",
                    "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
# Token authentication (Ray's default for local clusters since 2.59), with pixelmill's own
# token file: `ray start` does not create one, and ~/.ray is the user's.
TOKEN_FILE = "ray-auth-token"


@dataclass
class RayInfo:
    address: str  # 127.0.0.1:PORT, the GCS address drivers connect to
    pid: int  # `ray start --block`, leader of the cluster's process group
    log: str
    python: str  # the interpreter the cluster's workers run
    token: str = ""  # the token file drivers authenticate with


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


def running(base: Path | None = None) -> RayInfo | None:
    """The Ray cluster pixelmill started earlier, if it is still up and answering."""
    info = _recorded(base)
    return info if info and alive(info.pid) and _answers(info.address) else None


def job_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a run passes to its workers (see JOB_ENV_PREFIXES)."""
    environ = os.environ if environ is None else environ
    return {key: value for key, value in environ.items() if key.startswith(JOB_ENV_PREFIXES)}


def start(base: Path | None = None, port: int | None = None,
          timeout: float = START_TIMEOUT_S) -> RayInfo:
    """`ray start --head --block` on loopback; returns once the cluster accepts drivers."""
    base = base or home()
    base.mkdir(parents=True, exist_ok=True)
    port = port or free_port(PREFERRED_PORT)
    log_path = base / "ray.log"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(JOB_ENV_PREFIXES) and key != "RAY_ADDRESS"}
    auth = _auth_env(base)
    env.update(auth)
    command = [venv_tool("ray"), "start", "--head", "--block", "--port", str(port),
               "--node-ip-address", "127.0.0.1", "--include-dashboard=false",
               "--disable-usage-stats"]
    address = f"127.0.0.1:{port}"
    offset = log_path.stat().st_size if log_path.exists() else 0

    def ready() -> bool:
        with log_path.open("rb") as log:
            log.seek(offset)
            return READY_LINE.encode() in log.read() and _answers(address)

    pid = start_detached(command, env, log_path, ready, timeout, "ray start", cwd=base,
                         stop_timeout=STOP_GRACE_S)
    info = RayInfo(address=address, pid=pid, log=str(log_path), python=sys.executable,
                   token=auth["RAY_AUTH_TOKEN_PATH"])
    _state_file(base).write_text(json.dumps(asdict(info)))
    return info


def stop(base: Path | None = None) -> RayInfo | None:
    """Stop the Ray cluster pixelmill started (if any); returns what was stopped."""
    info = _recorded(base)
    if info is None:
        return None
    if alive(info.pid):
        stop_pid(info.pid, timeout=STOP_GRACE_S)
    try:  # members of the group still draining after their leader left
        os.killpg(info.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _state_file(base or home()).unlink(missing_ok=True)
    return info


def ensure(base: Path | None = None) -> tuple[RayInfo, bool]:
    """The running pixelmill Ray (started if needed) and whether it was started now.

    Sets this process up to connect to it (token authentication)."""
    info = running(base)
    started = False
    if info is not None and (info.python != sys.executable or not info.token):
        stop(base)  # another venv's cluster would run this run's tasks with its own code
        info = None
    if info is None:
        info, started = start(base), True
    _use_token_auth(info.token)
    return info, started


def _auth_env(base: Path) -> dict[str, str]:
    """The variables that make Ray use token authentication with pixelmill's token (256 random
    bits, readable by this user only), written the first time."""
    token = base / TOKEN_FILE
    if not token.exists():
        token.touch(mode=0o600)
        token.write_text(secrets.token_hex(32))
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}


def _use_token_auth(token: str) -> None:
    """Drivers of this process authenticate with the cluster's token. Ray reads its settings
    once, at import: if it is imported already, refresh them as Ray's own token set-up does."""
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token})
    if "ray._raylet" in sys.modules:
        from ray._raylet import Config

        Config.initialize("")
