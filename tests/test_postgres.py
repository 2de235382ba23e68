"""pixelmill's Prefect server on PostgreSQL, as large installs run it: a real `postgres` (Debian's
postgresql, installed by `make test`) on a free loopback port, and a `pixelmill run` whose
embedded server is told to use it by PREFECT_SERVER_DATABASE_CONNECTION_URL. The run's flow run
and task runs are read back from the database itself."""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

from cli.server import free_port
from tests.helpers import load_report
from tests.test_cli import PIXELMILL

pytestmark = pytest.mark.slow


def _tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(
        f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, f"{name} not found: `make test` installs Debian's postgresql"
    return found


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the package's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


async def _query(url: str, sql: str) -> list:
    import asyncpg

    connection = await asyncpg.connect(url)
    try:
        return await connection.fetch(sql)
    finally:
        await connection.close()


def _wait_for(url: str, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(_query(url, "SELECT 1"))
            return
        except Exception:
            if process.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


@pytest.fixture()
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port; yields the `prefect` database's
    URL for asyncpg."""
    base = Path(tempfile.mkdtemp(prefix="pixelmill-pg-"))
    base.chmod(0o755)  # the postgres user reads its data folder under it
    data = base / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = free_port()
    subprocess.run(_as_postgres([_tool("initdb"), "-D", str(data), "-U", "postgres",
                                 "--auth=trust", "-E", "UTF8"]),
                   check=True, capture_output=True)
    server = subprocess.Popen(
        _as_postgres([_tool("postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1",
                      "-k", str(data)]),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    try:
        _wait_for(admin, server)
        asyncio.run(_query(admin, "CREATE DATABASE prefect"))
        yield f"postgresql://postgres@127.0.0.1:{port}/prefect"
    finally:
        os.killpg(server.pid, signal.SIGINT)  # PostgreSQL's "fast shutdown"
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(base, ignore_errors=True)


def test_a_run_on_a_prefect_server_backed_by_postgresql(postgres, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for number in range(4):
        Image.new("RGB", (64, 48), (number * 60, 90, 30)).save(source / f"p{number}.jpg")
    (source / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_API_URL", "RAY_ADDRESS"))}
    env.update(PIXELMILL_HOME=str(home), PREFECT_SERVER_DATABASE_CONNECTION_URL=postgres.replace(
        "postgresql://", "postgresql+asyncpg://"))
    try:
        result = subprocess.run([PIXELMILL, "run", str(source), str(tmp_path / "dst"),
                                 "--run-name", "pg", "--filter", "blur", "--runner", "threads"],
                                env=env, capture_output=True, text=True, timeout=600)
        # 1: the run finished with one image failed (the broken one)
        assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
        report = load_report(tmp_path / "dst/pg/report.json")
        assert report["counts"] == {"discovered": 5, "ok": 4, "failed": 1, "skipped": 0}
    finally:
        subprocess.run([PIXELMILL, "server", "stop"], env=env, capture_output=True, timeout=120)

    # what the UI shows came from PostgreSQL: the flow run, its state and its task runs
    [flow_run] = asyncio.run(_query(postgres, """
        SELECT fr.id, fr.state_type, f.name FROM flow_run fr JOIN flow f ON f.id = fr.flow_id"""))
    assert flow_run["name"] == "process-images" and flow_run["state_type"] == "COMPLETED"
    tasks = asyncio.run(_query(postgres, f"""
        SELECT name, state_type FROM task_run WHERE flow_run_id = '{flow_run["id"]}'"""))
    # task run names: the chunk's number, or Prefect's suffix for the one-off tasks
    names = {re.sub(r"-[0-9a-f]{3}$", "", task["name"]) for task in tasks}
    assert names == {"discover", "resize-chunk", "filter-chunk", "build-gallery"}, tasks
    assert {task["name"] for task in tasks} >= {"resize-chunk-000", "filter-chunk-000"}
    assert {task["state_type"] for task in tasks} == {"COMPLETED"}, tasks
    artifacts = asyncio.run(_query(postgres, "SELECT key FROM artifact WHERE key IS NOT NULL"))
    assert {"pixelmill-summary", "pixelmill-failures"} <= {a["key"] for a in artifacts}
    # and the embedded server kept no SQLite database of its own
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
