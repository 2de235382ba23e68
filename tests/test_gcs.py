"""GCS in and out against a real fake-gcs-server, through a fault-injecting proxy."""

from __future__ import annotations

import io
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from pixelmill.samples import jpeg_bytes, photo
from pixelmill.spec import PipelineSpec
from tests.corpus import GOOD
from tests.helpers import load_report_blob

pytestmark = pytest.mark.slow


def upload_corpus(bucket, prefix: str) -> None:
    """The flow-test corpus plus GCS oddities: an empty image-named object, a folder
    placeholder, a PDF named .jpg and a text file."""
    for number, (key, (width, height, orientation)) in enumerate(sorted(GOOD.items())):
        bucket.blob(prefix + key).upload_from_string(
            jpeg_bytes(photo(width, height, seed=number), orientation=orientation),
            content_type="image/jpeg")
    bucket.blob(prefix + "garden/fake.jpg").upload_from_string(b"%PDF-1.4\n", content_type="image/jpeg")
    bucket.blob(prefix + "empty.jpg").upload_from_string(b"", content_type="image/jpeg")
    bucket.blob(prefix + "placeholder/").upload_from_string(b"", content_type="text/plain")
    bucket.blob(prefix + "readme.txt").upload_from_string(b"hello", content_type="text/plain")


def objects(bucket, prefix: str = "") -> dict[str, object]:
    return {blob.name: blob for blob in bucket.client.list_blobs(bucket.name, prefix=prefix)}


def test_flow_on_ray_from_one_bucket_to_another(gcs, ray_cluster):
    from flows.process_images import process_images

    src, dst = gcs.bucket(gcs.unique("src")), gcs.bucket(gcs.unique("dst"))
    upload_corpus(src, "in/")
    state = process_images(
        source=f"gs://{src.name}/in/", destination=f"gs://{dst.name}/out/",
        spec=PipelineSpec(size=(160, 120), filters=("blur",)), run_name="g1", chunk_size=3,
        return_state=True,
    )
    assert state.is_completed(), state.message
    found = objects(dst, "out/g1/")
    report = load_report_blob(dst, "out/g1/report.json")
    assert found["out/g1/report.json"].content_type == "application/json"
    assert found["out/g1/gallery/index.html"].content_type.startswith("text/html")
    assert found["out/g1/manifest.json"].content_type == "application/json"
    assert found["out/g1/gallery/contact-sheet-01.jpg"].content_type == "image/jpeg"
    ok = {entry["source"]: entry for entry in report["images"] if entry["status"] == "ok"}
    assert set(ok) == set(GOOD)
    for entry in ok.values():
        for path in entry["outputs"].values():
            blob = found[f"out/g1/{path}"]
            assert blob.content_type == "image/jpeg"
            with Image.open(io.BytesIO(blob.download_as_bytes())) as image:
                assert image.size == (entry["width"], entry["height"])
    # sub-paths kept: both a.jpg survive
    assert "out/g1/resized/trips/a.jpg" in found and "out/g1/resized/family/a.jpg" in found
    failed = {e["source"]: e["error"] for e in report["images"] if e["status"] == "failed"}
    assert set(failed) == {"garden/fake.jpg", "empty.jpg"}
    assert "PDF" in failed["garden/fake.jpg"] and "empty" in failed["empty.jpg"]
    assert not any("placeholder" in e["source"] or "readme" in e["source"]
                   for e in report["images"])
    assert report["counts"] == {"discovered": len(GOOD) + 2, "ok": len(GOOD), "failed": 2,
                                "skipped": 0}


def test_listing_pages_through_more_than_1000_objects(gcs):
    from pixelmill.storages import open_storage

    bucket = gcs.bucket(gcs.unique("many"))
    names = [f"p/{number:05d}.jpg" for number in range(1050)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda name: bucket.blob(name).upload_from_string(
            b"x", content_type="image/jpeg"), names))
    gcs.reset()
    listed = [info.key for info in open_storage(f"gs://{bucket.name}/p/").list()]
    assert listed == [name.removeprefix("p/") for name in names]
    list_calls = [path for method, path in gcs.seen
                  if method == "GET" and re.search(rf"/b/{bucket.name}/o\?", path)]
    assert len(list_calls) == 2 and "pageToken" in list_calls[1]


