"""Two costs that Prefect's client side pays again and again in a process, paid once.
`install()` puts both in place; it runs when the `tasks` package is imported, as it is in
every process that runs them (docs/decisions.md, "One TLS context per process for Prefect's
clients").

**One TLS context for Prefect's API clients** (`share_tls`). Prefect builds a new
`ssl.SSLContext` for every API client it creates, and with it parses certifi's bundle of
~150 CA certificates: ~30 ms of CPU each on this machine. A task run in a Ray or
process-pool worker creates two clients (one for the context it is handed, one for its
engine), so a run of 20 chunk tasks spent ~1.2 s of its workers' CPU on certificates.
Prefect uses an `SSLContext` given as `httpx_settings["verify"]` as it is: every client of
the process that is not given one gets a shared context, built the way Prefect builds it
from the same settings (PREFECT_API_TLS_INSECURE_SKIP_VERIFY, PREFECT_API_SSL_CERT_FILE),
once for each distinct setting. One context serves any number of clients, threads and
connections.

**Block types Prefect knows are found without importing every collection**
(`known_blocks_first`). Rebuilding any block (a task run's context holds its flow run's
result store, a local-file-system block) makes Prefect import every installed collection
first, so that they can register their block types: prefect-gcp, with pandas, is ~0.8 s of
CPU in every worker process. A block type already registered is now taken as it is; one that
is not (a GCS bucket, from prefect-gcp) still makes Prefect import the collections and look
again, as before.
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


def share_tls() -> None:
    """Give Prefect's API clients of this process one TLS context (idempotent)."""
    from prefect.client.orchestration import PrefectClient, SyncPrefectClient

    for cls in (PrefectClient, SyncPrefectClient):
        if not getattr(cls.__init__, "shares_tls", False):
            cls.__init__ = _with_shared_context(cls.__init__)


def known_blocks_first() -> None:
    """Have Prefect look a block type up among the types already registered before it
    imports every collection to look again (idempotent)."""
    from prefect.blocks.core import Block
    from prefect.utilities.dispatch import lookup_type

    original = Block.__dict__["get_block_class_from_key"].__func__
    if getattr(original, "known_first", False):
        return

    def get_block_class_from_key(cls, key: str):
        try:
            return lookup_type(cls, key)
        except KeyError:
            return original(cls, key)

    get_block_class_from_key.known_first = True  # type: ignore[attr-defined]
    get_block_class_from_key.__doc__ = original.__doc__
    Block.get_block_class_from_key = classmethod(get_block_class_from_key)


def install() -> None:
    share_tls()
    known_blocks_first()
