"""Nightly Ray job: `featurize images --incremental`, i.e. only inputs that are new or changed since OUTPUT was
last written (by etag, else size and modification time) are featurised; a night with nothing new writes no shard.

    ray job submit --address http://HEAD:8265 --working-dir . --submission-id nightly-$(date +%Y%m%d) \
        -- python jobs/nightly.py --config jobs/nightly.yaml

The model, revision, dtype and prompt set must stay those OUTPUT was made with (the run refuses otherwise);
see jobs/nightly.yaml.
"""

from __future__ import annotations

import sys

# `python jobs/nightly.py` puts jobs/ first on sys.path (also under `ray job submit`), so the sibling imports.
from featurize import run_images_job

if __name__ == "__main__":
    sys.exit(run_images_job(sys.argv[1:], extra=["--incremental"]))
