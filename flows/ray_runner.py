"""prefect-ray's RayTaskRunner with five fixes for runs of many chunk tasks (their figures:
docs/decisions.md, "The Ray runner's fixes to prefect-ray").

1. Upstream results come from Ray's resolved arguments. prefect-ray passes a task's upstream
   ObjectRefs twice: as top-level arguments (so Ray starts the task only when they are ready,
   and hands it their values) and nested in `parameters`, which the worker then resolves with
   `ray.get`. That `ray.get` tells the raylet the worker is blocked; the raylet lends its CPU
   to a new worker process, which must import Prefect first, and the surplus workers are
   killed soon after they go idle. The nested refs are swapped for the values Ray passed in,
   in the same order.
2. Prefect's settings are validated once per worker process instead of once per task run.
3. The flow side serializes the settings once per flow run instead of once per submission.
4. Workers are started and warmed (Prefect and the tasks imported) when the runner connects,
   while the flow run is set up, instead of when the first chunk arrives (the CLI connects
   even before it imports Prefect: `flows.kept_ray.connect`).
5. A parameter the flow passes `opaque` (so that Prefect does not walk its hundreds of
   records, on either side) stays `opaque` in the worker: it travels in a
   `flows.runners.PicklableOpaque`, since Prefect's annotations (tuple subclasses) come out
   of pickling with their value nested one level deeper, and the task would get a tuple.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Iterable
from uuid import UUID, uuid4

from prefect.context import SettingsContext, serialize_context
from prefect.futures import PrefectFuture
from prefect.task_engine import run_task_async, run_task_sync
from prefect.utilities.annotations import opaque
from prefect.utilities.collections import visit_collection
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_ray import RayTaskRunner
from prefect_ray.context import RemoteOptionsContext
from prefect_ray.task_runners import PrefectRayFuture

from flows.kept_ray import warm_workers
from flows.runners import PicklableOpaque


# What this module copies and changes, as it was when copied: a test compares these with the
# installed source, so that an upgrade of prefect-ray fails that test (re-read the upstream
# method, carry its changes over, and record its new digest) instead of silently diverging.
COPIED = {
    # copied by `ArgumentsRayTaskRunner.submit` (with `_remote`) and `._run_prefect_task`
    "prefect_ray.task_runners:RayTaskRunner.submit":
        "sha256:fd5a1b4f775ef0447026354c55bc1bfb70db43cc99bffd5aecfcfd2c63daca1b",
    "prefect_ray.task_runners:RayTaskRunner._run_prefect_task":
        "sha256:f41e4875a2e003f8ce6b4e42f63f347e188743c633751b82aa28305e96407a9a",
}


def source_digest(name: str) -> str:
    """The digest of the installed source of `name` ("module:Class.method")."""
    import hashlib
    import importlib
    import inspect

    module, _, path = name.partition(":")
    target: Any = importlib.import_module(module)
    for part in path.split("."):
        target = getattr(target, part)
    return "sha256:" + hashlib.sha256(inspect.getsource(target).encode()).hexdigest()


_settings: dict[str, dict[str, Any]] = {}


def _with_validated_settings(context: dict[str, Any]) -> dict[str, Any]:
    """`context` with its serialized settings swapped for a validated settings object, built
    once per worker process for each distinct serialization.

    Prefect re-validates the whole settings tree from the dict for every task run: pydantic-
    settings re-reads the environment, dotenv and profile files for each of its nested
    models. A validated object is passed through unchanged, so the task sees the same
    settings."""
    serialized = context.get("settings_context")
    if not serialized:
        return context
    key = json.dumps(serialized, sort_keys=True, default=str)
    validated = _settings.get(key)
    if validated is None:
        built = SettingsContext(**serialized)
        validated = {"profile": built.profile, "settings": built.settings}
        if len(_settings) >= 4:  # a worker serves one flow run's settings; keep it small
            _settings.clear()
        _settings[key] = validated
    return {**context, "settings_context": validated}


class _SerializedOnce:
    """The settings context as `_serialize_context` lends it to Prefect: the same context in
    all but `serialize()`, which gives the serialization made once."""

    def __init__(self, context: SettingsContext, serialized: dict[str, Any]) -> None:
        self._context, self._serialized = context, serialized

    def serialize(self, include_secrets: bool = True) -> dict[str, Any]:
        return self._serialized

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


# The address meaning "pixelmill's kept local Ray if it is running, else a temporary local Ray
# for this flow run": never whatever cluster another program's `ray start` left on the machine,
# which Ray's own default (no address) would attach to.
KEPT_OR_TEMPORARY = "pixelmill-local"
# prefect-ray says this when given the address "local", which starts a new Ray.
_MISLEADING = "Connecting to an existing Ray instance at local"


class ArgumentsRayTaskRunner(RayTaskRunner):
    """A RayTaskRunner whose tasks never call `ray.get` for their upstream results."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._remotes: dict[tuple[str, str], Any] = {}
        self._settings: tuple[SettingsContext | None, dict[str, Any]] | None = None
        self.logger.addFilter(lambda record: record.getMessage() != _MISLEADING)

    def _choose_ray(self) -> None:
        """Resolve KEPT_OR_TEMPORARY now that the flow starts, and say which Ray it is."""
        import ray

        if self.address != KEPT_OR_TEMPORARY or ray.is_initialized():
            return  # an address given, or this process is connected already
        from flows import kept_ray

        kept = kept_ray.join_running()
        if kept is not None:
            self.address = kept.address
            self.init_kwargs = {"runtime_env": {"env_vars": kept_ray.job_env()},
                                **self.init_kwargs}
            self.logger.info("Using pixelmill's local Ray at %s (kept between runs)",
                             kept.address)
        else:
            self.address = "local"
            self.init_kwargs = {**self.init_kwargs, "include_dashboard": False}
            self.logger.info("Starting a temporary local Ray for this flow run (pixelmill's "
                             "local Ray is not running; `pixelmill server start` keeps one)")

    def connect(self) -> None:
        """Connect to Ray (or start it) and warm its workers now, before the flow starts;
        the flow's runner then finds Ray initialised and uses it. The caller disconnects
        with `ray.shutdown()`."""
        import ray

        self._choose_ray()
        if not ray.is_initialized():
            address = (self.address,) if self.address and self.address != "auto" else ()
            ray.init(*address, **self.init_kwargs)
            warm_workers()

    def submit(self, task, parameters: dict[str, Any],
               wait_for: Iterable[PrefectFuture[Any]] | None = None,
               dependencies=None) -> PrefectRayFuture:
        """prefect-ray's submit, with the settings serialized once per flow run instead of
        for every task, and one Ray remote function per set of remote options."""
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        task_run_id = uuid4()
        task_inputs = {name: collect_task_run_inputs_sync(value, future_cls=PrefectRayFuture)
                       for name, value in parameters.items()}
        context = self._serialize_context({"task": task, "task_run_id": task_run_id,
                                           "task_inputs": task_inputs,
                                           "copy_to_child_ctx": True})
        parameters, upstream_refs = self._exchange_prefect_for_ray_futures(parameters)
        # Prefect's annotations come out of pickling with their value nested one level
        # deeper: an opaque parameter travels in one that pickles
        parameters = {name: PicklableOpaque(value.unwrap()) if isinstance(value, opaque)
                      else value for name, value in parameters.items()}
        object_ref = self._remote(task.name).remote(
            *upstream_refs, task=task, task_run_id=task_run_id, parameters=parameters,
            wait_for=wait_for, dependencies=dependencies, context=context)
        return PrefectRayFuture(task_run_id=task_run_id, wrapped_future=object_ref)

    def _remote(self, name: str):
        import ray

        options = RemoteOptionsContext.get().current_remote_options
        key = (name, json.dumps(options, sort_keys=True, default=str))
        if key not in self._remotes:
            decorator = ray.remote(**options) if options else ray.remote
            self._remotes[key] = decorator(self._run_prefect_task).options(name=name)
        return self._remotes[key]

    def _serialize_context(self, asset_ctx_kwargs: dict[str, Any]) -> dict[str, Any]:
        """`prefect.context.serialize_context(asset_ctx_kwargs)`, with the settings
        serialized once while the settings context is the same object (it is for a whole
        run): Prefect's function runs with a stand-in for the settings context that gives
        that serialization. (With no settings context at all, Prefect falls back to its
        global one and serializes that instead, ~20 ms per submission.)"""
        settings = SettingsContext.get()
        if settings is None:
            return serialize_context(asset_ctx_kwargs)
        if self._settings is None or self._settings[0] is not settings:
            self._settings = (settings, settings.serialize())
        token = SettingsContext.__var__.set(_SerializedOnce(settings, self._settings[1]))
        try:
            return serialize_context(asset_ctx_kwargs)
        finally:
            SettingsContext.__var__.reset(token)

    def __enter__(self):
        import ray

        self._choose_ray()
        fresh = not ray.is_initialized()
        super().__enter__()
        if fresh:
            warm_workers()
        return self

    @staticmethod
    def _run_prefect_task(*upstream_values: Any, task, task_run_id: UUID,
                          context: dict[str, Any], parameters: dict[str, Any],
                          wait_for: Iterable[PrefectFuture[Any]] | None = None,
                          dependencies=None) -> Any:
        import ray

        values = iter(upstream_values)

        def resolved(expr: Any) -> Any:
            # the submit side collected the refs with the same visit, so the order matches
            return next(values) if isinstance(expr, ray.ObjectRef) else expr

        run_task_kwargs: dict[str, Any] = {
            "task": task,
            "task_run_id": task_run_id,
            "parameters": visit_collection(parameters, visit_fn=resolved, return_data=True),
            "wait_for": wait_for,
            "dependencies": dependencies,
            "context": _with_validated_settings(context),
            "return_type": "state",
        }
        if task.isasync:
            return asyncio.run(run_task_async(**run_task_kwargs))
        return run_task_sync(**run_task_kwargs)
