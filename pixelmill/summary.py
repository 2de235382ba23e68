"""What the Prefect UI shows for a run: a markdown summary and a table of failures."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from pixelmill.storage import emulator_host, split_uri
from pixelmill.models import RunReport
from pixelmill.storage import is_gcs

# Rows in the failures table artifact; every failure is in the run's images.jsonl.
MAX_FAILURE_ROWS = 500


def object_url(destination: str, key: str) -> str:
    """A browser URL for an object of the destination (file://, the emulator, or GCS)."""
    if not is_gcs(destination):
        return (Path(destination).absolute() / key).as_uri()
    bucket, prefix = split_uri(destination)
    name = f"{prefix.rstrip('/')}/{key}".lstrip("/")
    host = emulator_host()
    if host:
        return f"{host.rstrip('/')}/{bucket}/{quote(name)}"
    return f"https://storage.cloud.google.com/{bucket}/{quote(name)}"


def _gallery_lines(report: RunReport, gallery_key: str) -> list[str]:
    """How to open the gallery from the UI. A browser does not follow a file:// link from a
    web page, and a bucket's objects need credentials: `pixelmill gallery` serves either on
    127.0.0.1. Google's own console URL works too for a real bucket, signed in."""
    run_folder = f"{report.destination.rstrip('/')}/{report.run}"
    lines = [f"Open the gallery: run `pixelmill gallery {run_folder}` and open the address "
             "it prints."]
    if is_gcs(report.destination) and not emulator_host():
        lines.append(f"Or, signed in to Google: [the gallery in the bucket]"
                     f"({object_url(report.destination, gallery_key)})")
    elif not is_gcs(report.destination):
        lines.append(f"On the machine that ran it: `{Path(report.destination).absolute() / gallery_key}`")
    return lines


def markdown(report: RunReport, gallery_key: str) -> str:
    counts = report.counts
    rate = counts.ok / report.duration_s if report.duration_s else 0.0
    spec = report.spec
    lines = [
        f"# pixelmill run `{report.run}`",
        "",
        f"**{counts.ok} made**, **{counts.failed} failed**, {counts.skipped} kept from an "
        f"earlier run, of "
        f"{counts.discovered} discovered in {report.duration_s:.1f} s ({rate:.1f} images/s).",
        "",
        f"- source: `{report.source}`",
        f"- destination: `{report.destination}`",
        f"- settings: {spec.sizes_text} {spec.fit}, {spec.formats_text} q{spec.quality}, "
        f"filters: {', '.join(spec.filters) or 'none'}",
        f"- chunks: {len(report.chunks)} "
        f"({sum(c.state != 'Completed' for c in report.chunks)} failed)",
        *([f"- runner: {report.runner.name}"
           + (f" ({report.runner.reason})" if report.runner.reason else "")]
          if report.runner else []),
        *([f"- {report.not_images_line()} (left alone)"] if report.not_images else []),
        "",
        *_gallery_lines(report, gallery_key),
    ]
    return "\n".join(lines)


def failure_rows(report: RunReport) -> list[dict[str, str]]:
    return [{"source": image.source, "reason": image.error or ""}
            for image in report.failures[:MAX_FAILURE_ROWS]]