def test_transient_faults_are_retried_and_the_run_completes(gcs, prefect_api):
    """Every 4th request fails: 503, a dropped connection, or a reply lost after the write."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from flows.process_images import make_task_runner, process_images

    src, dst = gcs.bucket(gcs.unique("fsrc")), gcs.bucket(gcs.unique("fdst"))
    upload_corpus(src, "")
    gcs.every = 4
    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    state = flow(source=f"gs://{src.name}", destination=f"gs://{dst.name}",
                 spec=PipelineSpec(size=(64, 64), filters=("emboss",)), run_name="f1",
                 chunk_size=2, return_state=True)
    assert state.is_completed(), state.message
    assert all(gcs.injected[mode] >= 3 for mode in ("503", "drop", "drop-after")), gcs.injected
    gcs.every = 0
    found = objects(dst, "f1/")
    report = load_report_blob(dst, "f1/report.json")
    assert report["counts"]["ok"] == len(GOOD)
    for entry in report["images"]:
        for path in entry.get("outputs", {}).values():
            with Image.open(io.BytesIO(found[f"f1/{path}"].download_as_bytes())) as image:
                image.load()  # whole, not partial
    flow_run_id = state.state_details.flow_run_id
    deadline, messages = time.monotonic() + 30, []
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            logs = client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            messages = [log.message for log in logs]
            if any("retrying with backoff" in message for message in messages):
                break
            time.sleep(1)
    assert any("retrying with backoff" in message for message in messages), messages[-20:]


def test_forbidden_bucket_fails_fast_naming_it(gcs, prefect_api):
    from flows.process_images import make_task_runner, process_images

    src, dst = gcs.bucket(gcs.unique("osrc")), gcs.bucket(gcs.unique("locked"))
    upload_corpus(src, "")
    gcs.forbidden = {dst.name}
    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    started = time.monotonic()
    state = flow(source=f"gs://{src.name}", destination=f"gs://{dst.name}/out",
                 spec=PipelineSpec(size=(64, 64)), run_name="x", return_state=True)
    assert state.is_failed()
    assert gcs.injected["403"] == 1  # one request: neither the client nor Prefect retried it
    assert time.monotonic() - started < 60
    message = str(state.result(raise_on_failure=False))
    # refused before any work: the destination is listed once, up front
    assert f"DEST gs://{dst.name}/out: gs://{dst.name}: permission denied (403)" in message
    assert "storage.objects.list" in message


def test_cli_refuses_a_forbidden_source_with_one_line(gcs, tmp_path, prefect_api):
    from tests.test_cli import pixelmill

    gcs.forbidden = {"secret-bucket"}
    result = pixelmill("run", "gs://secret-bucket/in", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "gs://secret-bucket: permission denied (403)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_thumbnail_preset_keeps_sub_paths_in_a_minute_stamped_folder(gcs, prefect_api):
    from tests.test_cli import pixelmill

    src, dst = gcs.bucket(gcs.unique("in")), gcs.bucket(gcs.unique("out"))
    upload_corpus(src, "photos/")
    result = pixelmill("run", f"gs://{src.name}/photos", f"gs://{dst.name}", "--size", "100x100",
                       "--runner", "threads")
    assert result.returncode == 1, result.stderr  # the PDF and the empty object
    resized = [name for name in objects(dst) if "/resized/" in name]
    assert len(resized) == len(GOOD)
    for name in resized:
        assert re.fullmatch(r"\d{8}T\d{4}Z/resized/photos/.+\.jpg", name), name
        with Image.open(io.BytesIO(dst.blob(name).download_as_bytes())) as image:
            assert max(image.size) <= 100
    assert any(name.endswith("/resized/photos/trips/a.jpg") for name in resized)
    assert any(name.endswith("/resized/photos/family/a.jpg") for name in resized)


def test_chunk_results_persist_to_a_gcs_bucket_block_and_never_replace_the_bucket(gcs, prefect_api):
    import tasks.storage  # noqa: F401  (emulator: anonymous credentials for prefect-gcp)
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect_gcp.cloud_storage import GcsBucket

    from flows.process_images import make_task_runner, process_images

    src, dst, results = (gcs.bucket(gcs.unique(name)) for name in ("rsrc", "rdst", "results"))
    upload_corpus(src, "")
    block_name = gcs.unique("pixelmill-results")
    GcsBucket(bucket=results.name).save(block_name)
    flow = process_images.with_options(task_runner=make_task_runner("threads"))
    runs = [flow(source=f"gs://{src.name}", destination=f"gs://{dst.name}",
                 spec=PipelineSpec(size=(64, 64), filters=("blur",)), run_name="r1",
                 chunk_size=4, result_storage=f"gcs-bucket/{block_name}", return_state=True)
            for _ in range(2)]
    assert all(state.is_completed() for state in runs)
    assert len(objects(results)) >= 4  # persisted chunk results
    with get_client(sync_client=True) as client:
        states = [
            [run.state.name for run in client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
             if "chunk" in run.name]
            for state in runs
        ]
    assert states[0] and all(name == "Completed" for name in states[0]), states[0]
    # the second run finds every output in the run folder and keeps it: its one chunk is the
    # PDF named .jpg, which has no output and is tried again
    report = runs[1].result()
    assert report.counts.skipped == len(GOOD) and report.counts.ok == 0
    assert sum(chunk.images for chunk in report.chunks) == 1, report.chunks
    assert len(states[1]) == 2, states[1]  # its resize and filter task runs
    # persisted results never stand in for outputs the bucket lost
    for blob in dst.client.list_blobs(dst.name):
        blob.delete()
    third = flow(source=f"gs://{src.name}", destination=f"gs://{dst.name}",
                 spec=PipelineSpec(size=(64, 64), filters=("blur",)), run_name="r1",
                 chunk_size=4, result_storage=f"gcs-bucket/{block_name}")
    assert third.counts.ok == len(GOOD) and third.counts.skipped == 0
    assert len([name for name in objects(dst) if name.startswith("r1/blur/")]) == len(GOOD)


def test_readme_emulator_trial(tmp_path, prefect_api):
    """The README's "Try GCS locally" commands, in order, as a user runs them."""
    import signal
    import subprocess

    from tests.test_cli import PIXELMILL, pixelmill

    emulator = subprocess.Popen(
        [PIXELMILL, "gcs-emulator", "--bucket", "in", "--bucket", "out",
         "--samples", "gs://in/photos"], stdout=subprocess.PIPE, text=True)
    try:
        export = ""
        for line in emulator.stdout:
            if line.startswith("export STORAGE_EMULATOR_HOST="):
                export = line.strip()
                break
        assert export, "the emulator never printed its export line"
        host = export.split("=", 1)[1]
        result = pixelmill("run", "gs://in/photos", "gs://out", "--size", "100x100",
                           "--runner", "threads", env={"STORAGE_EMULATOR_HOST": host})
        assert result.returncode == 0, result.stderr
        assert "processed 24 ok, 0 failed" in result.stdout
    finally:
        emulator.send_signal(signal.SIGTERM)
        assert emulator.wait(timeout=30) == 0
    # the emulator server went with it
    import urllib.request

    with pytest.raises(OSError):
        urllib.request.urlopen(host + "/storage/v1/b", timeout=2)


