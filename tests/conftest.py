"""Session-wide real services: one `prefect server start` and one local Ray, started lazily.

The API URL is chosen and exported at import time, before Prefect reads its settings, so
every Prefect import in this process and in Ray workers talks to the same real server.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import server, warm

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="pixelmill-tests-"))
_PORT = server.free_port()
_GCS_PROXY_PORT = server.free_port()
os.environ["PIXELMILL_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "client")
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PORT}/api"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
os.environ["PREFECT_LOGGING_EXTRA_LOGGERS"] = "pixelmill"
# Every GCS client in this session (here and in Ray workers) goes through the fault proxy,
# which passes requests through to the emulator unless a test asks for faults.
os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{_GCS_PROXY_PORT}"
os.environ.pop("RAY_ADDRESS", None)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session", autouse=True)
def no_local_ray_left_behind() -> Iterator[None]:
    """A `--runner ray` command in a test starts pixelmill's long-lived Ray under the session
    home unless the test stops it; stop it with the session either way."""
    yield
    from cli import localray

    localray.stop(_SESSION_HOME)


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server process on a free loopback port for the whole session."""
    info = server.start(base=_SESSION_HOME / "server", port=_PORT)
    try:
        yield info.url
    finally:
        _drain_prefect_workers()  # what they hold goes now, not at exit to a stopped server
        server.stop_pid(info.pid)
        warm.stop(_SESSION_HOME / "server")  # commands run with it as pixelmill's own start one


def _drain_prefect_workers() -> None:
    try:
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
        EventsWorker.drain_all(timeout=10)
    except Exception:  # draining is a courtesy to the server; never a test failure
        pass


@pytest.fixture(scope="session")
def ray_cluster(prefect_api: str) -> Iterator[dict[str, float]]:
    """A real local Ray with 2 CPUs and one *logical* GPU (no GPU here: Ray only counts it)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             log_to_driver=False, logging_level="WARNING")
    try:
        yield dict(ray.cluster_resources())
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def gcs_server() -> Iterator:
    """A real fake-gcs-server (from its PyPI wheel) behind the session's fault proxy."""
    from cli.emulator import Emulator
    from tests.faultproxy import FaultProxy

    with Emulator() as emulator:
        proxy = FaultProxy(emulator.url, _GCS_PROXY_PORT).start()
        try:
            yield proxy
        finally:
            proxy.stop()


@pytest.fixture()
def gcs(gcs_server):
    """The proxy, reset to pass-through after each test; `gcs.bucket(name)` makes a bucket."""
    import itertools

    from google.api_core.exceptions import Conflict

    from pixelmill.gcs import default_client

    counter = itertools.count()
    client = default_client(os.environ["STORAGE_EMULATOR_HOST"])

    def bucket(name: str):
        try:
            return client.create_bucket(name)
        except Conflict:
            return client.bucket(name)

    gcs_server.reset()
    gcs_server.bucket = bucket
    gcs_server.client = client
    gcs_server.unique = lambda prefix: f"{prefix}-{next(counter)}-{os.getpid()}"
    yield gcs_server
    gcs_server.reset()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
