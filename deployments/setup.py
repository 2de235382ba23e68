"""Set up what prefect.yaml's deployments need on a Prefect server: work pools and blocks.

    python -m deployments.setup pools [--docker] [--cloud-run]
    python -m deployments.setup blocks [--service-account-file F] [--results-bucket B]

Values not given as options come from the environment (GOOGLE_APPLICATION_CREDENTIALS,
PIXELMILL_RESULTS_BUCKET), so CI and a shell profile can drive it the same way. The Prefect
API is PREFECT_API_URL (or the active Prefect profile's); when none answers, the command says
so in one line and exits 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

# Work pool names used by prefect.yaml and the variants in deployments/.
POOLS = {"process": "pixelmill-process", "docker": "pixelmill-docker",
         "cloud-run-v2": "pixelmill-cloud-run"}
CREDENTIALS_BLOCK = "pixelmill-gcp"
RESULTS_BLOCK = "pixelmill-results"
# Exit status when the Prefect API is not set or does not answer: a configuration problem.
EXIT_CONFIG = 2
START_HINT = 'eval "$(.venv/bin/pixelmill server start --no-ray)"'


def _require_api() -> str:
    """The Prefect API URL, checked to answer; otherwise one line and exit 2. Without a
    URL, Prefect would create the pools in a temporary server that is gone a moment later."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        _fail(f"PREFECT_API_URL is not set; start pixelmill's server with {START_HINT}, or "
              "export the URL of yours")
    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
    if problem is not None:
        _fail(f"the Prefect API at {url} (PREFECT_API_URL) does not answer "
              f"({type(problem).__name__}); start it ({START_HINT} for pixelmill's) or "
              "correct PREFECT_API_URL")
    return url


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_CONFIG)


def _prefect(*args: str) -> None:
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect if prefect.exists() else "prefect"), "--no-prompt", *args]
    result = subprocess.run(command, check=False)
    if result.returncode:
        typer.echo(f"error: `prefect {' '.join(args)}` exited with {result.returncode} "
                   "(its output is above)", err=True)
        raise typer.Exit(result.returncode)


@app.command()
def pools(
    docker: Annotated[bool, typer.Option("--docker", help="also a Docker work pool")] = False,
    cloud_run: Annotated[bool, typer.Option("--cloud-run", help="also a Cloud Run v2 pool")] = False,
) -> None:
    """Create (or update) the process work pool, and the Docker / Cloud Run ones if asked."""
    wanted = ["process"] + (["docker"] if docker else []) + (["cloud-run-v2"] if cloud_run else [])
    _require_api()
    for kind in wanted:
        _prefect("work-pool", "create", POOLS[kind], "--type", kind, "--overwrite")
        typer.echo(f"work pool {POOLS[kind]} ({kind}) ready")


@app.command()
def blocks(
    service_account_file: Annotated[Optional[Path], typer.Option(
        help="key file; default GOOGLE_APPLICATION_CREDENTIALS, else ADC")] = None,
    results_bucket: Annotated[Optional[str], typer.Option(
        help="bucket for chunk results; default PIXELMILL_RESULTS_BUCKET")] = None,
) -> None:
    """Register the GcpCredentials block (and a GcsBucket block for results if a bucket is
    named): the flow's `gcp_credentials_block` and `result_storage` parameters use them."""
    _require_api()
    import tasks.storage  # noqa: F401  (emulator: anonymous credentials for prefect-gcp)
    from prefect_gcp import GcpCredentials
    from prefect_gcp.cloud_storage import GcsBucket

    key_file = service_account_file or os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    credentials = GcpCredentials(service_account_file=key_file) if key_file else GcpCredentials()
    credentials.save(CREDENTIALS_BLOCK, overwrite=True)
    typer.echo(f"block gcp-credentials/{CREDENTIALS_BLOCK} saved "
               f"({'key file' if key_file else 'application default credentials'})")
    bucket = results_bucket or os.environ.get("PIXELMILL_RESULTS_BUCKET")
    if bucket:
        GcsBucket(bucket=bucket, gcp_credentials=credentials).save(RESULTS_BLOCK, overwrite=True)
        typer.echo(f"block gcs-bucket/{RESULTS_BLOCK} saved (bucket {bucket})")


if __name__ == "__main__":
    app()
