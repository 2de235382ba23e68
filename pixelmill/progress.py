"""A process-local hook the flow reports progress to, so the CLI can draw a progress bar.

The flow calls `progress.planned(...)` and `progress.chunk_done(...)`; whoever runs the
flow in-process (the CLI) installs a listener. Without one, the calls do nothing.
"""

from __future__ import annotations

from typing import Protocol

from pixelmill.models import ChunkResult


class Listener(Protocol):
    def planned(self, chunks: int, images: int, rejected: int, kept: int) -> None: ...

    def chunk_done(self, result: ChunkResult | None, images: int) -> None: ...


_listeners: list[Listener] = []


def listen(listener: Listener) -> None:
    _listeners.append(listener)


def unlisten(listener: Listener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def planned(chunks: int, images: int, rejected: int, kept: int = 0) -> None:
    """Discovery's plan: `images` to make in `chunks`, `rejected` refused, `kept` already
    in the run folder."""
    for listener in list(_listeners):
        listener.planned(chunks, images, rejected, kept)


def chunk_done(result: ChunkResult | None, images: int) -> None:
    """A chunk finished its last stage (`result` None: the chunk failed for good)."""
    for listener in list(_listeners):
        listener.chunk_done(result, images)
