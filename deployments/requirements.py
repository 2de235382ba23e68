"""Print pixelmill's runtime requirements from pyproject.toml, one a line (for the Dockerfile,
which installs them before copying the code so that layer is cached)."""

import sys
import tomllib
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
print("\n".join(tomllib.loads(path.read_text())["project"]["dependencies"]))
