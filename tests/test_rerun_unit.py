"""Re-runs decided by the destination, without Prefect: stamps with each output, discovery
against the run folder's listing, and the run folder's lock (local folders; GCS in test_gcs)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from PIL import Image

from pixelmill import pipeline, provenance, runlock
from pixelmill.errors import UsageError
from pixelmill.imageops import decode
from pixelmill.models import ChunkResult, ImageResult, Job
from pixelmill.runlock import Holder, RunFolderBusy, RunLock
from pixelmill.spec import PipelineSpec
from pixelmill.storage import META_DIR, TEMP_PREFIX
from pixelmill.localstorage import _HOST, LocalStorage
from tests.helpers import encode

RUN = "r"


def photos(folder, count: int) -> LocalStorage:
    for number in range(count):
        path = folder / f"set{number % 2}" / f"{number}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(Image.new("RGB", (64, 48), (40 * number % 255, 90, 20)), "jpeg"))
    return LocalStorage(folder)


def run_once(source: LocalStorage, dest: LocalStorage, job: Job) -> list[ImageResult]:
    """What a run does, stage by stage, on plain storage: discover, resize, filter."""
    plan = pipeline.discover(source, dest, job, chunk_size=2)
    results = list(plan.kept) + list(plan.rejected)
    for chunk in plan.chunks:
        from pixelmill.models import ChunkResult

        resized = pipeline.resize_images(chunk.items, job.without_filters(), source, dest)
        filtered = pipeline.filter_images(ChunkResult(index=chunk.index, images=tuple(resized)),
                                          job, dest)
        results.extend(filtered)
    return sorted(results, key=lambda image: image.source)


def mtimes(dest: LocalStorage) -> dict[str, str]:
    """Each output's version (its mtime and ctime): a rewritten file has a new one."""
    return {info.key: info.version for info in dest.list(f"{RUN}/")
            if not info.key.endswith(".json")}


@pytest.fixture
def setup(tmp_path):
    source = photos(tmp_path / "src", 6)
    dest = LocalStorage(tmp_path / "dst")
    job = Job(source=source.uri, destination=dest.uri, run=RUN,
              spec=PipelineSpec(size=(32, 24), filters=("blur",)))
    return source, dest, job


def test_local_metadata_comes_back_with_the_listing_and_only_for_the_file_it_describes(tmp_path):
    store = LocalStorage(tmp_path)
    store.write("run/a/x.jpg", b"one", "image/jpeg", {"pixelmill-made": "s1"})
    store.write("run/b.jpg", b"two", "image/jpeg")
    listed = {info.key: info.metadata for info in store.list("run/")}
    assert listed == {"run/a/x.jpg": {"pixelmill-made": "s1"}, "run/b.jpg": {}}
    assert {info.key for info in store.list("run/a")} == {"run/a/x.jpg"}
    assert next(iter(store.list("run/a"))).metadata == {"pixelmill-made": "s1"}
    assert (tmp_path / "run" / META_DIR).is_dir()  # in the run folder, hidden from listings
    time.sleep(0.01)
    (tmp_path / "run/a/x.jpg").write_bytes(b"replaced by hand")  # no longer what was made
    assert next(iter(store.list("run/a"))).metadata == {}


def test_a_torn_journal_line_is_ignored(tmp_path):
    store = LocalStorage(tmp_path)
    store.write("run/x.jpg", b"one", "image/jpeg", {"pixelmill-made": "s1"})
    [journal] = (tmp_path / "run" / META_DIR).glob("*.jsonl")
    with journal.open("a") as handle:
        handle.write('{"key": "run/x.jpg", "si')  # a writer killed mid-line
    assert next(iter(store.list("run/"))).metadata == {"pixelmill-made": "s1"}


