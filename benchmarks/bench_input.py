"""Input pipeline throughput: the training reader from S3 vs decoding in memory.

    python benchmarks/bench_input.py --images ../shared/data/cats_vs_dogs

For original and for pre-resized shards (`xfer shard --max-side`), side by side:
- the training reader (`xfer.data.reader.make_dataset`): Parquet row groups streamed from
  the embedded S3 server through pyarrow, decoded and resized in parallel tf.data maps;
- the same reader on a local copy of the same shards (no server, no HTTP);
- the in-memory limit: the same JPEG bytes, already in memory, through the same
  decode + resize in a tf.data pipeline with the same parallelism.
The ratio says how much of the decode limit the reader reaches. Each pass runs
``PASSES`` epochs (after one warm-up batch), and each is measured ``REPEATS`` times,
interleaved, keeping the best: the figures are a few seconds long each, and the
best of three is the least disturbed by anything else on the machine.

The S3 server runs on the same cores here (on a cluster it is elsewhere): its CPU
time during the S3 passes is measured from its pid and reported as a share of the
machine, so the cost of serving can be told from the reader's own.
"""

from __future__ import annotations

import argparse
import os
import time

from common import ROOT, SERVER, environment, record

IMAGE_SIZE = 160
BATCH = 64
PASSES = 3
REPEATS = 3


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reader_pass(manifest, split: str) -> tuple[int, float]:
    from xfer.data.reader import ReaderSpec, make_dataset

    spec = ReaderSpec(manifest, split, IMAGE_SIZE, BATCH, training=False, parallel_reads=4)
    ds = iter(make_dataset(spec, epochs=PASSES))
    next(ds)  # warm-up: graph building, first connection
    n, start = 0, time.perf_counter()
    for _, _, weights in ds:
        n += int((weights.numpy() > 0).sum())
    return n, time.perf_counter() - start


def memory_pass(blobs: list[bytes]) -> tuple[int, float]:
    import tensorflow as tf

    from xfer.data.preprocess import decode_and_resize

    ds = tf.data.Dataset.from_tensor_slices(blobs * PASSES).map(
        lambda b: decode_and_resize(b, IMAGE_SIZE), num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = iter(ds.batch(BATCH).prefetch(tf.data.AUTOTUNE))
    first = next(ds)
    n, start = 0, time.perf_counter()
    for batch in ds:
        n += int(batch.shape[0])
    del first  # the warm-up batch is not counted, as in reader_pass
    return n, time.perf_counter() - start


def all_bytes(manifest, split: str) -> list[bytes]:
    from xfer.store import storage

    out: list[bytes] = []
    for uri in manifest.shard_uris(split):
        out += storage.read_parquet(uri, columns=["image"]).column("image").to_pylist()
    return out


def run(images: str | None, max_side: int = 192) -> dict:
    from xfer.config import ShardConfig
    from xfer.data.manifest import load_manifest
    from xfer.data.shard import shard_dataset
    from xfer.data.synth import synthesize
    from xfer.store import storage

    with environment() as work:
        source = images
        if not source:
            source = f"{work}/synth"
            synthesize(source, ["circle", "square"], per_class=1000, size=448, seed=1)
        figures: dict = {"images": 0}
        cores = os.cpu_count() or 1
        for name, side in (("original", None), ("pre-resized", max_side)):
            dest = f"{ROOT}/datasets/input-{name}"
            shard_dataset(source, dest, ShardConfig(split_fractions=(1.0, 0.0, 0.0), max_side=side))
            m = load_manifest(dest)
            local = f"{work}/local/input-{name}"
            storage.download_dir(dest, local)
            m_local = load_manifest(local)
            size_mb = (
                sum(f.size for f in storage.list_files(dest) if f.uri.endswith(".parquet")) / 1e6
            )
            blobs = all_bytes(m, "train")
            best = {"s3": 0.0, "local": 0.0, "memory": 0.0}
            server_share = []
            for _ in range(REPEATS):
                n, t = memory_pass(blobs)
                best["memory"] = max(best["memory"], n / t)
                before = cpu_seconds(SERVER["pid"])
                n, t = reader_pass(m, "train")
                server_share.append((cpu_seconds(SERVER["pid"]) - before) / (t * cores))
                best["s3"] = max(best["s3"], n / t)
                n, t = reader_pass(m_local, "train")
                best["local"] = max(best["local"], n / t)
            figures["images"] = m.split("train").rows
            figures[f"{name}: shard MB"] = round(size_mb, 1)
            figures[f"{name}: reader from S3 (img/s)"] = best["s3"]
            figures[f"{name}: reader from local files (img/s)"] = best["local"]
            figures[f"{name}: in-memory decode limit (img/s)"] = best["memory"]
            figures[f"{name}: reader from S3 / in-memory"] = best["s3"] / best["memory"]
            figures[f"{name}: reader from local files / in-memory"] = best["local"] / best["memory"]
            figures[f"{name}: S3 server's share of the machine's CPU during the S3 pass"] = max(
                server_share
            )
            # The in-memory limit over the cores the server left (on a cluster it is elsewhere).
            figures[f"{name}: reader from S3 / in-memory on the cores the S3 server left"] = best[
                "s3"
            ] / (best["memory"] * (1 - max(server_share)))
        figures["reader_vs_decode_limit"] = figures["original: reader from S3 / in-memory"]
        figures["reader_vs_decode_limit, local files"] = figures[
            "original: reader from local files / in-memory"
        ]
        figures["pre-resized / original (reader)"] = (
            figures["pre-resized: reader from S3 (img/s)"]
            / figures["original: reader from S3 (img/s)"]
        )
        record(
            "input_pipeline",
            figures,
            notes=(
                f"Decode + resize to {IMAGE_SIZE}x{IMAGE_SIZE}, batches of {BATCH}, one pipeline, "
                f"{PASSES} epochs per pass after one warm-up batch, best of {REPEATS} interleaved "
                f"passes. Pre-resized shards: `xfer shard --max-side {max_side}`. "
                "reader_vs_decode_limit is the original shards read from the S3 server, which "
                "shares these cores (its CPU share is given); the local-files figure is the same "
                "reader without a server. "
                f"Images: {'the photos given with --images' if images else 'generated 448 px JPEGs'}."
            ),
        )
        return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", help="class-per-folder photos (default: generated)")
    args = parser.parse_args()
    run(args.images)
