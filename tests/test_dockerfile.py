"""The Dockerfile, checked without a Docker engine (none runs here, and the base image's
registry is unreachable, so buildah/podman cannot pull FROM either): its rules are read, and
its COPY / RUN steps are replayed into a fresh virtual environment whose entrypoints must work.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
# RUN steps the replay leaves out: they change the system (users), not Python.
SYSTEM_ONLY = ("useradd", "groupadd", "chown", "apt-get")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    steps = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            steps.append((word.upper(), rest.strip()))
    return steps


def test_dockerfile_rules():
    steps = instructions()
    base = steps[0]
    assert base[0] == "FROM"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base[1]), base
    copies = [args for word, args in steps if word == "COPY"]
    runs = [index for index, (word, args) in enumerate(steps) if word == "RUN" and "pip install -r" in args]
    first_code = min(index for index, (word, args) in enumerate(steps)
                     if word == "COPY" and re.search(r"\b(pixelmill|tasks|flows|cli)\b", args))
    assert runs and runs[0] < first_code, "dependencies must be installed before the code is copied"
    assert "constraints.txt" in " ".join(copies) and "-c constraints.txt" in steps[runs[0]][1]
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert any(word == "ENTRYPOINT" for word, _ in steps)


@pytest.mark.slow
def test_replaying_the_dockerfile_gives_working_entrypoints(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv}/bin:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    entrypoint: list[str] = []
    command: list[str] = []
    skipped = []
    for word, args in instructions():
        if word == "ENV":
            for key, value in re.findall(r"(\w+)=(\S+)", args):
                env[key] = value
        elif word == "COPY":
            *sources, target = shlex.split(args)
            destination = app if target in ("./", ".") else app / target
            for source in sources:
                path = ROOT / source
                if path.is_dir():
                    shutil.copytree(path, destination, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy2(path, destination if target.endswith("/") else destination)
        elif word == "RUN":
            if args.split()[0] in SYSTEM_ONLY:
                skipped.append(args)
                continue
            result = subprocess.run(["bash", "-c", args], cwd=app, env=env, capture_output=True,
                                    text=True, timeout=900)
            assert result.returncode == 0, f"RUN {args}\n{result.stderr[-3000:]}"
        elif word == "ENTRYPOINT":
            entrypoint = [part.replace("/app", str(app)) for part in eval(args)]  # JSON form
        elif word == "CMD":
            command = eval(args)
    assert skipped == ["useradd --create-home --uid 10001 pixelmill"]
    env["PIXELMILL_HOME"] = str(tmp_path / "home")
    # the default command, as `docker run IMAGE` would run it
    shown = subprocess.run(entrypoint + command, env=env, capture_output=True, text=True,
                           cwd=tmp_path, timeout=120)
    assert shown.returncode == 0 and "pixelmill" in shown.stdout, shown.stderr
    # what a Prefect Docker / Cloud Run work pool runs, and prefect.yaml's flow entrypoint
    for args in (["prefect", "flow-run", "execute", "--help"],
                 ["python", "-c", "from prefect.flows import load_flow_from_entrypoint as load;"
                  "print(load('flows.process_images:process_images').name)"],
                 ["python", "-c", "import cli.main, tasks, flows.process_images, "
                  "deployments.setup, pixelmill.gcs; print('imports ok')"]):
        result = subprocess.run(entrypoint + args, env=env, capture_output=True, text=True,
                                cwd=app, timeout=300)  # WORKDIR /app
        assert result.returncode == 0, (args, result.stderr[-2000:])
    installed = subprocess.run([str(venv / "bin/python"), "-c",
                                "import pixelmill, os; print(pixelmill.__file__)"],
                               env=env, capture_output=True, text=True, cwd=tmp_path)
    assert str(venv) in installed.stdout  # the package in the image, not this checkout