def test_bytes_that_are_not_text_in_a_journal_cost_only_their_line(tmp_path):
    """A damaged journal (a disk error, a stray write) never stops a run: its good lines
    still count, the rest is made again."""
    store = LocalStorage(tmp_path)
    store.write("run/x.jpg", b"one", "image/jpeg", {"pixelmill-made": "s1"})
    store.write("run/y.jpg", b"two", "image/jpeg", {"pixelmill-made": "s2"})
    [journal] = (tmp_path / "run" / META_DIR).glob("*.jsonl")
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + b"\xff\xfe garbage \x80\n" + lines[1][:5] + b"\xff" +
                        lines[1][6:])
    assert {info.key: info.metadata for info in store.list("run/")} == \
        {"run/x.jpg": {"pixelmill-made": "s1"}, "run/y.jpg": {}}


def test_tidy_merges_old_journals_and_keeps_young_files(tmp_path):
    store = LocalStorage(tmp_path)
    for number in range(3):
        LocalStorage(tmp_path).write(f"run/{number}.jpg", b"x", "image/jpeg",
                                     {"pixelmill-made": str(number)})
    young_temp = tmp_path / "run" / f"{TEMP_PREFIX}young-a.jpg"
    old_temp = tmp_path / "run" / f"{TEMP_PREFIX}old-b.jpg"
    young_temp.write_bytes(b"half")
    old_temp.write_bytes(b"half")
    old = time.time() - 2 * runlock.LOCK_STALE_S - 3600
    os.utime(old_temp, (old, old))
    for journal in (tmp_path / "run" / META_DIR).glob("*.jsonl"):
        os.utime(journal, (old, old))
    before = {info.key: info.metadata for info in store.list("run/")}
    store.tidy("run")
    assert not old_temp.exists() and young_temp.exists()  # another writer may own it
    assert len(list((tmp_path / "run" / META_DIR).glob("*.jsonl"))) == 1
    assert {info.key: info.metadata for info in store.list("run/")} == before


def test_a_temp_file_of_a_killed_writer_on_this_machine_goes_at_once(tmp_path):
    """A writer killed mid-write leaves its temp file; the next run's tidy removes it at once
    when its writer (named in the file) was a process of this machine that is gone, and
    leaves a live writer's alone, however old."""
    store = LocalStorage(tmp_path)
    store.write("run/a.jpg", b"x", "image/jpeg")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    killed = tmp_path / "run" / f"{TEMP_PREFIX}{_HOST}.{dead}.abc-b.jpg"
    alive = tmp_path / "run" / f"{TEMP_PREFIX}{_HOST}.{os.getpid()}.abc-c.jpg"
    for path in (killed, alive):
        path.write_bytes(b"half")
    store.tidy("run")  # both are young: only the dead writer's goes
    assert not killed.exists() and alive.exists()


def test_a_second_run_keeps_everything_and_reports_it_kept(setup):
    source, dest, job = setup
    first = run_once(source, dest, job)
    assert [image.status for image in first] == ["ok"] * 6
    before = mtimes(dest)
    plan = pipeline.discover(source, dest, job, chunk_size=2)
    assert plan.chunks == () and len(plan.kept) == 6
    by_source = {image.source: image for image in first}
    for image in plan.kept:  # kept images are reported as fully as made ones
        made = by_source[image.source]
        assert image.status == "skipped"
        assert (image.width, image.height, image.outputs) == (made.width, made.height,
                                                                made.outputs)
    assert mtimes(dest) == before


def test_deleted_outputs_and_only_those_are_made_again(setup):
    source, dest, job = setup
    run_once(source, dest, job)
    before = mtimes(dest)
    gone = [f"{RUN}/blur/set0/0.jpg", f"{RUN}/resized/set1/3.jpg"]
    for key in gone:
        dest.delete(key)
    results = run_once(source, dest, job)
    assert sorted(image.source for image in results if image.status == "ok") == \
        ["set0/0.jpg", "set1/3.jpg"]
    after = mtimes(dest)
    assert set(after) == set(before)
    assert sorted(key for key in after if after[key] != before[key]) == sorted(gone)


