"""Batch-scoring entry point for `ray job submit` (nightly runs).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/score.py --config jobs/configs/nightly_score.yaml \\
        --model s3://xfer-prod/models/pets --input s3://xfer-prod/incoming/pets \\
        --output s3://xfer-prod/predictions/pets

Same as `xfer score`: the arguments are passed through unchanged.
"""

import os
import sys

try:
    import xfer  # noqa: F401
except ImportError:  # run from a checkout (ray job submit --working-dir .) without install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from xfer.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["score", *sys.argv[1:]]))
