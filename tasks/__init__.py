"""Prefect tasks: thin wrappers that run one stage of pixelmill on one chunk."""

from tasks.images import (
    build_gallery, build_gallery_of_parts, discover, filter_chunk, resize_chunk,
)

__all__ = ["build_gallery", "build_gallery_of_parts", "discover", "filter_chunk", "resize_chunk"]
