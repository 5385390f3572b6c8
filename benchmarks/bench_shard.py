"""Sharding throughput on 20,000 generated images, S3 to S3.

    python benchmarks/bench_shard.py --count 20000

Generates the images locally, uploads them as single objects to the embedded S3
server, then times `xfer shard` (Ray tasks: read, check, normalise, assemble) from
that prefix into a dataset prefix on the same server.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ThreadPoolExecutor

from common import ROOT, environment, record, timer

CLASSES = ["circle", "square", "triangle", "star"]


def run(count: int = 20_000, size: int = 64) -> dict:
    from xfer.config import ShardConfig
    from xfer.data.shard import shard_dataset
    from xfer.data.synth import synthesize
    from xfer.store import storage

    with environment() as work:
        local = f"{work}/raw"
        with timer() as t_gen:
            synthesize(local, CLASSES, per_class=count // len(CLASSES), size=size, seed=3)
        files = [os.path.join(d, f) for d, _, names in os.walk(local) for f in names]
        raw = f"{ROOT}/raw/shard-bench"
        with timer() as t_up, ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda p: storage.upload_file(p, f"{raw}/{os.path.relpath(p, local)}"), files
                )
            )
        with timer() as t_shard:
            summary = shard_dataset(
                raw, f"{ROOT}/datasets/shard-bench", ShardConfig(target_shard_mb=32)
            )
        figures = {
            "images": len(files),
            "image size (px)": size,
            "shard seconds": t_shard["seconds"],
            "sharding throughput (files/s)": len(files) / t_shard["seconds"],
            "shards written": sum(summary.shards.values()),
            "rejected": sum(summary.rejected.values()),
            "upload to S3 (files/s, 16 threads)": len(files) / t_up["seconds"],
            "generation (files/s)": len(files) / t_gen["seconds"],
        }
        record(
            "sharding",
            figures,
            notes=f"S3 prefix of {len(files)} single-object JPEGs -> Parquet shards on the same server, "
            f"{os.cpu_count()} Ray CPUs. Includes listing, Ray task start-up and the commit.",
        )
        return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=20_000)
    run(parser.parse_args().count)
