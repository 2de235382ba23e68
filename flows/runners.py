"""Task runners beside Ray's: `--runner auto` (threads in this process or a process pool for a
batch that one machine does faster that way, Ray for the rest; the flow decides once it knows
how many images it has to make) and Prefect's process pool with the tasks' lineage kept."""

from __future__ import annotations

import os
from contextlib import ExitStack
from typing import Any, Callable, Iterable

from prefect.futures import PrefectFuture
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import opaque
from prefect.utilities.engine import collect_task_run_inputs_sync
from prefect_ray import RayTaskRunner

from flows.kept_ray import warm_up
from pixelmill.spec import CROSSOVER_IMAGES, PROCESSES_FROM, auto_runner


class AutoTaskRunner(TaskRunner[PrefectFuture[Any]]):
    """Runs a flow's tasks on threads, on a process pool or on Ray, whichever `choose` picks.

    `ray_runner` builds the Ray task runner when Ray is chosen (only then is Ray connected or
    started). Until the flow calls `choose`, nothing is started; a task submitted before that
    runs on threads."""

    def __init__(self, ray_runner: Callable[[], TaskRunner], crossover: int = CROSSOVER_IMAGES,
                 threads: int | None = None, processes_from: int = PROCESSES_FROM) -> None:
        super().__init__()
        self._make_ray = ray_runner
        self.crossover = crossover
        self.processes_from = processes_from
        self.threads = threads or os.cpu_count() or 1
        self.chosen: TaskRunner | None = None
        self.reason = ""
        self._stack = ExitStack()

    @property
    def name(self) -> str:
        return "auto"

    def duplicate(self) -> AutoTaskRunner:
        return type(self)(self._make_ray, self.crossover, self.threads, self.processes_from)

    def choose(self, images: int, needs_ray: str | None = None) -> TaskRunner:
        """Pick the runner for a batch of `images` to make (once; later calls return the
        first pick). `needs_ray` names a reason that only Ray can serve (a GPU stage)."""
        if self.chosen is not None:
            return self.chosen
        name, self.reason = auto_runner(images, needs_ray, self.crossover, self.processes_from)
        runner = (self._make_ray() if name == "ray"
                  else LineageProcessPoolTaskRunner(max_workers=self.threads)
                  if name == "processes" else ThreadPoolTaskRunner(max_workers=self.threads))
        self.chosen = self._stack.enter_context(runner)
        self.logger.info("Runner: %s (%s)", runner_name(self.chosen), self.reason)
        return self.chosen

    def submit(self, task, parameters: dict[str, Any],
               wait_for: Iterable[PrefectFuture[Any]] | None = None,
               dependencies=None) -> PrefectFuture[Any]:
        runner = self.chosen or self.choose(0)
        return runner.submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    def __enter__(self) -> AutoTaskRunner:
        super().__enter__()
        self._stack = ExitStack()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._stack.__exit__(*exc_info)
        finally:
            self.chosen = None
            super().__exit__(*exc_info)


class SharedTaskRunner(TaskRunner[PrefectFuture[Any]]):
    """A flow run's task runner lent to its child flow runs (the parts of a big run): their
    tasks go to the parent's threads, process pool or Ray, already started; a child neither starts nor
    stops it, so parts cost no new workers."""

    def __init__(self, inner: TaskRunner | None) -> None:
        self.inner = inner
        super().__init__()

    @property
    def name(self) -> str:
        return self.inner.name if self.inner is not None else "shared"

    def duplicate(self) -> SharedTaskRunner:
        return type(self)(self.inner)

    def __getstate__(self) -> dict[str, Any]:
        """Without the parent's runner: a task's context carries its flow (and so this) to
        a Ray worker, where the running runner (its threads, its context tokens) is neither
        picklable nor of any use."""
        return {**self.__dict__, "inner": None}

    def submit(self, task, parameters: dict[str, Any],
               wait_for: Iterable[PrefectFuture[Any]] | None = None,
               dependencies=None) -> PrefectFuture[Any]:
        if self.inner is None:
            raise RuntimeError("a part's tasks are submitted from the flow run's own process")
        return self.inner.submit(task, parameters, wait_for=wait_for, dependencies=dependencies)


