"""Ray job entry point: exactly `featurize images`, so a job file and the command line can never disagree.

    ray job submit --address http://HEAD:8265 --working-dir . --submission-id featurize-2024-06-01 \
        -- python jobs/featurize.py --config jobs/featurize.yaml [--option value ...]

Arguments are those of `featurize images` (options given here win over the config file). The job's driver
connects to its own cluster (Ray sets RAY_ADDRESS for job entrypoints); run locally, it starts a local Ray.
See jobs/featurize.yaml for a cluster example and cluster.yaml for the cluster.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipeline.cli import main


def run_command_job(command: str, argv: Sequence[str], extra: Sequence[str] = ()) -> int:
    """Run `featurize COMMAND ARGV EXTRA` and return its exit code; job entry points differ only in COMMAND and
    EXTRA."""
    # EXTRA goes last: the flags an entry point always adds are store_true options, so order does not matter
    # to argparse, and the user's own arguments stay exactly as typed.
    return main([command, *argv, *extra])


def run_images_job(argv: Sequence[str], extra: Sequence[str] = ()) -> int:
    """Run `featurize images ARGV EXTRA` and return its exit code."""
    return run_command_job("images", argv, extra)


if __name__ == "__main__":
    sys.exit(run_images_job(sys.argv[1:]))
