"""Sharding entry point for `ray job submit`.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/shard.py s3://xfer-prod/raw/pets s3://xfer-prod/datasets/pets --max-side 256

Same as `xfer shard`: the arguments are passed through unchanged.
"""

import os
import sys

try:
    import xfer  # noqa: F401
except ImportError:  # run from a checkout (ray job submit --working-dir .) without install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from xfer.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["shard", *sys.argv[1:]]))
