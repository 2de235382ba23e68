"""prefect-ray's RayTaskRunner, with upstream results taken from Ray's resolved arguments.

prefect-ray passes a task's upstream ObjectRefs twice: as top-level arguments (so Ray starts
the task only when they are ready, and hands it their values) and nested in `parameters`,
which the worker then resolves with `ray.get`. That nested `ray.get` tells the raylet the
worker is blocked; the raylet lends its CPU to a new worker process, which must import
Prefect before doing anything (3-5 CPU-seconds on these machines), and the surplus workers
are killed a second after they go idle. On a 2-core run of 600 images that churn started six
workers for two CPUs (bench/speed.py). Here the nested refs are swapped for the values Ray
already passed in, in the same traversal order, so no worker ever blocks.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Iterable
from uuid import UUID

from prefect.context import SettingsContext
from prefect.futures import PrefectFuture
from prefect.task_engine import run_task_async, run_task_sync
from prefect.utilities.collections import visit_collection
from prefect_ray import RayTaskRunner


_settings: dict[str, dict[str, Any]] = {}


def _with_validated_settings(context: dict[str, Any]) -> dict[str, Any]:
    """`context` with its serialized settings swapped for a validated settings object, built
    once per worker process for each distinct serialization.

    Prefect re-validates the whole settings tree from the dict for every task run: pydantic-
    settings re-reads the environment, dotenv and profile files for each of ~50 nested models,
    about 110 ms of a worker's CPU per task run (measured with cProfile on a no-op task).
    A validated object is passed through unchanged, so the task sees the same settings."""
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


def _warm_up() -> None:
    """Import what every chunk task needs, in a worker that has not run one yet."""
    import tasks  # noqa: F401  (Prefect, pixelmill, Pillow: ~2 CPU-seconds per worker)


def _warm_workers() -> None:
    """Have Ray start one worker per CPU and import the tasks' modules in it now, while the
    flow run is created, its source listed and its chunks submitted; a new Ray job's workers
    otherwise start only when the first chunk arrives (~3 s on 2 busy cores). Nothing waits
    for these tasks."""
    import ray

    warm = ray.remote(num_cpus=1)(_warm_up)
    for _ in range(int(ray.available_resources().get("CPU", 0))):
        warm.remote()


class ArgumentsRayTaskRunner(RayTaskRunner):
    """A RayTaskRunner whose tasks never call `ray.get` for their upstream results."""

    def connect(self) -> None:
        """Connect to Ray (or start it) and warm its workers now, before the flow starts;
        the flow's runner then finds Ray initialised and uses it. The caller disconnects
        with `ray.shutdown()`."""
        import ray

        if not ray.is_initialized():
            address = (self.address,) if self.address and self.address != "auto" else ()
            ray.init(*address, **self.init_kwargs)
            _warm_workers()

    def __enter__(self):
        import ray

        fresh = not ray.is_initialized()
        super().__enter__()
        if fresh:
            _warm_workers()
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
