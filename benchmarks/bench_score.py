"""Batch-scoring throughput: `xfer score` end to end versus plain model.predict.

    python benchmarks/bench_score.py --images ../shared/data/cats_vs_dogs \\
        --weights ../shared/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5

Side by side, on the same photos and the same published model (MobileNetV2 @160):
- `xfer score`: JPEG objects on the embedded S3 server in, Ray Data decode tasks,
  a predictor actor, Parquet partition out (committed with _SUCCESS);
- the limit: tf_keras `model.predict` on the same images, already decoded in memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor

from common import ROOT, environment, record, timer


def upload_photos(images: str, prefix: str) -> int:
    from xfer import storage

    files = [os.path.join(d, f) for d, _, names in os.walk(images) for f in names]
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda p: storage.upload_file(p, f"{prefix}/{os.path.relpath(p, images)}"), files
            )
        )
    return len(files)


def run_in(images: str, model_uri: str) -> dict:
    import numpy as np
    import tensorflow as tf
    import tf_keras

    from xfer import storage
    from xfer.config import load_config
    from xfer.preprocess import decode_and_resize
    from xfer.score import resolve_model, score

    incoming = f"{ROOT}/incoming/photos"
    n = upload_photos(images, incoming)
    cfg = load_config(
        None,
        [
            f"storage.root={ROOT}",
            "score.batch_size=64",
            "score.num_actors=1",
            f"score.read_parallelism={max(1, (os.cpu_count() or 2) - 1)}",
        ],
    )
    with timer() as t_score:
        result = score(
            cfg,
            model=model_uri,
            input_uri=incoming,
            output=f"{ROOT}/predictions/photos",
            date="2026-01-01",
        )
    # The limit: the same model, the same images decoded in memory, model.predict.
    ref = resolve_model(model_uri)
    path = os.path.join(tempfile.mkdtemp(), "model.keras")
    storage.download_file(f"{ref.model_uri}/model.keras", path)
    model = tf_keras.models.load_model(path, compile=False)
    from pathlib import Path

    blobs = [Path(d, f).read_bytes() for d, _, names in os.walk(images) for f in names]
    ds = tf.data.Dataset.from_tensor_slices(blobs).map(
        lambda b: decode_and_resize(b, ref.image_size), num_parallel_calls=tf.data.AUTOTUNE
    )
    pixels = np.concatenate([b.numpy() for b in ds.batch(64)])
    model.predict(pixels[:64], verbose=0)  # warm-up
    with timer() as t_predict:
        model.predict(pixels, batch_size=64, verbose=0)
    figures = {
        "images": n,
        "xfer score end to end (img/s)": result.rows / t_score["seconds"],
        "xfer score wall time (s)": t_score["seconds"],
        "rows with errors": result.errors,
        "model.predict on decoded images in memory (img/s)": n / t_predict["seconds"],
        "xfer score / model.predict": (result.rows / t_score["seconds"])
        / (n / t_predict["seconds"]),
    }
    record(
        "scoring",
        figures,
        notes=(
            f"Model: {ref.run_uri} (MobileNetV2 @{ref.image_size}). `xfer score` includes Ray Data start-up, "
            "reading JPEG objects from S3, decoding in CPU tasks, one predictor actor, and writing and "
            "committing the Parquet partition; model.predict excludes decoding. Same process, same 2 CPUs."
        ),
    )
    return figures


def quick_model(images: str, weights: str) -> str:
    """A published MobileNetV2 run (one head epoch) when the quality benchmark did not run."""
    import bench_quality

    from xfer.config import load_config
    from xfer.train.driver import train

    weights_uri = bench_quality.prepare(images, weights)
    quick = {"train.head.epochs": 1, "train.fine_tune.epochs": 0}
    return train(load_config(None, bench_quality.overrides(weights_uri, **quick))).run_uri


def run(images: str, weights: str) -> dict:
    with environment():
        return run_in(images, quick_model(images, weights))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--weights", required=True)
    args = parser.parse_args()
    run(args.images, args.weights)
