"""Prefect tasks: thin wrappers that run one stage of pixelmill on one chunk.

Importing the package (as every process that runs them does: the flow's, a Ray worker, a
process-pool worker) spares that process two of Prefect's repeated costs
(`tasks.prefect_costs`)."""

from tasks import prefect_costs
from tasks.images import (
    build_gallery, build_gallery_of_parts, discover, filter_chunk, resize_chunk,
)

prefect_costs.install()

__all__ = ["build_gallery", "build_gallery_of_parts", "discover", "filter_chunk", "resize_chunk"]
