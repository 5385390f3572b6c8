"""Input pipeline throughput: the training reader from S3 vs decoding in memory.

    python benchmarks/bench_input.py --images ../shared/data/cats_vs_dogs

For original and for pre-resized shards (`xfer shard --max-side`), side by side:
- the training reader (`xfer.reader.make_dataset`): Parquet row groups streamed from
  the embedded S3 server through pyarrow, decoded and resized in parallel tf.data maps;
- the in-memory limit: the same JPEG bytes, already in memory, through the same
  decode + resize in a tf.data pipeline with the same parallelism.
The ratio says how much of the decode limit the reader reaches.
"""

from __future__ import annotations

import argparse
import time

from common import ROOT, environment, record

IMAGE_SIZE = 160
BATCH = 64


def reader_pass(manifest, split: str) -> tuple[int, float]:
    from xfer.reader import ReaderSpec, make_dataset

    spec = ReaderSpec(manifest, split, IMAGE_SIZE, BATCH, training=False, parallel_reads=4)
    ds = iter(make_dataset(spec))
    next(ds)  # warm-up: graph building, first connection
    n, start = 0, time.perf_counter()
    for _, _, weights in ds:
        n += int((weights.numpy() > 0).sum())
    return n, time.perf_counter() - start


def memory_pass(blobs: list[bytes]) -> tuple[int, float]:
    import tensorflow as tf

    from xfer.preprocess import decode_and_resize

    ds = tf.data.Dataset.from_tensor_slices(blobs).map(
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
    from xfer import storage

    out: list[bytes] = []
    for uri in manifest.shard_uris(split):
        out += storage.read_parquet(uri, columns=["image"]).column("image").to_pylist()
    return out


def run(images: str | None, max_side: int = 192) -> dict:
    from xfer import storage
    from xfer.manifest import load_manifest
    from xfer.shard import ShardSettings, shard_dataset
    from xfer.synth import synthesize

    with environment() as work:
        source = images
        if not source:
            source = f"{work}/synth"
            synthesize(source, ["circle", "square"], per_class=1000, size=448, seed=1)
        figures: dict = {"images": 0}
        for name, side in (("original", None), ("pre-resized", max_side)):
            dest = f"{ROOT}/datasets/input-{name}"
            shard_dataset(
                source, dest, ShardSettings(split_fractions=(1.0, 0.0, 0.0), max_side=side)
            )
            m = load_manifest(dest)
            size_mb = (
                sum(f.size for f in storage.list_files(dest) if f.uri.endswith(".parquet")) / 1e6
            )
            n_reader, t_reader = reader_pass(m, "train")
            n_mem, t_mem = memory_pass(all_bytes(m, "train"))
            figures["images"] = m.split("train").rows
            figures[f"{name}: shard MB"] = round(size_mb, 1)
            figures[f"{name}: reader from S3 (img/s)"] = n_reader / t_reader
            figures[f"{name}: in-memory decode limit (img/s)"] = n_mem / t_mem
            figures[f"{name}: reader / in-memory"] = (n_reader / t_reader) / (n_mem / t_mem)
        figures["pre-resized / original (reader)"] = (
            figures["pre-resized: reader from S3 (img/s)"]
            / figures["original: reader from S3 (img/s)"]
        )
        record(
            "input_pipeline",
            figures,
            notes=(
                f"Decode + resize to {IMAGE_SIZE}x{IMAGE_SIZE}, batches of {BATCH}, one pipeline, both "
                f"measured after one warm-up batch. Pre-resized shards: `xfer shard --max-side {max_side}`. "
                f"Images: {'the photos given with --images' if images else 'generated 448 px JPEGs'}."
            ),
        )
        return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", help="class-per-folder photos (default: generated)")
    args = parser.parse_args()
    run(args.images)
