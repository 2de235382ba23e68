"""Unit tests of the output layout contract and of LocalStorage; no Prefect."""

from __future__ import annotations

import errno
import gc
import os
import posixpath
import re
import time
from datetime import datetime, timedelta, timezone

import pytest

from pixelmill import localstorage as storage_module
from pixelmill.errors import UsageError
from pixelmill.layout import (
    MAX_CHUNKS, assign_outputs, check_run_name, choose_chunk_size, make_chunks, natural_output,
    ramp_chunks, run_stamp,
)
from pixelmill.models import ChunkItem
from pixelmill.storage import TEMP_PREFIX, safe_key

# --- run names ----------------------------------------------------------------------------
from pixelmill.localstorage import LocalStorage
from pixelmill.storages import open_storage


@pytest.mark.parametrize(
    ("when", "stamp"),
    [
        (datetime(2026, 11, 21, 22, 30, 59, tzinfo=timezone.utc), "20261121T2230Z"),
        (datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc), "20260102T0304Z"),
        # Another zone is converted to UTC first (and the day rolls back).
        (datetime(2026, 3, 1, 1, 15, tzinfo=timezone(timedelta(hours=2))), "20260228T2315Z"),
    ],
)
def test_run_stamp_is_utc_minute(when, stamp):
    assert run_stamp(when) == stamp


def test_run_stamp_defaults_to_now_utc():
    before = datetime.now(timezone.utc).replace(second=0, microsecond=0)
    stamp = run_stamp()
    after = datetime.now(timezone.utc)
    assert re.fullmatch(r"\d{8}T\d{4}Z", stamp)
    parsed = datetime.strptime(stamp, "%Y%m%dT%H%MZ").replace(tzinfo=timezone.utc)
    assert before <= parsed <= after


def test_run_stamp_is_utc_whatever_the_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "XST-14")  # POSIX for UTC+14: the local date differs from UTC
    time.tzset()
    try:
        assert time.localtime().tm_gmtoff == 14 * 3600
        stamp = run_stamp()
        now = datetime.now(timezone.utc)
    finally:
        monkeypatch.undo()
        time.tzset()
    parsed = datetime.strptime(stamp, "%Y%m%dT%H%MZ").replace(tzinfo=timezone.utc)
    assert timedelta(0) <= now - parsed < timedelta(minutes=2)


@pytest.mark.parametrize("name", ["demo", "20261121T2230Z", "run-1.b_2", "x" * 100])
def test_check_run_name_accepts(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["../x", "a/b", "", "..", ".hidden", "a..b", "a b", "x" * 101,
                                  "a\\b", "-flag"])
def test_check_run_name_rejects(name):
    with pytest.raises(UsageError, match="--run-name") as error:
        check_run_name(name)
    assert repr(name) in str(error.value)


# --- output paths -------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("relpath", "extension", "expected"),
    [
        ("trips/a.PNG", ".jpg", "trips/a.jpg"),
        ("a.jpeg", ".jpg", "a.jpg"),
        ("a.jpg", ".webp", "a.webp"),
        ("scan.tiff", ".png", "scan.png"),
        ("notes.txt", ".jpg", "notes.txt.jpg"),
        ("noext", ".avif", "noext.avif"),
    ],
)
def test_natural_output(relpath, extension, expected):
    assert natural_output(relpath, extension) == expected


def test_assign_outputs_keeps_sub_paths():
    outputs = assign_outputs(["trips/2024/a.jpg", "b.png", "family/c.jpeg"], ".jpg")
    assert outputs == {"trips/2024/a.jpg": "trips/2024/a.jpg", "b.png": "b.jpg",
                       "family/c.jpeg": "family/c.jpg"}


@pytest.mark.parametrize("order", [["x.png", "x.jpg"], ["x.jpg", "x.png"]], ids=["png-first",
                                                                              "jpg-first"])
def test_assign_outputs_x_png_and_x_jpg_both_survive(order):
    assert assign_outputs(order, ".jpg") == {"x.jpg": "x.jpg", "x.png": "x.png.jpg"}


def test_assign_outputs_same_name_in_two_folders():
    outputs = assign_outputs(["trips/a.jpg", "family/a.jpg"], ".jpg")
    assert outputs == {"trips/a.jpg": "trips/a.jpg", "family/a.jpg": "family/a.jpg"}


