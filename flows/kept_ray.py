"""Finding the local Ray that pixelmill keeps running between commands (`pixelmill server
start` starts it: cli/localray.py), and joining it from this process; connecting a driver
to a Ray and warming its workers (`connect`), with no Prefect imported. Nothing here starts
the kept Ray.

It keeps to itself: drivers need its token and Ray's single-machine mode, which `join_running`
sets up for this process. Workers of a long-lived cluster inherit the environment of `ray
start`, not of the command that submits the work, so each run passes its own variables
(`job_env`) in its Ray job's runtime_env.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from pixelmill.home import home, runs

# Variables a run's workers must see as the submitting command has them (and nothing else:
# the rest of the environment is the same machine and user either way).
JOB_ENV_PREFIXES = ("PREFECT_", "PIXELMILL_", "GOOGLE_", "STORAGE_EMULATOR_HOST",
                    "CLOUD_RUN_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY",
                    "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")
# Ray's single-machine mode (its default on macOS and Windows). Otherwise Ray 2.60 replaces
# --node-ip-address 127.0.0.1 with the machine's external address and then binds its GCS,
# raylet, agents and client server on every interface. Drivers need it too: without it they
# turn 127.0.0.1:PORT into EXTERNAL_IP:PORT, where nothing listens.
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
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


def join_running(base: Path | None = None) -> RayInfo | None:
    """pixelmill's local Ray if it is up and runs this Python's code, with this process set
    up to connect to it; None otherwise (nothing is started)."""
    info = running(base)
    if info is None or info.python != sys.executable or not info.token or not info.temp_dir:
        return None
    _use(info)
    return info


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


def init_kwargs(env: dict[str, str] | None = None) -> dict:
    """What a pixelmill driver passes to `ray.init`: Ray's log lines stay in Ray's logs, and
    a run's workers get `env` (its `job_env`) in the job's runtime_env."""
    kwargs: dict = {"log_to_driver": False, "logging_level": logging.WARNING}
    if env:
        kwargs["runtime_env"] = {"env_vars": dict(env)}
    return kwargs


def warm_up() -> None:
    """Import what every chunk task needs (Prefect, pixelmill, Pillow), in a worker process
    that has not run one yet."""
    import tasks  # noqa: F401  (the import is the warm-up)


def warm_workers() -> None:
    """Have Ray start one worker per CPU and import the tasks' modules in it now; a new Ray
    job's workers otherwise start only when the first chunk arrives (~3 s on 2 busy cores).
    Nothing waits for these tasks."""
    import ray

    warm = ray.remote(num_cpus=1)(warm_up)
    for _ in range(int(ray.available_resources().get("CPU", 0))):
        warm.remote()


def connect(address: str, env: dict[str, str] | None = None) -> None:
    """Connect this process to the Ray at `address` and warm its workers (`warm_workers`),
    before Prefect is imported here: the workers start and import the tasks while this
    process imports Prefect and sets the flow run up (~1 s sooner than after the import).
    The flow's Ray task runner then finds Ray connected and uses it."""
    import ray

    if not ray.is_initialized():
        ray.init(address, **init_kwargs(env))
        warm_workers()
