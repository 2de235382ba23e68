"""One TLS context per process for Prefect's API clients.

Prefect builds a new `ssl.SSLContext` for every API client it creates, and with it parses
certifi's bundle of ~150 CA certificates: ~30 ms of CPU each on this machine. A task run in
a Ray or process-pool worker creates two clients (one for the context it is handed, one for
its engine), so a run of 20 chunk tasks spent ~1.2 s of its workers' CPU on certificates
(docs/decisions.md, "One TLS context per process for Prefect's clients").

Prefect uses an `SSLContext` given as `httpx_settings["verify"]` as it is. `share()` makes
every client of this process that is not given one get a shared context, built the way Prefect
builds it from the same settings (PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
PREFECT_API_SSL_CERT_FILE), once for each distinct setting. One context serves any number of
clients, threads and connections.
"""

from __future__ import annotations

import functools
import ssl
import threading
from typing import Any

_contexts: dict[tuple[bool, str], ssl.SSLContext] = {}
_lock = threading.Lock()


def tls_context() -> ssl.SSLContext:
    """The context Prefect would build for a client now (same settings), built once."""
    import certifi
    from prefect.settings import PREFECT_API_SSL_CERT_FILE, PREFECT_API_TLS_INSECURE_SKIP_VERIFY

    key = (bool(PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value()),
           PREFECT_API_SSL_CERT_FILE.value() or certifi.where())
    context = _contexts.get(key)
    if context is None:
        with _lock:
            context = _contexts.get(key)
            if context is None:
                if key[0]:  # as Prefect: an unverified context for insecure connections
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                else:
                    context = ssl.create_default_context(cafile=key[1])
                _contexts[key] = context
    return context


def _with_shared_context(init):
    @functools.wraps(init)
    def __init__(self, api: Any, *args: Any, httpx_settings: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if not isinstance((httpx_settings or {}).get("verify"), ssl.SSLContext):
            httpx_settings = {**(httpx_settings or {}), "verify": tls_context()}
        init(self, api, *args, httpx_settings=httpx_settings, **kwargs)

    __init__.shares_tls = True  # type: ignore[attr-defined]
    return __init__


def share() -> None:
    """Give Prefect's API clients of this process one TLS context (idempotent)."""
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient

    for cls in (PrefectClient, SyncPrefectClient):
        if not getattr(cls.__init__, "shares_tls", False):
            cls.__init__ = _with_shared_context(cls.__init__)