def test_assign_outputs_many_meeting_names_stay_distinct():
    sources = ["x.jpg", "x.png", "x.gif", "x.jpeg", "x.png.jpg", "X.JPG", "x.webp"]
    outputs = assign_outputs(sources, ".jpg")
    assert set(outputs) == set(sources)
    assert len(set(outputs.values())) == len(sources)
    assert outputs["x.jpg"] == "x.jpg" and outputs["x.png.jpg"] == "x.png.jpg"
    assert all(value.endswith(".jpg") for value in outputs.values())
    # Deterministic: the input order does not matter.
    assert assign_outputs(reversed(sources), ".jpg") == outputs


HOSTILE_KEYS = [
    "../x.jpg", "/abs/y.png", "a/../../b.jpg", "./c.jpg", "d//e.jpg", "..", "__/x.jpg",
    "a\\..\\..\\f.jpg", "../../../etc/passwd", "g/./h/../i.png", "/", "//j.jpg",
]


def test_assign_outputs_never_escapes_the_run_folder():
    sources = [key for key in HOSTILE_KEYS if key != "/"]
    outputs = assign_outputs(sources, ".jpg")
    assert len(set(outputs.values())) == len(sources)
    for source, output in outputs.items():
        assert not output.startswith("/"), (source, output)
        assert ".." not in output.split("/"), (source, output)
        assert "" not in output.split("/") and "." not in output.split("/"), (source, output)
        joined = posixpath.normpath(posixpath.join("/dest/run/resized", output))
        assert joined.startswith("/dest/run/resized/"), (source, output)


@pytest.mark.parametrize(
    ("key", "safe"),
    [("../../etc/x", "__/__/etc/x"), ("/abs/y", "abs/y"), ("a//b/./c", "a/b/c"),
     ("a\\..\\b", "a/__/b"), ("...", "...")],
)
def test_safe_key(key, safe):
    assert safe_key(key) == safe


@pytest.mark.parametrize("key", ["", "/", "./.", "//"])
def test_safe_key_rejects_empty(key):
    with pytest.raises(ValueError, match="empty"):
        safe_key(key)


# --- chunking -----------------------------------------------------------------------------

def _items(count: int) -> list[ChunkItem]:
    return [ChunkItem(source=f"s/{n:05d}.jpg", output=f"{n:05d}.jpg") for n in range(count)]


def test_small_run_is_split_across_two_cores():
    size = choose_chunk_size(24, 2)
    assert len(make_chunks(_items(24), size)) >= 2


def test_chunks_of_a_camera_batch_share_the_cores_and_stay_near_the_target():
    assert choose_chunk_size(600, 2) == 75  # 8 chunks: 4 per core, ~1.7 s of work each
    assert choose_chunk_size(100_000, 64) == 667  # the 150-chunk cap wins over the target
    assert choose_chunk_size(10_000, 8) == 80


def test_chunks_of_small_images_hold_more_of_them():
    """Thumbnail-sized sources (~12 KB, ~4 ms of work each) in chunks of ~1.6 s of work: a
    tenth of the task runs that chunks of 80 would cost."""
    assert choose_chunk_size(20_000, 2, 11_500) == 434  # 47 chunks, not 150
    assert choose_chunk_size(400, 2, 250_000) == 50  # camera JPEGs: 8 chunks as before


@pytest.mark.parametrize(("images", "cores", "chunks"), [(200, 2, 4), (40, 2, 2), (3, 2, 2),
                                                         (100, 8, 8), (100, 1, 2)])
def test_a_small_batch_makes_few_chunks_in_a_multiple_of_the_cores(images, cores, chunks):
    """A nightly top-up of a few hundred small images: enough chunks to share the cores,
    not four per core of a few milliseconds each."""
    size = choose_chunk_size(images, cores, 11_500)
    assert -(-images // size) == chunks


def test_a_long_batch_starts_with_small_chunks_and_keeps_every_item_once():
    """400 camera JPEGs on 2 cores: the first chunk of each core holds a quarter of a chunk,
    so the first results come after ~0.25 s of work instead of ~1 s."""
    size = choose_chunk_size(400, 2, 250_000)
    ramp = ramp_chunks(400, size, 2, 250_000)
    chunks = make_chunks(_items(400), size, ramp)
    assert [len(chunk.items) for chunk in chunks[:3]] == [size // 4, size // 4, size]
    assert [item for chunk in chunks for item in chunk.items] == _items(400)
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))


