"""One run at a time in a run folder: a lock object beside the outputs.

A run creates `<run>/.pixelmill-lock.json` (create-only, so of two runs exactly one gets it),
refreshes its heartbeat while it works and deletes it at the end. A second run into the same
folder is refused with a message naming the run that holds it. A lock left by a run that died
is taken over: at once when its process is gone on this host, else once its heartbeat is older
than LOCK_STALE_S. The same flow run (Prefect's Retry) always takes its own lock back.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pixelmill.errors import UsageError
from pixelmill.storage import Storage

log = logging.getLogger("pixelmill")

# The holder rewrites its heartbeat this often...
HEARTBEAT_S = 15.0
# ...and a lock whose heartbeat is older than this belongs to a run that died (on another
# host, where its process cannot be checked). Several missed heartbeats, so a slow storage
# write never makes a live run look dead.
LOCK_STALE_S = 120.0
# After taking over a dead run's lock, wait this long and read it back: of two runs taking
# over at once, the one whose lock is still there goes on.
TAKEOVER_SETTLE_S = 0.5


class RunFolderBusy(UsageError):
    """Another run is writing into this run folder."""


@dataclass
class Holder:
    """Who holds a run folder (written into the lock)."""

    flow_run: str = ""
    flow_run_name: str = ""
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    started: float = field(default_factory=time.time)
    heartbeat: float = field(default_factory=time.time)

    def describe(self) -> str:
        who = f"flow run {self.flow_run_name or '?'} ({self.flow_run})" if self.flow_run \
            else "a run"
        return (f"{who}, pid {self.pid} on {self.host}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.started))}")

    def dead(self, now: float) -> bool:
        if self.host == socket.gethostname() and self.pid != os.getpid():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass
        return now - self.heartbeat > LOCK_STALE_S


def _read(storage: Storage, key: str) -> Holder | None:
    try:
        data: dict[str, Any] = json.loads(storage.read(key))
        return Holder(**{name: data[name] for name in Holder.__dataclass_fields__
                         if name in data})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):
        return Holder(heartbeat=0.0, host="?", pid=-1)  # unreadable: treat as dead


class RunLock:
    """`with RunLock(storage, key, holder):` holds the run folder, or raises RunFolderBusy."""

    def __init__(self, storage: Storage, key: str, holder: Holder, folder: str) -> None:
        self.storage, self.key, self.holder, self.folder = storage, key, holder, folder
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _data(self) -> bytes:
        self.holder.heartbeat = time.time()
        return json.dumps(asdict(self.holder), indent=1).encode("utf-8")

    def acquire(self) -> RunLock:
        for _attempt in range(3):
            if self.storage.write_new(self.key, self._data(), "application/json"):
                break
            other = _read(self.storage, self.key)
            if other is None:
                continue  # released in between: try again
            same_run = bool(self.holder.flow_run) and other.flow_run == self.holder.flow_run
            if not same_run and not other.dead(time.time()):
                raise RunFolderBusy(
                    f"run folder {self.folder} is in use by {other.describe()}; wait for it "
                    "to finish or choose another --run-name")
            log.warning("taking over run folder %s from %s, which is no longer running",
                        self.folder, other.describe())
            self.storage.delete(self.key)
            if self.storage.write_new(self.key, self._data(), "application/json"):
                time.sleep(TAKEOVER_SETTLE_S)
                mine = _read(self.storage, self.key)
                if mine is not None and mine.token == self.holder.token:
                    break
        else:
            raise RunFolderBusy(f"run folder {self.folder}: another run took it first; "
                                "wait for it to finish or choose another --run-name")
        self._beat = threading.Thread(target=self._heartbeat, name="pixelmill-run-lock",
                                      daemon=True)
        self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                current = _read(self.storage, self.key)
                if current is None or current.token != self.holder.token:
                    log.error("lost the lock of run folder %s to %s", self.folder,
                              current.describe() if current else "nobody")
                    return
                self.storage.write(self.key, self._data(), "application/json")
            except Exception as exc:  # a storage hiccup: the next beat tries again
                log.warning("could not refresh the lock of %s: %s", self.folder, exc)

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            current = _read(self.storage, self.key)
            if current is not None and current.token == self.holder.token:
                self.storage.delete(self.key)
        except Exception as exc:  # it goes stale on its own
            log.warning("could not release the lock of %s: %s", self.folder, exc)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