def test_missing_destination_bucket_is_a_clear_error(gcs):
    from pixelmill.errors import StorageAccessError
    from pixelmill.storages import open_storage

    storage = open_storage("gs://no-such-bucket-here/out", destination=True)
    with pytest.raises(StorageAccessError, match="gs://no-such-bucket-here: bucket not found"):
        storage.write("x.jpg", b"x", "image/jpeg")


def test_credentials_block_gives_one_client_per_process(prefect_api, monkeypatch):
    """--gcp-credentials-block: the named prefect-gcp block makes the client, once. (A made-up
    service account: the client is built, never used; Google's cloud is not reachable here.)"""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from prefect_gcp import GcpCredentials

    import tasks.storage as task_storage
    from pixelmill.models import Job

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    info = {"type": "service_account", "project_id": "made-up", "private_key_id": "1",
            "private_key": pem, "client_email": "pixelmill@made-up.iam.gserviceaccount.com",
            "client_id": "1", "token_uri": "https://oauth2.googleapis.com/token"}
    GcpCredentials(service_account_info=info).save("pixelmill-test-sa", overwrite=True)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    task_storage._block_client.cache_clear()
    job = Job(source="gs://a/in", destination="gs://b/out", run="r",
              gcp_credentials_block="pixelmill-test-sa")
    source, destination = task_storage.source_storage(job), task_storage.destination_storage(job)
    assert source.client is destination.client
    assert source.client._credentials.service_account_email == info["client_email"]
    assert source.client.project == "made-up"
    assert task_storage._block_client.cache_info().misses == 1
    task_storage._block_client.cache_clear()


