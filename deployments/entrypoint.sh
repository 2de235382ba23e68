#!/bin/sh
# The image's entrypoint. A Prefect Docker / Cloud Run work pool passes its own command
# (`prefect flow-run execute`); a plain Cloud Run job passes `pixelmill run SOURCE DEST ...`
# and may run as parallel tasks (CLOUD_RUN_TASK_INDEX / CLOUD_RUN_TASK_COUNT shard the images).
set -e
if [ "$#" -eq 0 ]; then
    set -- pixelmill --help
fi
exec "$@"
