"""Prefect tasks: thin wrappers that run one stage of pixelmill on one chunk."""

from tasks.images import build_gallery, discover, filter_chunk, resize_chunk

__all__ = ["build_gallery", "discover", "filter_chunk", "resize_chunk"]
