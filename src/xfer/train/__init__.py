"""Training: the Ray Train driver, the per-worker loop, checkpoint I/O."""
