"""pixelmill: the pure image library behind the Prefect flows (no Prefect import here)."""

from __future__ import annotations

__version__ = "0.1.0"
