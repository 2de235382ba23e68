"""`LocalStorage`: the storage interface (pixelmill/storage.py) over a folder on this machine.

A file appears whole or not at all: it is written with no name (O_TMPFILE) and linked into
place, or, where the file system cannot, written to a temp file and renamed into place. An
object's metadata is appended to a journal in the `.pixelmill-meta/` folder of the key's top
folder (for pixelmill: the run folder), each entry naming the file's size and mtime; an entry
counts only while the file still has that size and mtime, so a file replaced by hand has no
metadata. A storage object keeps its journals open while it lives. A listed file's version is
its mtime and ctime (`_version`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from pixelmill.storage import META_DIR, TEMP_PREFIX, TIDY_AFTER_S, ObjectInfo, safe_key

class LocalStorage:
    """A folder on this machine. A written file appears whole or not at all."""

    # A local read or write is short next to a decode: done in line. Background readers
    # and writers would only fight the chunks' threads for Python's lock.
    overlap = False

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)
        self._inside = str(self.root).rstrip(os.sep) + os.sep  # every key's path starts so
        self._journal_name = f"{secrets.token_hex(8)}.jsonl"
        self._journal_lock = threading.Lock()
        # this writer's open journals, {folder: descriptor}: one append per entry, no open
        # and close per output (closed with the storage object)
        self._journals_open: dict[Path, int] = {}
        weakref.finalize(self, _close_all, self._journals_open)

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / safe_key(key)).absolute()
        if not str(path).startswith(self._inside):
            raise ValueError(f"{key!r}: resolves outside {self.root}")
        return path

    def join(self, *parts: str) -> str:
        return str(self.root.joinpath(*parts))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every file under `prefix` in key order (the order GCS lists in), streamed: one
        folder's entries are held at a time. Stamps come from the journals of the keys' top
        folder, read when the walk enters it (only the lines under `prefix`)."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return
        strip = len(str(self.root).rstrip(os.sep)) + 1  # "/root/" off every path
        wanted = safe_key(prefix) if prefix else ""
        if wanted and "/" in wanted:  # inside a top folder: its journals hold the stamps
            metadata = self._journals(self.root / wanted.split("/")[0], wanted)
        else:
            metadata = self._journals(self.root, wanted) if base == self.root else \
                self._journals(base, wanted)
        yield from self._walk(str(base), strip, metadata, wanted, base == self.root)

    def _journals(self, top: Path, prefix: str) -> dict[tuple[str, int, str], dict[str, str]]:
        folder = top / META_DIR
        if not folder.is_dir():
            return {}
        return _read_journals(sorted(str(path) for path in folder.glob("*.jsonl")), prefix)

    def _walk(self, folder: str, strip: int, metadata: dict, prefix: str,
              at_root: bool) -> Iterator[ObjectInfo]:
        """The files under `folder` in key order: its entries sorted by name, a folder as
        'name/' (so 'a-b.jpg' < 'a/x.jpg' < 'a0.jpg', as their keys sort)."""
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return  # vanished
        ordered = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir and entry.name == META_DIR:
                continue
            ordered.append((entry.name + "/" if is_dir else entry.name, is_dir, entry))
        ordered.sort(key=lambda row: row[0])
        del entries
        for _, is_dir, entry in ordered:
            if is_dir:
                # a top folder keeps its own journals
                inner = self._journals(Path(entry.path), prefix) if at_root else metadata
                yield from self._walk(entry.path, strip, inner, prefix, False)
                continue
            if entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                stat = entry.stat()
            except OSError:
                continue  # vanished or a dangling link
            key = entry.path[strip:].replace(os.sep, "/")
            meta = metadata.get((key, stat.st_size, str(stat.st_mtime_ns))) if metadata else None
            yield ObjectInfo(key, stat.st_size, None, _version(stat), meta or {})

    def read(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def read_head(self, key: str, length: int) -> bytes:
        with self._path(key).open("rb") as handle:
            return handle.read(length)

    def _write_temp(self, path: Path, data: bytes) -> tuple[Path, os.stat_result]:
        """`data` in a new temp file beside `path`; returns it and its stat (the size and
        mtime the renamed file keeps). Plain descriptor calls: a buffered file object would
        add a seek, a terminal check and a stat to every small output."""
        temp = _temp_name(path)
        try:
            try:
                fd = os.open(temp, _CREATE, 0o666)
            except FileNotFoundError:  # its folder is not there yet (one call, not per write)
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(temp, _CREATE, 0o666)
            try:
                stat = _write_all(fd, data)
            finally:
                os.close(fd)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return temp, stat

    def _write_unnamed(self, path: Path, data: bytes) -> os.stat_result | None:
        """Write `data` to a file with no name yet (O_TMPFILE) and give it `path`'s name
        once whole: a new output costs one file creation and no rename, and a killed
        writer leaves nothing behind. Returns its stat, or None where the file system
        cannot (the caller then writes through a named temp file)."""
        global _UNNAMED
        try:
            fd = os.open(path.parent, _UNNAMED_FLAGS, 0o666)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            return self._write_unnamed(path, data)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            _UNNAMED = False  # no O_TMPFILE on this file system: named temp files from now on
            return None
        try:
            stat = _write_all(fd, data)
            source = f"/proc/self/fd/{fd}"
            try:  # linkat(AT_SYMLINK_FOLLOW) through /proc: how an unnamed file gets a name
                os.link(source, path, src_dir_fd=_ROOT_FD, follow_symlinks=True)
            except FileExistsError:  # an output made again: named beside it, then renamed over
                temp = _temp_name(path)
                os.link(source, temp, src_dir_fd=_ROOT_FD, follow_symlinks=True)
                try:
                    os.replace(temp, path)
                except BaseException:
                    temp.unlink(missing_ok=True)
                    raise
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED + (errno.ENOENT, errno.EXDEV, errno.EPERM):
                    raise
                _UNNAMED = False  # no /proc, or such a link refused: named temp files
                return None
            return stat
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes, content_type: str,
              metadata: Mapping[str, str] | None = None) -> None:
        path = self._path(key)
        stat = self._write_unnamed(path, data) if _UNNAMED else None
        if stat is None:
            temp, stat = self._write_temp(path, data)
            try:
                os.replace(temp, path)  # keeps the mtime and size the journal names
            except BaseException:
                temp.unlink(missing_ok=True)
                raise
        if metadata:
            self._journal(key, stat.st_size, str(stat.st_mtime_ns), metadata)

    def write_stream(self, key: str, chunks: Iterable[bytes], content_type: str) -> None:
        """Write `key` from `chunks` as they come (never all of it in memory); it appears
        whole when the last one is written, or not at all."""
        path = self._path(key)
        temp, _ = self._write_temp(path, b"")
        try:
            with temp.open("ab") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise

    def write_new(self, key: str, data: bytes, content_type: str) -> bool:
        """Create `key` only if it does not exist (atomically); False if it exists."""
        path = self._path(key)
        temp, _ = self._write_temp(path, data)
        try:
            os.link(temp, path)  # fails if `path` exists, never half-written
            return True
        except FileExistsError:
            return False
        finally:
            temp.unlink(missing_ok=True)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def _journal(self, key: str, size: int, version: str, metadata: Mapping[str, str]) -> None:
        """Append one metadata entry to this writer's journal in the key's top folder."""
        top, _, rest = safe_key(key).partition("/")
        folder = (self.root / top if rest else self.root) / META_DIR
        line = json.dumps({"key": safe_key(key), "size": size, "version": version,
                           "meta": dict(metadata)}, separators=(",", ":")) + "\n"
        with self._journal_lock:
            fd = self._journals_open.get(folder)
            if fd is not None and os.fstat(fd).st_nlink == 0:  # deleted under us: anew
                os.close(self._journals_open.pop(folder))
                fd = None
            if fd is None:
                try:
                    fd = os.open(folder / self._journal_name, _APPEND, 0o666)
                except FileNotFoundError:
                    folder.mkdir(parents=True, exist_ok=True)
                    fd = os.open(folder / self._journal_name, _APPEND, 0o666)
                self._journals_open[folder] = fd
            os.write(fd, line.encode("utf-8"))  # one append: a killed writer tears one line

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def tidy(self, prefix: str) -> int:
        """Delete temp files killed writers left under `prefix` and fold its older metadata
        journals into one once the smaller ones hold as much as the largest (entries of
        files that changed since are dropped); returns how
        many files went. Anything younger than TIDY_AFTER_S is left alone, except a temp file
        whose writer was a process of this machine that is gone."""
        base = self._path(prefix)
        if not base.is_dir():
            return 0
        cutoff = time.time() - TIDY_AFTER_S
        removed = 0
        for path in base.rglob(f"{TEMP_PREFIX}*"):
            if _older(path, cutoff) or _writer_gone(path.name):
                path.unlink(missing_ok=True)
                removed += 1
        for folder in base.rglob(META_DIR):
            old = [path for path in folder.glob("*.jsonl") if _older(path, cutoff)]
            sizes = sorted(_size(path) for path in old)
            # folding lists the whole folder and rewrites every line: only once the others
            # hold as much as the largest (a nightly run that adds 1 % does not rewrite all)
            if len(old) < 2 or sum(sizes[:-1]) < sizes[-1]:
                continue
            current = {(info.key, info.size, _mtime(info.version)): info.metadata
                       for info in self.list(folder.parent.relative_to(self.root).as_posix())
                       if info.metadata}
            kept = {entry: meta for entry, meta in _read_journals(old).items()
                    if current.get(entry) == meta}
            lines = "".join(json.dumps({"key": key, "size": size, "version": version,
                                        "meta": meta}, separators=(",", ":")) + "\n"
                            for (key, size, version), meta in kept.items())
            merged = folder / f"merged-{secrets.token_hex(8)}.jsonl"
            temp, _ = self._write_temp(merged, lines.encode("utf-8"))
            os.replace(temp, merged)
            os.utime(merged, (cutoff - 1, cutoff - 1))  # old enough to be merged next time
            for path in old:
                path.unlink(missing_ok=True)
                removed += 1
        return removed


# Temp files name their writer, "<host>.<pid>.", so that one left by a killed process of this
# machine is removed by the next run at once, not after TIDY_AFTER_S.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]


# O_TMPFILE where the platform has it; switched off for the process at the first refusal
_UNNAMED_FLAGS = getattr(os, "O_TMPFILE", 0) | os.O_WRONLY | os.O_CLOEXEC
_UNNAMED = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
# any directory descriptor: it only makes os.link call linkat (the /proc path is absolute)
_ROOT_FD = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) if _UNNAMED else None
# what open(O_TMPFILE) or linkat answer where the file system or kernel cannot
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_APPEND = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


def _temp_name(path: Path) -> Path:
    """A temp file's name beside `path`: it names its writer (`_writer_gone`)."""
    return path.with_name(
        f"{TEMP_PREFIX}{_HOST}.{os.getpid()}.{secrets.token_hex(6)}-{path.name}"[:255])


