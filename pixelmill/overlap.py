"""Overlap storage I/O with decoding inside one chunk, with bounded memory.

On storage whose reads and writes are round trips (`Storage.overlap`), a chunk reads its
sources ahead of the image being decoded and hands its outputs to a small writer pool, so
network latency hides behind CPU work; at most PREFETCH sources and MAX_PENDING_WRITES
outputs are held at once, never the whole chunk. On local storage both are done in line.
"""

from __future__ import annotations

import contextvars
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

# Sources read ahead of the one being decoded: one hides a read behind a decode of similar
# length; more only holds more compressed images in memory.
PREFETCH = 2
# Outputs queued for upload before the producer waits (5 outputs per image with 4 filters).
MAX_PENDING_WRITES = 16
WRITER_THREADS = 4


def prefetched(items: Iterable[T], read: Callable[[T], R],
               depth: int = PREFETCH) -> Iterator[tuple[T, Future[R]]]:
    """Yield (item, future of read(item)) in order, reading up to `depth` items ahead; with
    `depth` 0, each read is done in line when its item comes (a future already done)."""
    if depth <= 0:
        for item in items:
            future: Future[R] = Future()
            try:
                future.set_result(read(item))
            except Exception as exc:  # noqa: BLE001  (raised by .result(), as a read ahead's)
                future.set_exception(exc)
            yield item, future
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pixelmill-read") as pool:
        pending: deque[tuple[T, Future[R]]] = deque()
        source = iter(items)
        for item in source:
            # each job runs in a copy of the caller's context, so logs keep the task run
            pending.append((item, pool.submit(contextvars.copy_context().run, read, item)))
            if len(pending) > depth:
                yield pending.popleft()
        while pending:
            yield pending.popleft()


def threaded_map(function: Callable[[T], R], items: Iterable[T], threads: int) -> list[R]:
    """`function` over `items` on a thread pool, in order, each call in the caller's context."""
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pixelmill-io") as pool:
        futures = [pool.submit(contextvars.copy_context().run, function, item) for item in items]
        return [future.result() for future in futures]


class Writer:
    """Background writes; `close()` waits for all of them and raises the first error. With
    `background` False each write is done in line by `submit`."""

    def __init__(self, write: Callable[..., None], background: bool = True) -> None:
        self._write = write
        self._pool = ThreadPoolExecutor(max_workers=WRITER_THREADS,
                                        thread_name_prefix="pixelmill-write") \
            if background else None
        self._pending: deque[Future[None]] = deque()

    def submit(self, key: str, data: bytes, content_type: str,
               metadata: Mapping[str, str] | None = None) -> None:
        if self._pool is None:
            self._write(key, data, content_type, metadata)
            return
        while len(self._pending) >= MAX_PENDING_WRITES:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(contextvars.copy_context().run, self._write, key,
                                               data, content_type, metadata))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
