"""Credentials never reach logs, artifacts, the report, the manifest or the gallery.

A made-up service account (a real RSA key, planted markers) is saved as a prefect-gcp
GcpCredentials block; its token endpoint is a loopback server of this test, and its client
talks to the emulator, so the whole credentials path runs: block -> signed JWT -> token ->
authorised requests. One upload is refused (403) so the error paths log too.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cli.server import free_port
from tests.test_gcs import upload_corpus

pytestmark = pytest.mark.slow
TOKEN = "ya29.planted-access-token-5f1d"
KEY_ID = "planted-key-id-8c0ffee"


class TokenServer(ThreadingHTTPServer):
    daemon_threads = True
    grants: list[str]


def token_server() -> TokenServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
            self.server.grants.append(body)
            data = json.dumps({"access_token": TOKEN, "expires_in": 3600,
                               "token_type": "Bearer"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = TokenServer(("127.0.0.1", free_port()), Handler)
    server.grants = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_planted_credentials_appear_nowhere(gcs, prefect_api, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter, ArtifactFilterFlowRunId, LogFilter, LogFilterFlowRunId,
    )
    from prefect_gcp import GcpCredentials

    from tests.test_cli import pixelmill

    tokens = token_server()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    secrets = [KEY_ID, TOKEN, pem.splitlines()[5], pem.splitlines()[-3]]
    info = {"type": "service_account", "project_id": "planted-project",
            "private_key_id": KEY_ID, "private_key": pem,
            "client_email": "pixelmill@planted-project.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": f"http://127.0.0.1:{tokens.server_port}/token"}
    GcpCredentials(service_account_info=info).save("planted-sa", overwrite=True)
    src, dst = gcs.bucket(gcs.unique("ssrc")), gcs.bucket(gcs.unique("sdst"))
    upload_corpus(src, "")
    gcs.forbidden_objects = {"s/resized/trips/"}  # an error path that logs, too
    result = pixelmill("run", f"gs://{src.name}", f"gs://{dst.name}", "--run-name", "s",
                       "--gcp-credentials-block", "planted-sa", "--runner", "threads",
                       "--filter", "blur", "--verbose")
    assert result.returncode == 1, result.stderr
    assert tokens.grants and "jwt-bearer" in tokens.grants[0]  # the block's key signed in
    authorised = [path for method, path in gcs.seen if method == "POST" and "/upload/" in path]
    assert authorised  # uploads happened with that client
    flow_run_id = re.search(r"runs/flow-run/([0-9a-f-]{36})", result.stderr)[1]
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        flow_run = client.read_flow_run(flow_run_id)
    assert any("permission denied (403)" in log.message for log in logs)  # errors were logged
    places = {
        "cli output": result.stdout + result.stderr,
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(str(artifact.data) + str(artifact.description)
                               for artifact in artifacts),
        "parameters": json.dumps(flow_run.parameters, default=str),
    }
    for blob in gcs.client.list_blobs(dst.name):
        if blob.name.endswith((".json", ".html")):
            places[blob.name] = blob.download_as_bytes().decode("utf-8", "replace")
    assert {"s/report.json", "s/manifest.json", "s/gallery/index.html"} <= set(places)
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"{secret[:12]}... found in {where}"
    tokens.shutdown()