@pytest.mark.parametrize(("images", "mean_bytes"), [(200, 11_500), (3, 250_000),
                                                    (16, 250_000), (30_000, 250_000)])
def test_no_small_chunks_for_short_work_few_waves_or_at_the_cap(images, mean_bytes):
    size = choose_chunk_size(images, 2, mean_bytes)
    assert ramp_chunks(images, size, 2, mean_bytes) == 0


@pytest.mark.parametrize("cores", [1, 2, 8, 64])
def test_large_run_stays_under_the_chunk_cap(cores):
    size = choose_chunk_size(5000, cores)
    assert len(make_chunks(_items(5000), size)) <= 150


@pytest.mark.parametrize("images", [1, 2, 7, 24, 149, 150, 151, 999, 6000, 20000])
@pytest.mark.parametrize("cores", [1, 2, 16])
@pytest.mark.parametrize("mean_bytes", [None, 0, 11_500, 3_000_000])
def test_chunk_count_bounds(images, cores, mean_bytes):
    size = choose_chunk_size(images, cores, mean_bytes)
    ramp = ramp_chunks(images, size, cores, mean_bytes)
    chunks = len(make_chunks(_items(images), size, ramp))
    assert size >= 1
    assert chunks <= MAX_CHUNKS
    if images >= 2 and cores >= 2:
        assert chunks >= 2


@pytest.mark.parametrize("images", [0, -3])
def test_choose_chunk_size_for_no_images(images):
    assert choose_chunk_size(images, 2) == 1


@pytest.mark.parametrize(("count", "size"), [(0, 3), (1, 1), (10, 3), (12, 4), (5, 40)])
def test_make_chunks_covers_every_item_once(count, size):
    items = _items(count)
    chunks = make_chunks(items, size)
    flat = [item for chunk in chunks for item in chunk.items]
    assert flat == items  # every item exactly once, in order
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    assert all(1 <= len(chunk.items) <= size for chunk in chunks)
    assert len(chunks) == -(-count // size)


def test_make_chunks_rejects_zero():
    with pytest.raises(UsageError, match="--chunk-size 0"):
        make_chunks(_items(3), 0)


def test_chunk_label_is_zero_padded():
    assert make_chunks(_items(3), 1)[2].label == "002"


# --- LocalStorage -------------------------------------------------------------------------

def _all_files(folder) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.fixture(params=["unnamed", "named"])
def store(request, tmp_path, monkeypatch) -> LocalStorage:
    """Each test on both ways of writing a new file: with no name, then linked into place
    (O_TMPFILE, where the file system has it), and through a named temp file."""
    if request.param == "unnamed" and not storage_module._UNNAMED:
        pytest.skip("no O_TMPFILE here")
    monkeypatch.setattr(storage_module, "_UNNAMED", request.param == "unnamed")
    return LocalStorage(tmp_path / "root")


def test_write_read_exists(store):
    store.write("a/b/c.jpg", b"pixels", "image/jpeg")
    assert store.read("a/b/c.jpg") == b"pixels"
    assert store.read_head("a/b/c.jpg", 3) == b"pix"
    assert store.exists("a/b/c.jpg")
    assert not store.exists("a/b/missing.jpg")
    assert not store.exists("a/b")  # a folder is not an object
    assert _all_files(store.root) == ["a/b/c.jpg"]  # no temp file left behind


def test_write_replaces_existing(store):
    store.write("x.jpg", b"old", "image/jpeg")
    store.write("x.jpg", b"new", "image/jpeg")
    assert store.read("x.jpg") == b"new"
    assert _all_files(store.root) == ["x.jpg"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()],
                         ids=["oserror", "interrupt"])