def test_everything_deleted_is_everything_made(setup):
    source, dest, job = setup
    run_once(source, dest, job)
    for key in mtimes(dest):
        dest.delete(key)
    results = run_once(source, dest, job)
    assert [image.status for image in results] == ["ok"] * 6
    assert len(mtimes(dest)) == 12


def test_a_changed_source_remakes_only_its_outputs(setup, tmp_path):
    source, dest, job = setup
    run_once(source, dest, job)
    before = mtimes(dest)
    time.sleep(0.01)
    (tmp_path / "src/set1/1.jpg").write_bytes(encode(Image.new("RGB", (64, 48), "white"),
                                                     "jpeg"))
    results = run_once(source, dest, job)
    assert [image.source for image in results if image.status == "ok"] == ["set1/1.jpg"]
    after = mtimes(dest)
    assert sorted(key for key in after if after[key] != before[key]) == \
        [f"{RUN}/blur/set1/1.jpg", f"{RUN}/resized/set1/1.jpg"]


def test_a_source_changed_behind_a_restored_mtime_is_made_again(setup, tmp_path):
    """`cp -p`, `rsync -t` or `exiftool -P` write a source and set its mtime back; two
    photos of one mtime swapped by `mv` keep theirs. Neither may pass for the source an
    output was made from."""
    source, dest, job = setup
    run_once(source, dest, job)
    changed, first, second = (tmp_path / "src" / name
                              for name in ("set1/1.jpg", "set0/0.jpg", "set0/2.jpg"))
    # written in place, same size, mtime set back
    before = changed.stat()
    data = bytearray(changed.read_bytes())
    data[-3] ^= 0xFF  # a different last scan byte, the same length
    changed.write_bytes(bytes(data))
    os.utime(changed, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (changed.stat().st_size, changed.stat().st_mtime_ns) == \
        (before.st_size, before.st_mtime_ns)
    # two photos of one mtime swapped by renaming
    same = first.stat().st_mtime_ns
    os.utime(second, ns=(same, same))
    os.utime(first, ns=(same, same))
    results = run_once(source, dest, job)  # the two now stamped with that one mtime
    assert "set1/1.jpg" in [image.source for image in results if image.status == "ok"]
    before = mtimes(dest)
    first.rename(tmp_path / "swap")
    second.rename(first)
    (tmp_path / "swap").rename(second)
    results = run_once(source, dest, job)
    assert sorted(image.source for image in results if image.status == "ok") == \
        ["set0/0.jpg", "set0/2.jpg"]
    after = mtimes(dest)
    assert sorted(key for key in after if after[key] != before[key]) == [
        f"{RUN}/{folder}/set0/{n}.jpg" for folder in ("blur", "resized") for n in (0, 2)]


def test_a_kept_resized_output_that_no_longer_decodes_is_made_again(setup, tmp_path):
    """Damaged on disk behind a stamp that still matches (same length, mtime set back), with
    its filter output gone: the filter stage fails the image once and removes the damaged
    file, and the next run makes both again, instead of failing on every run."""
    source, dest, job = setup
    run_once(source, dest, job)
    resized = tmp_path / "dst" / RUN / "resized/set1/1.jpg"
    before = resized.stat()
    resized.write_bytes(b"\0" * before.st_size)
    os.utime(resized, ns=(before.st_atime_ns, before.st_mtime_ns))
    dest.delete(f"{RUN}/blur/set1/1.jpg")
    [damaged] = [image for image in run_once(source, dest, job) if image.source == "set1/1.jpg"]
    assert damaged.status == "failed" and damaged.outputs == {}
    assert "resized/set1/1.jpg does not decode" in damaged.error
    assert not resized.exists()  # nothing undecodable is left behind a good stamp
    # the filter task retried on the same resize result: that image fails, never its chunk
    [retried] = pipeline.filter_images(
        ChunkResult(index=0, images=(ImageResult(source="set1/1.jpg", status="ok",
                                                 outputs={"resized": "resized/set1/1.jpg"}),)),
        job, dest)
    assert retried.status == "failed" and "resized/set1/1.jpg is missing" in retried.error
    [again] = [image for image in run_once(source, dest, job) if image.source == "set1/1.jpg"]
    assert again.status == "ok" and set(again.outputs) == {"resized", "blur"}
    for output in again.outputs.values():
        assert decode(dest.read(f"{RUN}/{output}")).size == (32, 24)


def test_other_settings_remake_every_output_they_shape(setup):
    source, dest, job = setup
    run_once(source, dest, job)
    before = mtimes(dest)
    bigger = job.model_copy(update={"spec": job.spec.model_copy(update={"size": (48, 36)})})
    results = run_once(source, dest, bigger)
    assert [image.status for image in results] == ["ok"] * 6
    assert all(image.width == 48 for image in results)
    after = mtimes(dest)
    assert all(after[key] != before[key] for key in before)  # resized and blurred alike


def test_a_new_filter_makes_only_its_outputs(setup):
    source, dest, job = setup
    run_once(source, dest, job)
    before = mtimes(dest)
    more = job.model_copy(update={"spec": job.spec.model_copy(
        update={"filters": ("blur", "emboss")})})
    results = run_once(source, dest, more)
    assert all(set(image.outputs) == {"resized", "blur", "emboss"} for image in results)
    after = mtimes(dest)
    assert all(after[key] == before[key] for key in before)
    assert len([key for key in after if "/emboss/" in key]) == 6


def test_new_images_are_chunked_on_their_own(setup, tmp_path):
    source, dest, job = setup
    run_once(source, dest, job)
    photos(tmp_path / "src" / "new", 3)
    plan = pipeline.discover(source, dest, job, chunk_size=2)
    assert len(plan.kept) == 6
    assert sorted(item.source for chunk in plan.chunks for item in chunk.items) == \
        ["new/set0/0.jpg", "new/set0/2.jpg", "new/set1/1.jpg"]


def test_chunk_size_is_raised_to_stay_within_the_chunk_cap(tmp_path, caplog):
    from pixelmill.layout import MAX_CHUNKS, cap_chunk_size

    assert cap_chunk_size(1_000_000, 10) == -(-1_000_000 // MAX_CHUNKS)
    assert cap_chunk_size(100, 10) == 10
    with pytest.raises(UsageError):
        cap_chunk_size(100, 0)
    source = photos(tmp_path / "src", MAX_CHUNKS + 10)
    dest = LocalStorage(tmp_path / "dst")
    job = Job(source=source.uri, destination=dest.uri, run=RUN, spec=PipelineSpec(size=(8, 8)))
    plan = pipeline.discover(source, dest, job, chunk_size=1)
    assert len(plan.chunks) <= MAX_CHUNKS and plan.chunk_size == 2
    assert "--chunk-size 1 would make 160 chunks" in caplog.text


def test_stamps_depend_on_source_version_and_settings():
    spec = PipelineSpec(size=(40, 30), filters=("blur",))
    base = provenance.resized_stamp("a.jpg", "1", spec)
    assert base == provenance.resized_stamp("a.jpg", "1", spec)
    assert base != provenance.resized_stamp("a.jpg", "2", spec)
    assert base != provenance.resized_stamp("b.jpg", "1", spec)
    assert base != provenance.resized_stamp("a.jpg", "1", spec.model_copy(
        update={"quality": 90}))
    # the resized output does not depend on the filters; a filter output does on its filter
    assert base == provenance.resized_stamp("a.jpg", "1", spec.model_copy(
        update={"filters": ()}))
    assert provenance.filter_stamp("a.jpg", "1", spec, "blur") != \
        provenance.filter_stamp("a.jpg", "1", spec, "emboss")


# -- the run folder's lock -------------------------------------------------------------------


def test_a_second_holder_is_refused_with_the_first_named(tmp_path):
    store = LocalStorage(tmp_path)
    first = RunLock(store, "r/.pixelmill-lock.json", Holder(flow_run="id-1",
                                                            flow_run_name="brave-otter"), "r")
    with first:
        second = RunLock(store, "r/.pixelmill-lock.json", Holder(flow_run="id-2"), "r")
        with pytest.raises(RunFolderBusy) as refused:
            second.acquire()
        assert "run folder r is in use by flow run brave-otter (id-1)" in str(refused.value)
        assert isinstance(refused.value, UsageError)  # exit 2 in the CLI
    assert not (tmp_path / "r/.pixelmill-lock.json").exists()
    with RunLock(store, "r/.pixelmill-lock.json", Holder(flow_run="id-2"), "r"):
        pass


def test_the_same_flow_run_takes_its_lock_back(tmp_path):
    store = LocalStorage(tmp_path)
    crashed = RunLock(store, "r/l.json", Holder(flow_run="id-1"), "r").acquire()
    crashed._stop.set()  # its process died: no heartbeat, never released
    with RunLock(store, "r/l.json", Holder(flow_run="id-1"), "r"):  # Prefect's Retry
        pass


def test_a_dead_processes_lock_is_taken_over_at_once(tmp_path):
    store = LocalStorage(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = Holder(flow_run="id-dead", pid=int(dead))
    RunLock(store, "r/l.json", stale, "r").acquire()._stop.set()  # as if that process died
    with RunLock(store, "r/l.json", Holder(flow_run="id-new"), "r") as lock:
        assert runlock._read(store, "r/l.json").token == lock.holder.token


def test_a_lock_without_heartbeat_is_stale_on_another_host(tmp_path):
    store = LocalStorage(tmp_path)
    far = Holder(flow_run="elsewhere", host="another-host",
                 heartbeat=time.time() - runlock.LOCK_STALE_S - 1)
    assert far.dead(time.time())
    assert not Holder(flow_run="elsewhere", host="another-host").dead(time.time())
    store.write("r/l.json", __import__("json").dumps(far.__dict__).encode(), "application/json")
    with RunLock(store, "r/l.json", Holder(flow_run="here"), "r"):
        pass


def test_two_processes_racing_for_one_folder_one_wins(tmp_path):
    script = f"""
import sys, time
from pixelmill.runlock import Holder, RunFolderBusy, RunLock
from pixelmill.localstorage import LocalStorage
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
try:
    lock = RunLock(LocalStorage({str(tmp_path)!r}), "r/l.json", Holder(flow_run=sys.argv[2]),
                   "r").acquire()
except RunFolderBusy:
    print("refused")
else:
    print("held"); time.sleep(1.5); lock.release()
"""
    start = str(time.time() + 2.0)
    racers = [subprocess.Popen([sys.executable, "-c", script, start, f"run-{n}"],
                               stdout=subprocess.PIPE, text=True) for n in range(4)]
    said = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
    assert said == ["held", "refused", "refused", "refused"]


def test_a_flow_given_a_file_as_destination_is_refused_in_one_line(tmp_path, prefect_api):
    """A deployment run gets no CLI checks: the flow refuses it itself, before any retry."""
    from flows.process_images import make_task_runner, process_images

    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.jpg").write_bytes(encode(Image.new("RGB", (8, 8)), "jpeg"))
    (tmp_path / "out").write_text("not a folder")
    state = process_images.with_options(task_runner=make_task_runner("threads"))(
        source=str(tmp_path / "src"), destination=str(tmp_path / "out"), return_state=True)
    assert state.is_failed()
    assert state.message.startswith(f"DEST {tmp_path / 'out'} is a file, not a folder")
    assert (tmp_path / "out").read_text() == "not a folder"


def test_a_decoder_error_of_any_kind_fails_that_image_only(tmp_path, monkeypatch):
    """Pillow raises ValueError, SyntaxError, ... from damaged files (a GIF's frame table, a
    PSD's layers): the image fails with the reason, its chunk's other images are made."""
    from pixelmill import pipeline
    from pixelmill.models import ChunkItem, Job
    from pixelmill.samples import jpeg_bytes, photo
    from pixelmill.spec import PipelineSpec

    (tmp_path / "src").mkdir()
    for name in ("a.jpg", "bad.gif", "c.jpg"):
        (tmp_path / "src" / name).write_bytes(jpeg_bytes(photo(16, 12)))
    real = pipeline.render_renditions

    def render(data, spec, renditions, name=None):
        if name == "bad.gif":
            raise SyntaxError("Layer block too short for number of layers requested")
        return real(data, spec, renditions, name)

    monkeypatch.setattr(pipeline, "render_renditions", render)
    source, dest = LocalStorage(tmp_path / "src"), LocalStorage(tmp_path / "dst")
    job = Job(source=source.uri, destination=dest.uri, run="r", spec=PipelineSpec(size=(8, 6)))
    made = pipeline.resize_images(tuple(ChunkItem(source=n, output=n)
                                        for n in ("a.jpg", "bad.gif", "c.jpg")), job,
                                  source, dest)
    assert [image.status for image in made] == ["ok", "failed", "ok"]
    assert made[1].error == ("cannot decode: SyntaxError: Layer block too short for number "
                             "of layers requested")


def test_a_storage_error_while_reading_still_fails_the_chunk_for_a_retry(tmp_path, monkeypatch):
    from pixelmill import pipeline
    from pixelmill.models import ChunkItem, Job
    from pixelmill.spec import PipelineSpec

    (tmp_path / "src").mkdir()
    (tmp_path / "src/a.jpg").write_bytes(b"\xff\xd8\xff")
    source, dest = LocalStorage(tmp_path / "src"), LocalStorage(tmp_path / "dst")

    def read(key):
        raise ConnectionError("the storage went away")

    monkeypatch.setattr(source, "read", read)
    job = Job(source=source.uri, destination=dest.uri, run="r", spec=PipelineSpec(size=(8, 6)))
    with pytest.raises(ConnectionError):
        pipeline.resize_images((ChunkItem(source="a.jpg", output="a.jpg"),), job, source, dest)


def test_tidy_leaves_a_big_journal_alone_until_the_small_ones_add_up_to_it(tmp_path):
    """A nightly run that adds a few outputs does not rewrite every line of the first run's
    journal; once the small journals hold as much as the big one, they are folded."""
    store = LocalStorage(tmp_path)
    first = LocalStorage(tmp_path)
    for number in range(20):
        first.write(f"run/{number:02d}.jpg", b"x", "image/jpeg", {"pixelmill-made": "s"})
    LocalStorage(tmp_path).write("run/new-0.jpg", b"x", "image/jpeg", {"pixelmill-made": "n"})
    old = time.time() - 3600
    journals = tmp_path / "run" / META_DIR

    def age_all():
        for journal in journals.glob("*.jsonl"):
            os.utime(journal, (old, old))

    age_all()
    before = {info.key: info.metadata for info in store.list("run/")}
    store.tidy("run")
    assert len(list(journals.glob("*.jsonl"))) == 2  # 1 line against 20: not worth it yet
    for night in range(1, 20):
        LocalStorage(tmp_path).write(f"run/new-{night}.jpg", b"x", "image/jpeg",
                                     {"pixelmill-made": "n"})
    age_all()
    store.tidy("run")
    assert len(list(journals.glob("*.jsonl"))) == 1  # 20 small ones: folded into one
    after = {info.key: info.metadata for info in store.list("run/")}
    assert after == {**before, **{f"run/new-{n}.jpg": {"pixelmill-made": "n"}
                                  for n in range(20)}}
