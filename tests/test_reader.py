"""The training reader: exact epochs, equal steps, same pixels eagerly and in tf.data."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter

import numpy as np
import pytest

from xfer.config import ShardConfig
from xfer.data.manifest import load_manifest
from xfer.data.preprocess import AugmentSettings, augment, decode_and_resize
from xfer.data.reader import ReaderSpec, Unit, epoch_order, make_dataset, pipeline_segments
from xfer.data.shard import shard_dataset
from xfer.data.synth import synthesize


@pytest.mark.parametrize(
    ("rows", "world", "batch"),
    [([10, 10, 10], 2, 4), ([7], 2, 3), ([3, 1], 4, 2), ([64, 64, 63], 3, 16), ([5], 1, 8)],
)
def test_plan_covers_each_row_once_with_equal_slots(rows, world, batch):
    units = [Unit(i, 0, n) for i, n in enumerate(rows)]
    n = sum(rows)
    steps = -(-n // (batch * world))
    total = steps * batch * world
    for epoch in range(3):
        order = epoch_order(units, seed=1, epoch=epoch, shuffle=True)
        seen: Counter[tuple[int, int]] = Counter()
        sizes = []
        for p in range(world):
            segs = pipeline_segments(order, total, p, world)
            sizes.append(sum(s.stop - s.start for s in segs))
            for s in segs:
                if s.weight > 0:
                    for r in range(s.start, s.stop):
                        seen[(s.shard, r)] += 1
        assert sizes == [total // world] * world, "pipelines get different amounts of work"
        assert len(seen) == n and set(seen.values()) == {1}, "a row is missing or repeated"


def test_epoch_order_reshuffles_reproducibly():
    units = [Unit(i, 0, 1) for i in range(50)]
    a0, a1 = epoch_order(units, 7, 0, True), epoch_order(units, 7, 1, True)
    assert a0 != a1
    assert a0 == epoch_order(units, 7, 0, True)
    assert epoch_order(units, 7, 3, False) == units


def test_same_pixels_eagerly_and_in_tf_data(tmp_path):
    import tensorflow as tf

    synthesize(str(tmp_path / "img"), ["a", "b"], per_class=3, size=50)
    files = sorted(str(p) for p in (tmp_path / "img").rglob("*.jpg"))
    blobs = [open(f, "rb").read() for f in files]  # noqa: SIM115
    aug = AugmentSettings(flip=True, rotation=0.1, zoom=0.2)
    seeds = [np.array([3, i], dtype=np.int64) for i in range(len(blobs))]

    eager = [
        augment(decode_and_resize(tf.constant(b), 40), tf.constant(s), aug).numpy()
        for b, s in zip(blobs, seeds, strict=True)
    ]
    ds = tf.data.Dataset.from_tensor_slices((blobs, np.stack(seeds))).map(
        lambda b, s: augment(decode_and_resize(b, 40), s, aug), num_parallel_calls=4
    )
    graph = [x.numpy() for x in ds]
    for e, g in zip(eager, graph, strict=True):
        assert e.shape == (40, 40, 3) and e.dtype == np.float32
        np.testing.assert_allclose(e, g, atol=1e-4)
    # Augmentation really changes pixels, and decode alone is faithful to PIL's pixels.
    plain = decode_and_resize(tf.constant(blobs[0]), 50).numpy()
    from PIL import Image

    pil = np.asarray(Image.open(files[0]).convert("RGB"), dtype=np.float32)
    assert np.abs(plain - pil).mean() < 2.0
    assert np.abs(eager[0] - decode_and_resize(tf.constant(blobs[0]), 40).numpy()).mean() > 1.0


def _probe_loop(config: dict) -> None:
    """Runs on each Ray Train worker under MWMS: reads two epochs, records keys."""
    import tensorflow as tf
    from ray import train

    from xfer.data.manifest import load_manifest
    from xfer.data.preprocess import AugmentSettings
    from xfer.data.reader import ReaderSpec, make_dataset

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rank = train.get_context().get_world_rank()
    manifest = load_manifest(config["dataset"])
    spec = ReaderSpec(
        manifest,
        "train",
        image_size=24,
        per_replica_batch=4,
        training=True,
        augment=AugmentSettings(),
        with_keys=True,
    )
    steps = spec.steps_per_epoch(strategy.num_replicas_in_sync)
    dist = strategy.distribute_datasets_from_function(lambda ctx: make_dataset(spec, ctx))
    it = iter(dist)
    epochs = []
    for _ in range(2):
        rows = []
        for _ in range(steps):
            local = [strategy.experimental_local_results(t)[0] for t in next(it)]
            keys, images, labels, weights = local
            for k, lab, w in zip(keys.numpy(), labels.numpy(), weights.numpy(), strict=True):
                rows.append([k.decode(), int(lab), float(w)])
            assert images.shape == (4, 24, 24, 3)
        epochs.append(rows)
    out = {
        "rank": rank,
        "steps": steps,
        "epochs": epochs,
        "replicas": strategy.num_replicas_in_sync,
    }
    with open(os.path.join(config["out"], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    train.report({"done": 1})


def test_two_workers_under_mwms_see_every_example_once_per_epoch(bucket, ray_local, tmp_path):
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    raw, ds = f"{bucket}/raw", f"{bucket}/datasets/shapes"
    synthesize(raw, ["circle", "square", "triangle"], per_class=17, size=24)
    shard_dataset(raw, ds, ShardConfig(target_shard_mb=0.01, row_group_rows=5))
    manifest = load_manifest(ds)
    n = manifest.split("train").rows

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    trainer = TensorflowTrainer(
        _probe_loop,
        train_loop_config={"dataset": ds, "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=f"probe-{os.getpid()}-{bucket[-6:]}", storage_path=str(tmp_path / "ray")
        ),
    )
    trainer.fit()

    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["replicas"] == 2
    assert results[0]["steps"] == results[1]["steps"] == -(-n // 8)
    for epoch in range(2):
        real = Counter()
        for res in results:
            for key, label, weight in res["epochs"][epoch]:
                assert manifest.classes[label] == key.split("/")[0], "label does not match folder"
                if weight > 0:
                    real[key] += 1
        assert len(real) == n, f"epoch {epoch}: {n - len(real)} training examples never seen"
        assert set(real.values()) == {1}, f"epoch {epoch}: an example was seen twice"
        # Both workers really contributed.
        assert all(any(w > 0 for *_, w in res["epochs"][epoch]) for res in results)
    orders = [[k for k, *_ in results[0]["epochs"][e]] for e in range(2)]
    assert orders[0] != orders[1], "no reshuffling between epochs"


def test_eval_reader_sees_every_example_once(tmp_path, ray_local):
    synthesize(str(tmp_path / "raw"), ["a", "b"], per_class=20, size=16)
    shard_dataset(
        str(tmp_path / "raw"), str(tmp_path / "ds"), ShardConfig(split_fractions=(0.5, 0.5, 0.0))
    )
    m = load_manifest(str(tmp_path / "ds"))
    spec = ReaderSpec(m, "val", image_size=16, per_replica_batch=3, with_keys=True)
    seen = Counter()
    for keys, _, _, weights in make_dataset(spec):
        for k, w in zip(keys.numpy(), weights.numpy(), strict=True):
            seen[k] += w
    assert len(seen) == m.split("val").rows and set(seen.values()) == {1.0}