def test_failed_write_leaves_nothing(store, monkeypatch, error):
    if storage_module._UNNAMED:  # the unnamed file fails as it is given its name
        if isinstance(error, OSError):
            error = OSError(errno.ENOSPC, "disk full")

        def fail(src, dst, **kwargs):
            assert src.startswith("/proc/self/fd/")
            raise error

        monkeypatch.setattr(storage_module.os, "link", fail)
    else:
        def fail(src, dst):
            assert os.path.basename(src).startswith(TEMP_PREFIX)  # about to rename a temp
            raise error

        monkeypatch.setattr(storage_module.os, "replace", fail)
    with pytest.raises(type(error)):
        store.write("sub/new.jpg", b"half", "image/jpeg")
    monkeypatch.undo()
    assert _all_files(store.root) == []
    assert not store.exists("sub/new.jpg")


def test_failed_overwrite_keeps_the_old_object(store, monkeypatch):
    store.write("keep.jpg", b"old", "image/jpeg")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage_module.os, "replace", fail)
    with pytest.raises(OSError):
        store.write("keep.jpg", b"new", "image/jpeg")
    monkeypatch.undo()
    assert store.read("keep.jpg") == b"old"
    assert _all_files(store.root) == ["keep.jpg"]


def test_a_new_file_is_written_with_no_name_until_it_is_whole(tmp_path, monkeypatch):
    if not storage_module._UNNAMED:
        pytest.skip("no O_TMPFILE here")
    store = LocalStorage(tmp_path / "root")
    seen = []
    real_write = os.write

    def write(fd, data):  # what the folder holds while the bytes go in
        seen.append(_all_files(store.root))
        return real_write(fd, data)

    monkeypatch.setattr(storage_module.os, "write", write)
    store.write("a/new.jpg", b"pixels" * 1000, "image/jpeg")
    store.write("a/new.jpg", b"again" * 1000, "image/jpeg")  # an output made again
    monkeypatch.undo()
    assert seen == [[], ["a/new.jpg"]]  # no temp name in the folder, not even in flight
    assert store.read("a/new.jpg") == b"again" * 1000
    assert _all_files(store.root) == ["a/new.jpg"]


def test_a_file_system_without_unnamed_files_gets_named_temp_files(tmp_path, monkeypatch):
    def refuse(path, flags, mode=0o777, **kwargs):
        if flags & getattr(os, "O_TMPFILE", 0):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, mode, **kwargs)

    real_open = os.open
    monkeypatch.setattr(storage_module, "_UNNAMED", True)
    monkeypatch.setattr(storage_module.os, "open", refuse)
    store = LocalStorage(tmp_path / "root")
    store.write("a/x.jpg", b"1", "image/jpeg", {"pixelmill-made": "s1"})
    store.write("a/y.jpg", b"2", "image/jpeg", {"pixelmill-made": "s2"})
    assert storage_module._UNNAMED is False  # asked once, not at every write
    monkeypatch.undo()
    assert {info.key: info.metadata for info in store.list()} == {
        "a/x.jpg": {"pixelmill-made": "s1"}, "a/y.jpg": {"pixelmill-made": "s2"}}


def test_a_storage_keeps_its_journal_open_and_closes_it_when_dropped(tmp_path, monkeypatch):
    opened = []
    real_open = os.open

    def counting(path, flags, mode=0o777, **kwargs):
        fd = real_open(path, flags, mode, **kwargs)
        if str(path).endswith(".jsonl"):
            opened.append(fd)
        return fd

    monkeypatch.setattr(storage_module.os, "open", counting)
    store = LocalStorage(tmp_path / "root")
    for number in range(20):
        store.write(f"run/resized/{number}.jpg", b"x", "image/jpeg", {"pixelmill-made": "s"})
    assert len(opened) == 1  # one journal, opened once for 20 entries
    monkeypatch.undo()
    assert len([info for info in store.list("run/") if info.metadata]) == 20
    journal = os.readlink(f"/proc/self/fd/{opened[0]}")
    assert journal.endswith(".jsonl")
    del store
    gc.collect()
    try:  # its descriptor is closed with it (the number may have been given out again)
        now = os.readlink(f"/proc/self/fd/{opened[0]}")
    except FileNotFoundError:
        now = None
    assert now != journal


def test_list_skips_temp_files(store):
    store.write("a/x.jpg", b"1", "image/jpeg")
    (store.root / "a" / f"{TEMP_PREFIX}0123abcd-y.jpg").write_bytes(b"in flight")
    (store.root / f"{TEMP_PREFIX}feed-z.jpg").write_bytes(b"in flight")
    assert [info.key for info in store.list()] == ["a/x.jpg"]


