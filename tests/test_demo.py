"""The README's demo command on a fresh set-up: embedded Prefect server, local Ray, gallery."""

from __future__ import annotations

import re
import os
import subprocess

import pytest

from tests.conftest import ROOT
from tests.helpers import load_report

pytestmark = pytest.mark.slow


def test_make_demo_builds_the_gallery_with_its_own_server(tmp_path):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PREFECT_API_URL", "RAY_ADDRESS"))}
    env["PIXELMILL_HOME"] = str(tmp_path / "home")  # its own embedded server, not the session's
    dest = tmp_path / "demo"
    try:
        result = subprocess.run(["make", "demo", f"DEST={dest}"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "Prefect UI: http://127.0.0.1:" in result.stderr
        runs = list((dest / "runs").iterdir())
        assert len(runs) == 1
        report = load_report(runs[0] / "report.json")
        assert report["counts"]["discovered"] >= 24
        assert report["counts"]["ok"] == report["counts"]["discovered"]
        assert report["spec"]["filters"] == ["blur", "sharpen", "contour", "emboss"]
        page = (runs[0] / "gallery/index.html").read_text()
        assert len(re.findall(r'<figure id="f\d+" class="ok">', page)) == report["counts"]["ok"]
        assert f"file://{runs[0]}/gallery/index.html" in result.stdout
        # the demo shows the Ray runner with its resource-tagged stages, and says so
        assert "runner: ray (the demo's default" in result.stdout
        assert report["runner"]["name"] == "ray"
        # the embedded server is still up for the UI, and the README's stop command ends it
        status = subprocess.run([str(ROOT / ".venv/bin/pixelmill"), "server", "status"],
                                env=env, capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "running" in status.stdout
        assert "ray: pid" in status.stdout  # and the local Ray the demo's run started
    finally:
        stop = subprocess.run([str(ROOT / ".venv/bin/pixelmill"), "server", "stop"], env=env,
                              capture_output=True, text=True, timeout=60)
    assert "stopped pid" in stop.stdout and "stopped ray pid" in stop.stdout
    after = subprocess.run([str(ROOT / ".venv/bin/pixelmill"), "server", "status"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 1