def test_gcs_rerun_keeps_what_the_bucket_holds_and_remakes_exactly_what_it_lost(gcs,
                                                                                 prefect_api):
    """Each output carries its stamp as custom metadata; one listing decides the re-run."""
    from flows.process_images import make_task_runner, process_images

    src, dst = gcs.bucket(gcs.unique("ksrc")), gcs.bucket(gcs.unique("kdst"))
    upload_corpus(src, "")
    flow = process_images.with_options(task_runner=make_task_runner("threads"))

    def run():
        state = flow(source=f"gs://{src.name}", destination=f"gs://{dst.name}",
                     spec=PipelineSpec(size=(64, 64), filters=("blur",)), run_name="k",
                     chunk_size=4, return_state=True)
        assert state.is_completed(), state.message
        return state.result()

    first = run()
    assert first.counts.ok == len(GOOD)
    made = {name: blob.generation for name, blob in objects(dst, "k/").items()
            if "/resized/" in f"/{name}" or "/blur/" in f"/{name}"}
    blob = objects(dst, "k/")["k/resized/trips/a.jpg"]
    assert blob.metadata["pixelmill-made"] and blob.metadata["pixelmill-width"] == "64"
    gone = ["k/blur/trips/a.jpg", "k/resized/garden/c.jpg"]
    for name in gone:
        dst.blob(name).delete()
    again = run()
    assert again.counts.ok == 2 and again.counts.skipped == len(GOOD) - 2
    now = {name: blob.generation for name, blob in objects(dst, "k/").items() if name in made}
    assert set(now) == set(made)
    assert sorted(name for name in made if now[name] != made[name]) == sorted(gone)
    report = load_report_blob(dst, "k/report.json")
    assert len([e for e in report["images"] if e["status"] != "failed"]) == len(GOOD)


def test_a_replace_that_loses_a_race_reads_again_and_does_not_fail(gcs):
    """412 on the generation read: another writer replaced the object in between."""
    from pixelmill.storages import open_storage

    bucket = gcs.bucket(gcs.unique("race"))
    storage = open_storage(f"gs://{bucket.name}", destination=True)
    storage.write("x.jpg", b"old", "image/jpeg", {"pixelmill-made": "1"})
    real_get = storage.bucket.get_blob
    raced = []

    def get_blob_then_someone_writes(name, **kwargs):
        found = real_get(name, **kwargs)
        if not raced:  # after we read its generation, another run replaces it
            raced.append(True)
            bucket.blob(name).upload_from_string(b"theirs", content_type="image/jpeg")
        return found

    storage.bucket.get_blob = get_blob_then_someone_writes
    storage.write("x.jpg", b"new", "image/jpeg", {"pixelmill-made": "2"})
    blob = bucket.get_blob("x.jpg")
    assert blob.download_as_bytes() == b"new" and blob.metadata == {"pixelmill-made": "2"}
    assert raced


def test_run_folder_lock_on_gcs_admits_one_of_many_racers(gcs):
    from pixelmill.runlock import Holder, RunFolderBusy, RunLock
    from pixelmill.storages import open_storage

    bucket = gcs.bucket(gcs.unique("lock"))

    held = []

    def race(number: int) -> str:
        storage = open_storage(f"gs://{bucket.name}/out", destination=True)
        try:
            held.append(RunLock(storage, "r/.pixelmill-lock.json",
                                Holder(flow_run=f"run-{number}"), "gs://x/out/r").acquire())
        except RunFolderBusy as exc:
            assert "is in use by flow run" in str(exc)
            return "refused"
        return "held"

    with ThreadPoolExecutor(6) as pool:
        said = sorted(pool.map(race, range(6)))
    for lock in held:
        lock.release()
    assert said == ["held"] + ["refused"] * 5
    assert not bucket.get_blob("out/r/.pixelmill-lock.json")


def test_a_request_retried_to_its_deadline_is_not_retried_again_by_the_chunk(gcs, monkeypatch):
    """GCS gone for longer than a request's retries last: the read gives up once, and the
    chunk task is not retried on top of it (one layer retries each kind of failure)."""
    from pixelmill import gcs as gcs_module
    from pixelmill.retries import chunk_worth_retrying
    from pixelmill.storages import open_storage

    bucket = gcs.bucket(gcs.unique("gone"))
    bucket.blob("a.jpg").upload_from_string(b"\xff\xd8\xff")
    storage = open_storage(f"gs://{bucket.name}")
    monkeypatch.setattr(gcs_module, "RETRY", gcs_module.RETRY.with_timeout(1.0))
    gcs.every = 1  # every request fails
    try:
        with pytest.raises(Exception) as raised:
            storage.read("a.jpg")
    finally:
        gcs.every = 0
    assert gcs.injected["503"] + gcs.injected["drop"] + gcs.injected["drop-after"] >= 2
    assert not chunk_worth_retrying(raised.value), repr(raised.value)
    assert storage.read("a.jpg") == b"\xff\xd8\xff"  # and GCS back, it reads again
    # what the chunk task does retry: anything else but a permission error
    assert chunk_worth_retrying(OSError("No space left on device"))
    assert not chunk_worth_retrying(PermissionError("gs://b: storage.objects.get denied"))
