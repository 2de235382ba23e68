"""Where pixelmill keeps the state of the local services it starts (PIXELMILL_HOME), and how
to tell whether a recorded process is still the one recorded. Nothing here starts a service:
the command line does (cli/server.py, cli/localray.py)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """pixelmill's own folder: PIXELMILL_HOME or ~/.pixelmill, as an absolute path (the
    services it starts run in it and get paths inside it)."""
    folder = os.environ.get("PIXELMILL_HOME") or Path.home() / ".pixelmill"
    return Path(folder).expanduser().absolute()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _proc() -> Path | None:
    """/proc where it describes processes (Linux), else None."""
    proc = Path("/proc")
    return proc if (proc / "self/stat").exists() else None


def command_line(pid: int) -> str:
    """The command line of `pid`, its arguments joined by spaces; "" when it is gone or a
    zombie. A recorded pid is only ours while it still runs the command we started."""
    proc = _proc()
    if proc is None:
        import subprocess  # only where /proc cannot tell: the launcher imports this module

        result = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                                text=True, check=False)
        return result.stdout.strip()
    try:
        return (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


def runs(pid: int, marker: str) -> bool:
    """True when `pid` is alive and its command line contains `marker`."""
    return marker in command_line(pid)


def mentions(pid: int, text: str) -> bool:
    """True when the command line or the environment of `pid` contains `text` (Linux)."""
    proc = _proc()
    if proc is None:
        return False
    try:
        raw = b"".join((proc / str(pid) / name).read_bytes() for name in ("cmdline", "environ"))
    except OSError:
        return False
    return text.encode() in raw
