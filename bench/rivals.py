"""The rivals for bench/speed.py: the same camera JPEGs -> fit 400x300 -> JPEG, done the way
Daft and Ray Data document it. Resize only (no blur), one run each: the job a user would hand them.

Both need the `bench` extra (pip install -e '.[bench]'); each imports its library inside the
function, so this module imports without them and speed.py can skip the rows when missing.
Neither library lets the writer set a JPEG quality: both write their encoder's default (75),
not pixelmill's 85, which if anything flatters them a little.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

SIZE = (400, 300)


def run_daft(files: list[Path], out: Path) -> dict:
    """Daft's native image expressions on its native (single-machine, all-core) runner.

    Daft 0.7.26 has only `resize(w, h)` (an exact size, no thumbnail/fit and no per-row size),
    so the images are resized to exactly 400x300: a 3:2 photo is stretched to 4:3 rather than
    fitted to 400x267 (12 % more output pixels, the same decode). 0.7.26 dropped the `.url.` / `.image.`
    namespaces; `download`, `decode_image`, `resize`, `encode_image` and `upload` are now
    methods of the expression. `upload` with a column of paths (not a folder, which would get
    UUID names) writes each image natively to out/<name>, so nothing passes through Python."""
    import daft

    daft.set_runner_native()  # this one machine, not Ray (daft[ray] wants ray<2.60 anyway)
    df = daft.from_pydict({"path": [str(f) for f in files],
                           "target": [str(out / f.name) for f in files]})
    jpeg = (daft.col("path").download().decode_image(mode="RGB")
            .resize(*SIZE).encode_image("JPEG"))
    df.select(jpeg.upload(daft.col("target"))).collect()
    return {"daft": daft.__version__}


def _fit(batch: dict) -> dict:
    """Ray Data batch UDF: each image shrunk with Pillow to fit 400x300, aspect kept."""
    import numpy as np
    from PIL import Image, ImageOps

    images = [np.asarray(ImageOps.contain(Image.fromarray(image), SIZE,
                                          Image.Resampling.LANCZOS)) for image in batch["image"]]
    if len({image.shape for image in images}) == 1:
        batch["image"] = np.stack(images)
    else:  # mixed aspect ratios: an object array, which Ray keeps as a variable-shaped tensor
        batch["image"] = np.empty(len(images), dtype=object)
        for n, image in enumerate(images):
            batch["image"][n] = image
    return batch


def run_ray_data(files: list[Path], out: Path) -> dict:
    """Ray Data's documented pipeline: read_images -> map_batches(Pillow fit) -> write_images,
    on a Ray started for the run (as a user of Ray Data on one machine would). Its files go
    to a temp folder of its own so it never meets pixelmill's long-lived Ray
    (~/.pixelmill/ray). Output names are Ray's own (<uuid>_..._<row>.jpeg)."""
    import ray
    import ray.data  # configures its loggers on import, so before the level is set below

    temp = tempfile.mkdtemp(prefix="rivals-ray-")
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", _temp_dir=temp)
    try:
        # progress bars and INFO lines would scribble over speed.py's table; free to drop
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
        (ray.data.read_images([str(f) for f in files], mode="RGB")
         .map_batches(_fit, batch_format="numpy")
         .write_images(str(out), column="image", file_format="jpeg"))
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return {"ray": ray.__version__}
