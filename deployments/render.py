"""Write the per-environment variants of prefect.yaml (Docker, Cloud Run v2) from it.

    python -m deployments.render          # rewrite deployments/*.prefect.yaml
    python -m deployments.render --check  # exit 1 if they are out of date (a test runs this)

The deployments are declared once, in prefect.yaml; a variant changes only where the code
comes from (the image, not this checkout) and which work pool runs it.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HEADER = ("# GENERATED from prefect.yaml by `python -m deployments.render`: edit prefect.yaml.\n"
          "# Use: prefect --no-prompt deploy --all --prefect-file {name}\n"
          "# The image is PIXELMILL_IMAGE (built from the Dockerfile and pushed by you).\n")
IMAGE = "{{ $PIXELMILL_IMAGE }}"
VARIANTS = {
    "docker": {"name": "pixelmill-docker",
               "job_variables": {"image": IMAGE, "image_pull_policy": "IfNotPresent"}},
    "cloud-run": {"name": "pixelmill-cloud-run",
                  "job_variables": {"image": IMAGE, "cpu": "2000m", "memory": "4Gi",
                                    "credentials": "{{ prefect.blocks.gcp-credentials.pixelmill-gcp }}"}},
}


def render(kind: str) -> str:
    base = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    config = copy.deepcopy(base)
    config.pop("definitions", None)
    config["build"] = [step for step in base["build"]
                       if "checkout" not in str(step)]  # no checkout: the code is in the image
    config["pull"] = [{"prefect.deployments.steps.set_working_directory": {"directory": "/app"}}]
    pool = VARIANTS[kind]
    for deployment in config["deployments"]:
        env = deployment["work_pool"].get("job_variables", {}).get("env", {})
        deployment["work_pool"] = {
            "name": pool["name"], "work_queue_name": "default",
            "job_variables": {**pool["job_variables"], "env": env},
        }
    name = f"deployments/{kind}.prefect.yaml"
    return HEADER.format(name=name) + yaml.dump(config, Dumper=_Plain, sort_keys=False, width=100)


class _Plain(yaml.SafeDumper):
    def ignore_aliases(self, data: object) -> bool:
        return True  # write every value out: the file is read by people


def main() -> int:
    stale = []
    for kind in VARIANTS:
        path = ROOT / "deployments" / f"{kind}.prefect.yaml"
        text = render(kind)
        if "--check" in sys.argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m deployments.render")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
