"""What a worker process pays once instead of in every task run: one TLS context for
Prefect's API clients (tasks.clients), and Prefect's collections imported when it starts
(flows.runners.warm_up)."""

from __future__ import annotations

import ssl
import subprocess
import sys

from prefect.client.orchestration import PrefectClient, SyncPrefectClient
from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings

import tasks  # noqa: F401  (importing the tasks is what every worker does)
from flows.runners import LineageProcessPoolTaskRunner, warm_up

API = "http://127.0.0.1:9/api"  # never contacted: a client connects on its first request


def _tls(client) -> ssl.SSLContext:
    """The TLS context the client's connections are made with."""
    return client._client._transport._pool._ssl_context


def test_the_api_clients_of_a_process_share_one_tls_context():
    """A task run makes two clients; each used to parse certifi's ~150 certificates again."""
    sync_clients = [SyncPrefectClient(API) for _ in range(3)]
    async_client = PrefectClient(API)
    contexts = {id(_tls(client)) for client in (*sync_clients, async_client)}
    assert len(contexts) == 1
    assert _tls(async_client).verify_mode == ssl.CERT_REQUIRED  # still verifies, as Prefect's


def test_the_shared_context_follows_prefects_tls_settings():
    verified = _tls(SyncPrefectClient(API))
    with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
        insecure = _tls(SyncPrefectClient(API))
    assert insecure is not verified
    assert insecure.verify_mode == ssl.CERT_NONE and not insecure.check_hostname
    assert _tls(SyncPrefectClient(API)) is verified


def test_a_client_given_its_own_tls_context_keeps_it():
    own = ssl.create_default_context()
    assert _tls(SyncPrefectClient(API, httpx_settings={"verify": own})) is own


def test_warming_a_worker_imports_prefects_collections():
    """Prefect imports its collections (prefect-gcp, ~0.9 s of CPU) inside the first task run
    of a process; a warmed worker has them already."""
    probe = ("import sys\n"
             "from prefect._internal.plugins import collections\n"
             "from flows.runners import warm_up\n"
             "assert collections._collections is None and 'prefect_gcp' not in sys.modules\n"
             "warm_up()\n"
             "print(collections._collections is not None, 'prefect_gcp' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_the_process_pool_warms_each_worker_and_keeps_doing_so_when_duplicated():
    runner = LineageProcessPoolTaskRunner(max_workers=2)
    assert runner._initializer is warm_up
    assert runner.duplicate()._initializer is warm_up
