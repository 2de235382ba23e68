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

from pixelmill import server

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="pixelmill-tests-"))
_PORT = server.free_port()
os.environ["PIXELMILL_HOME"] = str(_SESSION_HOME)
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "client")
os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{_PORT}/api"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
os.environ.pop("RAY_ADDRESS", None)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """A real Prefect server process on a free loopback port for the whole session."""
    info = server.start(base=_SESSION_HOME / "server", port=_PORT)
    try:
        yield info.url
    finally:
        server.stop_pid(info.pid)


@pytest.fixture(scope="session")
def ray_cluster(prefect_api: str) -> Iterator[dict[str, float]]:
    """A real local Ray with 2 CPUs and one *logical* GPU (no GPU here: Ray only counts it)."""
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    try:
        yield dict(ray.cluster_resources())
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS
