"""Prefect tasks: thin wrappers that run one stage of pixelmill on one chunk.

Importing the package (as every process that runs them does: the flow's, a Ray worker, a
process-pool worker) gives Prefect's API clients of that process one TLS context
(`tasks.clients`)."""

from tasks import clients
from tasks.images import (
    build_gallery, build_gallery_of_parts, discover, filter_chunk, resize_chunk,
)

clients.share()

__all__ = ["build_gallery", "build_gallery_of_parts", "discover", "filter_chunk", "resize_chunk"]