def _write_all(fd: int, data: bytes) -> os.stat_result:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return os.fstat(fd)


def _close_all(descriptors: dict) -> None:
    for fd in descriptors.values():
        try:
            os.close(fd)
        except OSError:
            pass
    descriptors.clear()


def _writer_gone(name: str) -> bool:
    """A temp file's writer was a process of this host that no longer runs."""
    host, _, rest = name[len(TEMP_PREFIX):].partition(".")
    pid, _, _ = rest.partition(".")
    if host != _HOST or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _version(stat: os.stat_result) -> str:
    """A local file's version, "<mtime>-<ctime>" in ns: what a GCS generation is to an object.
    The mtime alone can be set back (`cp -p`, `rsync -t`, `exiftool -P`, two photos of the
    same mtime swapped by `mv`); the ctime cannot, and changes whenever the file is written,
    renamed or linked. So a changed source is never taken for the one an output was made
    from; a `chmod` or a new hard link costs a remake, never a change missed."""
    return f"{stat.st_mtime_ns}-{stat.st_ctime_ns}"


def _mtime(version: str) -> str:
    """The mtime of a local version (`_version`): what a journal line names an output by."""
    return version.partition("-")[0]


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except OSError:
        return False


def _read_journals(paths: list, prefix: str = "") -> dict[tuple[str, int, str], dict[str, str]]:
    """(key, size, version) -> metadata from journal files, for keys under `prefix`; a torn
    last line is skipped.

    A journal is parsed in one `json.loads` as an array of its lines (20,000 entries in
    ~0.05 s, a third of a call per line); only a journal that does not parse whole (a writer
    killed mid-line) is read line by line."""
    entries: dict[tuple[str, int, str], dict[str, str]] = {}
    for path in paths:
        try:  # bytes that are not text (a damaged journal) spoil only their own line
            text = Path(path).read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        lines = text.splitlines()
        if prefix:  # each line starts with its key: the others are not parsed at all
            start = '{"key":' + json.dumps(prefix)[:-1]
            lines = [line for line in lines if line.startswith(start)]
        try:
            parsed = json.loads("[" + ",".join(lines) + "]")
        except ValueError:
            parsed = []
            for line in lines:
                try:
                    parsed.append(json.loads(line))
                except ValueError:
                    continue
        for entry in parsed:
            try:
                meta = entry["meta"]
                entries[(entry["key"], int(entry["size"]), str(entry["version"]))] = (
                    meta if all(type(v) is str for v in meta.values())  # noqa: E721
                    else {str(k): str(v) for k, v in meta.items()})
            except (ValueError, KeyError, TypeError, AttributeError):
                continue
    return entries
