"""Training entry point for `ray job submit` (and anything that runs a script).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/train.py --config jobs/configs/gpu_production.yaml [key=value ...]

Same as `xfer train`: the arguments are passed through unchanged.
"""

import os
import sys

try:
    import xfer  # noqa: F401
except ImportError:  # run from a checkout (ray job submit --working-dir .) without install
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from xfer.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
