"""The flow's chunk scheduler (`_in_order`) with stand-in futures that a thread completes."""

from __future__ import annotations

import threading
import time

from prefect.states import Completed, Failed

from flows.process_images import _in_order


class Future:
    """The part of a Prefect future `_in_order` uses; `finish()` completes it."""

    def __init__(self, name: str, ok: bool = True) -> None:
        self.name, self.ok, self.state = name, ok, None
        self._callbacks: list = []
        self._lock = threading.Lock()

    def add_done_callback(self, callback) -> None:
        with self._lock:
            if self.state is None:
                self._callbacks.append(callback)
                return
        callback(self)

    def finish(self) -> None:
        with self._lock:
            self.state = Completed() if self.ok else Failed(message="for good")
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def wait(self) -> None:
        pass


class Runner:
    """Completes submitted futures one at a time, oldest first, from a thread."""

    def __init__(self, failing: set[str] = frozenset()) -> None:
        self.failing = failing
        self.log: list[str] = []
        self.pending: list[Future] = []
        self.max_resizing = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._complete, daemon=True).start()

    def submit(self, name: str) -> Future:
        future = Future(name, ok=name not in self.failing)
        with self._lock:
            self.log.append(f"submit {name}")
            self.pending.append(future)
            resizing = sum(f.name.startswith("resize") for f in self.pending)
            self.max_resizing = max(self.max_resizing, resizing)
        return future

    def _complete(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                future = self.pending.pop(0) if self.pending else None
                if future:
                    self.log.append(f"done {future.name}")
            if future:
                future.finish()
            time.sleep(0.002)

    def stop(self) -> None:
        self._stop.set()


def test_chunks_go_in_order_with_each_filter_right_after_its_resize():
    runner = Runner(failing={"resize-3"})
    filtered_states = []

    def submit_filter(resized):
        filtered_states.append(resized.state)
        return runner.submit(resized.name.replace("resize", "filter"))

    try:
        finished = list(_in_order(list(range(6)), lambda n: runner.submit(f"resize-{n}"),
                                  submit_filter, ahead=2))
    finally:
        runner.stop()
    assert sorted(number for number, _, _ in finished) == list(range(6))
    for number, last, upstream in finished:
        if number == 3:  # its resize failed: no filter task, the resize state is the outcome
            assert last.name == "resize-3" and upstream is None and last.state.is_failed()
        else:
            assert last.name == f"filter-{number}" and upstream.name == f"resize-{number}"
    assert all(state.is_completed() for state in filtered_states) and len(filtered_states) == 5
    assert runner.max_resizing <= 2  # never more than `ahead` resize tasks unfinished
    submitted = [line.split()[1] for line in runner.log if line.startswith("submit resize")]
    assert submitted == [f"resize-{n}" for n in range(6)]  # in chunk order
    # a chunk's filter is submitted right after its resize finishes, before later resizes
    # finish (they queue behind it, not the other way round)
    log = runner.log
    assert log.index("submit filter-0") < log.index("done resize-2")


def test_without_filters_each_resize_is_the_outcome():
    runner = Runner()
    try:
        finished = list(_in_order(list(range(4)), lambda n: runner.submit(f"resize-{n}"), None,
                                  ahead=3))
    finally:
        runner.stop()
    assert sorted((n, last.name, upstream) for n, last, upstream in finished) == [
        (n, f"resize-{n}", None) for n in range(4)]


def test_no_chunks_yields_nothing():
    assert list(_in_order([], lambda n: None, None, ahead=2)) == []
