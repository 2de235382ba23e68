"""The task runner's two fixes to prefect-ray, on the session's real local Ray."""

from __future__ import annotations

from uuid import uuid4

import pytest

from flows.process_images import make_task_runner
from flows.ray_runner import KEPT_OR_TEMPORARY
from flows.ray_runner import (
    COPIED, ArgumentsRayTaskRunner, _with_validated_settings, source_digest,
)

pytestmark = pytest.mark.slow


def test_upstream_values_come_from_the_resolved_arguments_not_ray_get(ray_cluster):
    """The nested ref is replaced by the positional value Ray resolved, in order; calling
    ray.get on it instead would return what the refs hold ("stale-...")."""
    import ray
    from prefect import task

    @task(persist_result=False)
    def pair(first: str, nested: dict) -> tuple[str, str]:
        return first, nested["second"]

    refs = [ray.put("stale-first"), ray.put("stale-second")]
    state = ArgumentsRayTaskRunner._run_prefect_task(
        "resolved-first", "resolved-second", task=pair, task_run_id=uuid4(), context={},
        parameters={"first": refs[0], "nested": {"second": refs[1]}})
    assert state.is_completed(), state.message
    assert state.result() == ("resolved-first", "resolved-second")


def test_a_dependent_task_gets_its_upstream_result_on_ray(ray_cluster):
    from prefect import flow, task

    @task(persist_result=False)
    def double(value: int) -> int:
        return value * 2

    @flow(task_runner=make_task_runner("ray"))
    def chain() -> list[int]:
        firsts = [double.submit(value) for value in range(4)]
        return [future.result() for future in [double.submit(first) for first in firsts]]

    assert chain() == [0, 4, 8, 12]


@pytest.mark.parametrize("name", sorted(COPIED))
def test_what_the_runner_copies_from_prefect_ray_is_unchanged_upstream(name):
    """The installed prefect-ray's methods that ArgumentsRayTaskRunner copies are the ones it
    was written against; after an upgrade, re-read them, carry their changes over, and
    record the new digest in COPIED."""
    assert source_digest(name) == COPIED[name], (
        f"{name} changed upstream: compare it with flows/ray_runner.py's copy, then update "
        "COPIED")


def test_the_context_is_prefects_with_the_settings_serialized_once(prefect_api):
    """What a task receives is what Prefect's own `serialize_context` gives (deployment id
    and parameters included), with the settings serialized once per runner."""
    from prefect import flow
    from prefect.context import SettingsContext, serialize_context

    runner = ArgumentsRayTaskRunner()

    @flow
    def compare() -> tuple[dict, dict, dict]:
        first = runner._serialize_context({})
        return serialize_context({}), first, runner._serialize_context({})

    expected, first, again = compare()
    assert first.keys() == expected.keys()
    assert {k: v for k, v in first.items() if k != "flow_run_context"} == {
        k: v for k, v in expected.items() if k != "flow_run_context"}
    assert first["flow_run_context"]["flow_run"] == expected["flow_run_context"]["flow_run"]
    assert again["settings_context"] is first["settings_context"]  # serialized once
    assert SettingsContext.get() is not None  # and the context is as it was


def test_a_submission_does_not_serialize_the_settings_again(prefect_api, monkeypatch):
    """Prefect's serialize_context falls back to its global settings context when it finds
    none, so hiding the context did not spare the ~20 ms per submission; counted here."""
    from prefect import flow
    from prefect.context import SettingsContext

    runner = ArgumentsRayTaskRunner()
    calls = []
    original = SettingsContext.serialize
    monkeypatch.setattr(SettingsContext, "serialize",
                        lambda self, *args, **kwargs: calls.append(1) or original(self, *args,
                                                                                 **kwargs))

    @flow
    def submit_many() -> list[dict]:
        return [runner._serialize_context({}) for _ in range(5)]

    contexts = submit_many()
    assert len(calls) == 1
    assert all(context["settings_context"] is contexts[0]["settings_context"]
               for context in contexts)


def test_settings_are_validated_once_per_distinct_serialization(prefect_api):
    from prefect.context import SettingsContext

    serialized = SettingsContext.get().serialize()
    first = _with_validated_settings({"settings_context": serialized, "other": 1})
    again = _with_validated_settings({"settings_context": dict(serialized), "other": 2})
    assert first["other"] == 1 and again["other"] == 2
    assert first["settings_context"]["settings"] is again["settings_context"]["settings"]
    expected = SettingsContext(**serialized).settings
    assert first["settings_context"]["settings"] == expected
    assert str(first["settings_context"]["settings"].api.url) == prefect_api

    changed = {**serialized, "settings": {**serialized["settings"],
                                          "api": {**serialized["settings"]["api"],
                                                  "url": "http://127.0.0.1:9/api"}}}
    other = _with_validated_settings({"settings_context": changed})
    assert str(other["settings_context"]["settings"].api.url) == "http://127.0.0.1:9/api"
    assert _with_validated_settings({"flow_run_context": {}}) == {"flow_run_context": {}}


def test_without_an_address_the_runner_starts_its_own_ray_not_a_machine_wide_one(monkeypatch,
                                                                                 tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("PIXELMILL_HOME", str(tmp_path))  # no kept local Ray there
    runner = make_task_runner("ray")
    assert runner.address == KEPT_OR_TEMPORARY  # decided when the flow starts, not at import
    import ray

    if not ray.is_initialized():  # what the flow's start decides, without starting a Ray
        runner._choose_ray()
        assert runner.address == "local" and runner.init_kwargs["include_dashboard"] is False
    given = make_task_runner("ray", "127.0.0.1:6390", {"PIXELMILL_X": "1"})
    assert given.address == "127.0.0.1:6390" and "include_dashboard" not in given.init_kwargs
    assert given.init_kwargs["runtime_env"] == {"env_vars": {"PIXELMILL_X": "1"}}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert make_task_runner("ray").address == "10.0.0.1:6379"


def test_the_cached_context_equals_prefects_own_serialization(prefect_api):
    """The submit side builds the same context as prefect.context.serialize_context, with the
    settings serialized once per settings context."""
    from prefect import flow, task
    from prefect.context import serialize_context
    from prefect.settings import PREFECT_API_URL, temporary_settings

    @task
    def noop() -> None:
        return None

    runner = make_task_runner("ray")
    task_run_id = uuid4()
    kwargs = {"task": noop, "task_run_id": task_run_id, "task_inputs": {},
              "copy_to_child_ctx": True}

    @flow
    def compare() -> tuple[dict, dict, dict, dict]:
        ours, again = runner._serialize_context(kwargs), runner._serialize_context(kwargs)
        with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
            changed = runner._serialize_context(kwargs)
        return ours, again, serialize_context(kwargs), changed

    ours, again, theirs, changed = compare()
    assert ours == theirs
    assert again["settings_context"] is ours["settings_context"]  # serialized once
    assert changed["settings_context"]["settings"]["api"]["url"] == "http://127.0.0.1:9/api"
