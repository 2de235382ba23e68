"""pixelmill's long-lived local Ray: started by the first `--runner ray` run, reused by the
next, each run's workers see that run's environment, and `pixelmill server stop` ends it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cli import localray
from cli.server import alive
from tests.conftest import ROOT
from tests.helpers import load_report

pytestmark = pytest.mark.slow
PIXELMILL = str(ROOT / ".venv/bin/pixelmill")

# As `pixelmill run --runner ray` connects: before Prefect is imported, its workers warmed
PROBE = """
import os, sys, ray
from cli import localray
from flows import kept_ray
info, started = localray.ensure()
kept_ray.connect(info.address, localray.job_env())
seen = ray.get(ray.remote(lambda: os.environ.get("PIXELMILL_PROBE")).remote())
print("prefect" in sys.modules, started, seen)
"""


def test_one_local_ray_serves_every_run_with_each_runs_environment(tmp_path, prefect_api):
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(PIXELMILL_HOME=str(home), PIXELMILL_PROBE="from-the-first-command")
    source = tmp_path / "src"
    source.mkdir()
    for number in range(4):
        Image.new("RGB", (320, 240), (60 * number, 90, 200)).save(source / f"{number}.jpg")
    # relative paths, as typed in a shell: the cluster's workers run in another folder
    run = [PIXELMILL, "run", "src", "dst", "--size", "64x48", "--runner", "ray"]
    try:
        first = subprocess.run([*run, "--run-name", "one"], env=env, capture_output=True,
                               text=True, timeout=300, cwd=tmp_path)
        assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
        assert "Ray: started a local cluster at 127.0.0.1:" in first.stderr
        info = json.loads((home / "ray.json").read_text())
        assert alive(info["pid"]) and info["python"] == sys.executable
        token = Path(info["token"])  # pixelmill's own token, for this user only
        assert token.parent == home and token.stat().st_mode & 0o777 == 0o600
        assert len(token.read_text()) == 64
        # its session files are its own (tmp_path is too deep for Ray's sockets: under /tmp),
        # so it is never the cluster a plain ray.init() on this machine joins
        temp = Path(info["temp_dir"])
        assert temp.parent.name.startswith("pixelmill-ray-")
        assert (temp / "ray_current_cluster").read_text().strip() == info["address"]

        second = subprocess.run([*run, "--run-name", "two"], env=env, capture_output=True,
                                text=True, timeout=300, cwd=tmp_path)
        assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
        assert "started a local cluster" not in second.stderr
        assert json.loads((home / "ray.json").read_text())["pid"] == info["pid"]
        for name in ("one", "two"):
            report = load_report(tmp_path / f"dst/{name}/report.json")
            assert report["counts"]["ok"] == 4, report["images"]

        # workers see the submitting command's variables, not those of the command that
        # happened to start the cluster
        probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                               env={**env, "PIXELMILL_PROBE": "from-this-command"},
                               timeout=300, cwd=ROOT)
        assert probe.returncode == 0, probe.stderr[-2000:]
        assert probe.stdout.split()[-3:] == ["False", "False", "from-this-command"]

        # a run with no Ray address that is not the CLI's (a deployment's flow run, the
        # module's __main__) uses the kept Ray too, and says so
        module = subprocess.run([sys.executable, "-m", "flows.process_images", "src", "dst3"],
                                env={**env, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "INFO"},
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        said = module.stdout + module.stderr
        assert module.returncode == 0, said[-3000:]
        assert f"Using pixelmill's local Ray at {info['address']}" in said, said[-3000:]
        assert "Connecting to an existing Ray instance at local" not in said
        assert load_report(tmp_path / "dst3" / next(iter(os.listdir(tmp_path / "dst3")))
                           / "report.json")["counts"]["ok"] == 4

        status = subprocess.run([PIXELMILL, "server", "status"], env=env, capture_output=True,
                                text=True, timeout=60)
        assert f"ray: pid {info['pid']}, address {info['address']}" in status.stdout

        check = subprocess.run([PIXELMILL, "check", "--storage", str(tmp_path)], env=env,
                               capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stdout + check.stderr[-2000:]
        assert "Ray ran a remote task" in check.stdout
    finally:
        stop = subprocess.run([PIXELMILL, "server", "stop"], env=env, capture_output=True,
                              text=True, timeout=120)
        localray.stop(home)  # in case the command above failed
    assert f"stopped ray pid {info['pid']}" in stop.stdout
    assert not alive(info["pid"]) and not (home / "ray.json").exists()
    assert not temp.parent.exists()


def test_job_env_keeps_only_what_a_run_needs():
    environ = {"PREFECT_API_URL": "u", "PIXELMILL_HOME": "h", "GOOGLE_CLOUD_PROJECT": "p",
               "STORAGE_EMULATOR_HOST": "e", "HOME": "/root", "RAY_ADDRESS": "a", "PATH": "/x"}
    assert localray.job_env(environ) == {"PREFECT_API_URL": "u", "PIXELMILL_HOME": "h",
                                         "GOOGLE_CLOUD_PROJECT": "p",
                                         "STORAGE_EMULATOR_HOST": "e"}
