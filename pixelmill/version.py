"""The code version: pixelmill's version plus a fingerprint of its source files.

Part of every chunk's cache key, so a change to any image operation redoes finished chunks.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

from pixelmill import __version__


@lru_cache(maxsize=1)
def code_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"{__version__}+{digest.hexdigest()[:12]}"
