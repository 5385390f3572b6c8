"""Batch-scoring entry point for `ray job submit` (nightly runs).

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \\
        python jobs/score.py --config jobs/configs/nightly_score.yaml storage.root=s3://xfer-prod

(the model, input and output are the config's score.model, score.input and score.output;
--model, --input, --output and --date win over them).

Same as `xfer score`, exit statuses included: the arguments are passed through unchanged.
"""

import os
import sys

# The code shipped with the job (`--working-dir .`) comes first, before any xfer
# installed on the node: an older copy in the image must not win. Its workers get the
# same code through the runtime env's py_modules (jobs/runtime_env.yaml).
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src")
if os.path.isdir(os.path.join(_SRC, "xfer")):
    sys.path.insert(0, os.path.abspath(_SRC))

from xfer.cli import main  # noqa: E402

if __name__ == "__main__":
    # Exactly `xfer score ...`: its console (native output to the log file) and exit statuses.
    sys.argv.insert(1, "score")
    raise SystemExit(main())