def test_list_keys_are_relative_sizes_and_versions(store):
    store.write("trips/a.jpg", b"12345", "image/jpeg")
    store.write("trips/deep/b.png", b"12", "image/png")
    listed = {info.key: info for info in store.list()}
    assert set(listed) == {"trips/a.jpg", "trips/deep/b.png"}
    assert listed["trips/a.jpg"].size == 5 and listed["trips/deep/b.png"].size == 2
    assert all(info.version for info in listed.values())
    # A prefix narrows the listing; keys stay relative to the root, not the prefix.
    assert [info.key for info in store.list("trips/deep")] == ["trips/deep/b.png"]
    assert list(store.list("nothing-here")) == []


def test_list_is_sorted_within_folders(store):
    for key in ["c.jpg", "a.jpg", "b.jpg", "sub/z.jpg", "sub/m.jpg"]:
        store.write(key, b"x", "image/jpeg")
    keys = [info.key for info in store.list()]
    assert keys[:3] == ["a.jpg", "b.jpg", "c.jpg"]
    assert keys[3:] == ["sub/m.jpg", "sub/z.jpg"]


def test_list_keys_are_globally_sorted(store):
    for key in ["b.jpg", "a/x.jpg"]:
        store.write(key, b"x", "image/jpeg")
    keys = [info.key for info in store.list()]
    assert keys == sorted(keys)


@pytest.mark.parametrize("key", ["../../etc/x", "/etc/y", "a/../../../z", "..\\..\\w"])
def test_escaping_keys_stay_inside_root(tmp_path, store, key):
    store.write(key, b"trapped", "text/plain")
    assert _all_files(tmp_path) == [f"root/{safe_key(key)}"]
    assert store.read(key) == b"trapped"
    assert [info.key for info in store.list()] == [safe_key(key)]


def test_join_and_uri(store, tmp_path):
    assert store.uri == str(tmp_path / "root")
    expected = str(tmp_path / "root" / "run" / "gallery" / "index.html")
    assert store.join("run", "gallery", "index.html") == expected


@pytest.mark.parametrize("uri", ["", "gs://", "gs:///x", "s3://bucket/x", "http://host/x"])
def test_open_storage_refuses(uri):
    with pytest.raises(UsageError):
        open_storage(uri)


def test_open_storage_local(tmp_path):
    opened = open_storage(str(tmp_path))
    assert isinstance(opened, LocalStorage)
    assert opened.root == tmp_path


def test_local_storage_reads_and_writes_in_line_and_keeps_errors_per_item(tmp_path):
    from pixelmill.gcs import GcsStorage
    from pixelmill.overlap import Writer, prefetched

    assert LocalStorage.overlap is False and GcsStorage.overlap is True
    reads = []

    def read(name):
        reads.append(name)
        if name == "bad":
            raise FileNotFoundError(name)
        return name.upper()

    stream = prefetched(["a", "bad", "c"], read, depth=0)
    item, data = next(stream)
    assert (item, data.result(), reads) == ("a", "A", ["a"])  # nothing read ahead
    item, data = next(stream)
    with pytest.raises(FileNotFoundError):
        data.result()  # the failed read is this item's, the stream goes on
    assert [(i, d.result()) for i, d in stream] == [("c", "C")]

    storage = LocalStorage(tmp_path)
    with Writer(storage.write, background=False) as writer:
        writer.submit("r/x.bin", b"x", "application/octet-stream")
        assert (tmp_path / "r/x.bin").read_bytes() == b"x"  # written when submitted


def test_a_folder_removed_while_a_storage_writes_is_made_again(tmp_path):
    import shutil

    storage = LocalStorage(tmp_path / "dst")
    storage.write("r/resized/a/x.jpg", b"1", "image/jpeg", {"pixelmill-made": "s1"})
    shutil.rmtree(tmp_path / "dst")  # someone empties the destination mid-run
    storage.write("r/resized/a/y.jpg", b"2", "image/jpeg", {"pixelmill-made": "s2"})
    listed = {info.key: info.metadata for info in storage.list("r/")}
    assert listed == {"r/resized/a/y.jpg": {"pixelmill-made": "s2"}}
