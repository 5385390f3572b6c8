"""Accelerator set-up shared by training workers and scoring actors."""

from __future__ import annotations

import contextlib
from typing import Any


def enable_memory_growth() -> int:
    """Let TensorFlow grow GPU memory instead of taking it all; returns the GPU count.

    Must run before TensorFlow initialises the GPUs in this process: it is the first
    thing a worker or actor does. Where they are already initialised, it keeps going.
    """
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        with contextlib.suppress(RuntimeError):
            tf.config.experimental.set_memory_growth(gpu, True)
    return len(gpus)


def communication_options(gpus: int) -> Any:
    """All-reduce for MultiWorkerMirroredStrategy: NCCL between workers that have GPUs,
    ring all-reduce over gRPC between CPU-only ones. (AUTO picks ring on CPUs but may
    also pick ring for GPUs; NCCL is the fast path there.)"""
    import tensorflow as tf

    impl = tf.distribute.experimental.CommunicationImplementation
    return tf.distribute.experimental.CommunicationOptions(
        implementation=impl.NCCL if gpus > 0 else impl.RING
    )


def set_mixed_precision(enabled: bool, have_gpu: bool) -> str | None:
    """float16 with loss scaling on GPUs; bfloat16 without (CPUs, tests)."""
    if not enabled:
        return None
    import tf_keras

    policy = "mixed_float16" if have_gpu else "mixed_bfloat16"
    tf_keras.mixed_precision.set_global_policy(policy)
    return policy
