"""The `pixelmill` script: hands `run` and `demo` to pixelmill's warm host when one is up
(cli/warm.py), else runs the command in this process (cli.main).

It imports nothing heavy itself, so a command handed over starts in a few milliseconds
instead of loading Prefect. Set PIXELMILL_WARM=0 to always run in this process.
"""

from __future__ import annotations

import os
import signal
import socket
import sys

# Commands worth handing over: the ones that load Prefect and the flows.
WARM_COMMANDS = {"run", "demo"}
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LOST = 3  # the contract's "the run failed": the command's process ended without a status


def _eligible(argv: list[str]) -> bool:
    return (len(argv) > 1 and argv[1] in WARM_COMMANDS
            and os.environ.get("PIXELMILL_WARM", "1") != "0"
            and not {"--help", "-h"} & set(argv[2:]))


def handed_over(argv: list[str]) -> int | None:
    """The exit status of the command as run by the warm host; None when it did not take it
    (no host, or it declined before anything ran): then this process runs it."""
    from cli import warm
    from pixelmill.home import home

    path = warm.socket_path(home())
    if path is None or not path.exists():
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5.0)
        conn.connect(str(path))
        warm.send_message(conn, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(),
                                 "umask": _umask(), "python": sys.executable}, fds=[0, 1, 2])
        first, _ = warm.receive_message(conn)
    except (OSError, EOFError, ValueError):
        conn.close()
        return None
    if "pid" not in first:
        conn.close()
        return None
    pid = int(first["pid"])
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    conn.settimeout(None)
    while True:
        try:
            message, _ = warm.receive_message(conn)
        except InterruptedError:
            continue
        except (OSError, EOFError, ValueError):
            if received:
                return 128 + received[-1]
            print(f"pixelmill: the process that ran this command ({pid}) ended without an "
                  "exit status; see the run's logs in the Prefect UI", file=sys.stderr)
            return LOST
        if "exit" in message:
            return int(message["exit"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main() -> None:
    if _eligible(sys.argv):
        try:
            status = handed_over(sys.argv)
        except KeyboardInterrupt:  # Ctrl-C before the child was known: nothing ran
            os._exit(130)
        if status is not None:
            sys.stdout.flush()
            os._exit(status)
    from cli.main import main as in_process

    in_process()


if __name__ == "__main__":
    main()
