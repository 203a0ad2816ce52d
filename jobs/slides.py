"""Ray job entry point: exactly `featurize slides`, so a job file and the command line can never disagree.

    ray job submit --address http://HEAD:8265 --working-dir . --submission-id slides-2024-06-01 \
        -- python jobs/slides.py --config jobs/slides.yaml [--option value ...]

Arguments are those of `featurize slides` (options given here win over the config file): every tissue tile of every
whole-slide image (SVS, TIFF, MRXS, DICOM series) under INPUT, scored against the prompt set. Rerunning the same
submission resumes an interrupted run and skips the slides that are done; `--incremental` also rescores slides whose
files changed. See jobs/slides.yaml.
"""

from __future__ import annotations

import sys

# `python jobs/slides.py` puts jobs/ first on sys.path (also under `ray job submit`), so the sibling imports.
from featurize import run_command_job

if __name__ == "__main__":
    sys.exit(run_command_job("slides", sys.argv[1:]))