class LineageProcessPoolTaskRunner(ProcessPoolTaskRunner):
    """Prefect's process pool, with each task run's upstream task runs recorded, and each
    worker warmed (`warm_up`) as it starts.

    The pool resolves upstream futures and states to their values before it pickles a task's
    parameters for the subprocess, and the subprocess then finds no upstream task run in them:
    the UI would draw no edge from a resize chunk to its filter chunk. The inputs are collected
    here first, as the thread pool's tasks collect them in process."""

    def __init__(self, max_workers: int | None = None) -> None:
        super().__init__(max_workers=max_workers, initializer=warm_up)
        self._context_of: Any = None  # the flow run whose context is cached

    def submit(self, task, parameters: dict[str, Any],
               wait_for: Iterable[PrefectFuture[Any]] | None = None,
               dependencies=None):
        if dependencies is None:
            dependencies = {name: collect_task_run_inputs_sync(value)
                            for name, value in parameters.items()}
        if self._started and (self._cached_context is None
                              or self._context_of != _flow_run_id()):
            self._cache_context()
        # The pool resolves the parameters, dropping one layer of annotations, before it
        # pickles them: the worker's task engine would then walk an opaque chunk image by
        # image, twice (~15 ms a walk at 476 images). Wrapped twice, in an opaque that
        # pickles, it arrives opaque.
        parameters = {name: PicklableOpaque(PicklableOpaque(value.unwrap()))
                      if isinstance(value, opaque) else value
                      for name, value in parameters.items()}
        return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    def _cache_context(self) -> None:
        """The context the pool sends with every task run, made as the pool makes it, but
        with this process's validated settings instead of their serialization: a worker
        would validate that dict again for every task run (~26-37 ms, pydantic-settings
        re-reading the environment), and unpickles the object in ~0.4 ms.

        Made again for each flow run that submits: Prefect's pool makes it once per pool,
        and the parts of a big run (child flow runs lent the parent's pool) would have their
        task runs recorded under the parent."""
        from prefect.context import SettingsContext, serialize_context
        from prefect.settings import get_current_settings

        current = SettingsContext.get()
        context = serialize_context()
        if current is not None and "settings_context" in context:
            context["settings_context"] = {"profile": current.profile,
                                           "settings": current.settings}
        self._cached_context = context
        self._context_of = _flow_run_id()
        self._cached_env = (get_current_settings().to_environment_variables(exclude_unset=True)
                            | os.environ)


def _flow_run_id() -> Any:
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context.flow_run.id if context is not None and context.flow_run else None


class PicklableOpaque(opaque):
    """Prefect's `opaque` that survives pickling: Prefect's annotations are tuples built from
    one value, and a tuple pickles as its items, so `opaque(x)` comes back as
    `opaque((x,))`. The process pool and the Ray runner send opaque parameters in it."""

    def __reduce__(self):
        return type(self), (self.unwrap(),)


def runner_name(runner: TaskRunner | None) -> str:
    """A task runner as `--runner` names it: ray, threads, processes or sequential."""

    if isinstance(runner, SharedTaskRunner):
        return runner_name(runner.inner)
    if isinstance(runner, AutoTaskRunner):
        return runner_name(runner.chosen) if runner.chosen else "auto"
    if isinstance(runner, RayTaskRunner):
        return "ray"
    if isinstance(runner, ProcessPoolTaskRunner):
        return "processes"
    if isinstance(runner, ThreadPoolTaskRunner):
        return "sequential" if runner._max_workers == 1 else "threads"
    return type(runner).__name__ if runner is not None else "none"
