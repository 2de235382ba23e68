"""Serve one run folder's gallery on a loopback port, from a local folder or a bucket.

A browser will not open a `file://` link from the Prefect UI, and a bucket's gallery needs
credentials the browser does not have; a small HTTP server of the user's own, on 127.0.0.1,
shows either exactly as the page was written (its links are relative to the run folder).
"""

from __future__ import annotations

import mimetypes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from pixelmill.errors import UsageError
from pixelmill.storage import Storage, safe_key
from pixelmill.storages import open_storage

INDEX = "gallery/index.html"


def open_run(run_uri: str) -> tuple[Storage, str]:
    """The storage of a run folder (`DEST/RUN`) and its gallery page (a sharded run has one
    per shard: the first), refused unless it holds one."""
    storage = open_storage(run_uri.rstrip("/"), destination=True)
    pages = sorted(info.key for info in storage.list("gallery/")
                   if info.key.startswith("gallery/index") and info.key.endswith(".html"))
    if not pages:
        raise UsageError(f"{run_uri}: no {INDEX} there; give a run folder, DEST/RUN (the "
                         "folder that holds report.json)")
    return storage, (INDEX if INDEX in pages else pages[0])


def make_server(storage: Storage, port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:`port` (0: any free port) that answers GET with the run
    folder's objects; nothing outside the run folder can be asked for."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            path = unquote(urlsplit(self.path).path).lstrip("/")
            if not path:
                self.send_response(302)
                self.send_header("Location", "/" + INDEX)
                self.end_headers()
                return
            try:
                data = storage.read(safe_key(path))
            except (FileNotFoundError, IsADirectoryError, ValueError):
                self.send_error(404, "not in this run folder")
                return
            kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            pass  # the command prints the address; requests are not news

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)
