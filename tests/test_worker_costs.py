"""What a worker process no longer pays in its task runs (tasks.prefect_costs): a TLS context
for each of Prefect's API clients, and every Prefect collection imported to rebuild a block
Prefect itself defines; and what warming a worker (flows.runners.warm_up) imports."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import PrefectClient, SyncPrefectClient
from prefect.context import SettingsContext
from prefect.settings import PREFECT_API_TLS_INSECURE_SKIP_VERIFY, temporary_settings
from prefect.utilities.annotations import opaque

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


def _probe(code: str) -> list[str]:
    """What `code` prints in a fresh interpreter (module state as a new worker has it)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_rebuilding_a_block_prefect_defines_imports_no_collection():
    """A task run's context holds its flow run's result store, a local-file-system block;
    Prefect imported every collection (prefect-gcp and pandas, ~0.8 s of CPU) to rebuild it
    in each worker. A GCS bucket block, which only prefect-gcp defines, is still found."""
    probe = ("import sys\n"
             "import tasks\n"
             "from flows.runners import warm_up\n"
             "from prefect.blocks.core import Block\n"
             "from prefect.filesystems import LocalFileSystem\n"
             "warm_up()\n"
             "local = Block.get_block_class_from_key('local-file-system')\n"
             "print(local is LocalFileSystem, 'prefect_gcp' in sys.modules)\n"
             "gcs = Block.get_block_class_from_key('gcs-bucket')\n"
             "print(gcs.__module__, 'prefect_gcp' in sys.modules)\n")
    assert _probe(probe) == ["True", "False", "prefect_gcp.cloud_storage", "True"]


def test_the_process_pool_warms_each_worker_and_keeps_doing_so_when_duplicated():
    runner = LineageProcessPoolTaskRunner(max_workers=2)
    assert runner._initializer is warm_up
    assert runner.duplicate()._initializer is warm_up


# What a pool worker's task engine does to a task's parameters, seen from inside the worker.
# The count is kept on `sys`: a task and a class pickled by value each get their own copy of
# this module's globals in the worker.
_WALKS = "_pixelmill_test_walks"


class _Walked(list):
    """A list that counts, in the process that iterates it, how often it is walked."""

    def __iter__(self):
        sys.__dict__.setdefault(_WALKS, []).append(1)
        return super().__iter__()


@task(cache_policy=NO_CACHE)  # as pixelmill's tasks: a cache key would hash the items
def _what_the_worker_got(items) -> tuple[int, str | None, int]:
    settings = SettingsContext.get().settings
    return (len(sys.__dict__.get(_WALKS, [])), getattr(settings, "_pixelmill_origin", None),
            os.getpid())


def test_a_pool_worker_neither_walks_an_opaque_parameter_nor_validates_the_settings_again(
        prefect_api):
    """The pool drops a parameter's `opaque` before it pickles it for the worker, and sends
    the settings as a dict the worker validates again in every task run; both are kept as
    they were in the flow's process."""
    settings = SettingsContext.get().settings.model_copy()
    object.__setattr__(settings, "_pixelmill_origin", "the flow's process")

    @flow(task_runner=LineageProcessPoolTaskRunner(max_workers=1))
    def probe():
        futures = [_what_the_worker_got.submit(opaque(_Walked(range(100)))) for _ in range(3)]
        return [future.result() for future in futures]

    with SettingsContext(profile=SettingsContext.get().profile, settings=settings):
        seen = probe()
    assert {pid for _, _, pid in seen} != {os.getpid()}  # it ran in a worker
    assert [(walks, origin) for walks, origin, _ in seen] == [(0, "the flow's process")] * 3


@task(cache_policy=NO_CACHE)
def _my_flow_run() -> str:
    from prefect.context import TaskRunContext

    return str(TaskRunContext.get().task_run.flow_run_id)


def test_a_child_flow_run_lent_the_pool_gets_its_task_runs_recorded_under_it(prefect_api):
    """The parts of a big run are child flow runs on the parent's pool: each task run must be
    recorded under the flow run that submitted it, not under the first one to use the pool."""
    from prefect.context import FlowRunContext

    from flows.runners import SharedTaskRunner

    pool = LineageProcessPoolTaskRunner(max_workers=1)

    @flow
    def part():
        return str(FlowRunContext.get().flow_run.id), _my_flow_run.submit().result()

    @flow(task_runner=pool)
    def parent():
        own = (str(FlowRunContext.get().flow_run.id), _my_flow_run.submit().result())
        lent = part.with_options(task_runner=SharedTaskRunner(FlowRunContext.get().task_runner))
        return [own, lent(), lent()]

    runs = parent()
    assert len({flow_run for flow_run, _ in runs}) == 3
    assert [recorded for _, recorded in runs] == [flow_run for flow_run, _ in runs]
