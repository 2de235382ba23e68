"""Overlap storage I/O with decoding inside one chunk, with bounded memory.

A chunk reads its sources one ahead of the image being decoded and hands its outputs to a
small writer pool, so network latency hides behind CPU work; at most PREFETCH sources and
MAX_PENDING_WRITES outputs are held at once, never the whole chunk.
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
    """Yield (item, future of read(item)) in order, reading up to `depth` items ahead."""
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
    """Background writes; `close()` waits for all of them and raises the first error."""

    def __init__(self, write: Callable[..., None]) -> None:
        self._write = write
        self._pool = ThreadPoolExecutor(max_workers=WRITER_THREADS,
                                        thread_name_prefix="pixelmill-write")
        self._pending: deque[Future[None]] = deque()

    def submit(self, key: str, data: bytes, content_type: str,
               metadata: Mapping[str, str] | None = None) -> None:
        while len(self._pending) >= MAX_PENDING_WRITES:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(contextvars.copy_context().run, self._write, key,
                                               data, content_type, metadata))

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
