"""xfer: transfer-learning image classifiers at cluster scale.

Keras 3 breaks ``model.fit`` under MultiWorkerMirroredStrategy, so xfer uses the
Keras 2 API from ``tf-keras``. TensorFlow reads ``TF_USE_LEGACY_KERAS`` once, at
import time, so it is set here, before anything in the package can import it
(docs/design.md, decision 1). Ray workers get it through their runtime env as well.
"""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
# TensorFlow's C++ start-up chatter (oneDNN notices, CUDA probing on CPU hosts)
# buries the messages people need; keep errors. Set it to 0 to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
