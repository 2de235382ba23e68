"""`make bench` runs end to end on a tiny corpus and writes its JSON (no timing asserted)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def test_make_bench_on_a_tiny_corpus_writes_its_json(tmp_path, prefect_api):
    out = tmp_path / "speed.json"
    result = subprocess.run(
        ["make", "bench", "IMAGES=4", "SIZE=320x240",
         f"BENCH_ARGS=--rows ceiling,pred-seq,pm-seq --repeat 2 --out {out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["images"] == 4 and data["cores"] >= 1
    assert set(data["rows"]) == {"ceiling", "pred-seq", "pm-seq"}
    for row in data["rows"].values():
        assert row["images"] == 4 and row["seconds"] > 0 and row["images_per_s"] > 0
    assert data["rows"]["pm-seq"]["ok"] == 4 and data["rows"]["pm-seq"]["startup_s"] > 0
    # the rows the ratios compare run --repeat times and report their median run
    assert len(data["rows"]["ceiling"]["runs_s"]) == 2
    assert data["rows"]["ceiling"]["seconds"] in data["rows"]["ceiling"]["runs_s"]
    assert len(data["rows"]["pm-seq"]["runs_s"]) == 1
    assert "| kernel ceiling (mp pool) |" in result.stdout
