"""The head-phase feature cache: built once, reused by key, rebuilt when damaged."""

from __future__ import annotations

import json

import pytest

from xfer.config import load_config
from xfer.data.features import plan_cache
from xfer.data.manifest import load_manifest
from xfer.errors import StorageError
from xfer.models.weights import fetch_weights
from xfer.store import storage
from xfer.train.driver import train

from .conftest import train_overrides


def cached_cfg(root: str, weights: str, **extra: object):
    quick = {
        "model.head.features": "cached",
        "train.head.epochs": 3,
        "train.fine_tune.epochs": 1,
        "output.model_name": "shapes-cached",
        "output.publish": "false",
        "output.predictions": "false",
        "output.report": "false",
    }
    return load_config(None, train_overrides(root, weights, **{**quick, **extra}))


@pytest.fixture(scope="module")
def cached_runs(session_root, pretrained_weights, target_dataset):
    """Two identical cached runs: the first builds the cache, the second reuses it."""
    first = train(cached_cfg(session_root, pretrained_weights))
    second = train(cached_cfg(session_root, pretrained_weights))
    return first, second


def test_second_run_hits_the_cache_with_no_base_forward_passes(cached_runs, target_dataset):
    first, second = cached_runs
    m = load_manifest(target_dataset)
    encoded = m.split("train").rows + m.split("val").rows
    c1, c2 = first.metrics["feature_cache"], second.metrics["feature_cache"]
    assert c1["hit"] is False and c1["images_encoded"] == encoded
    assert c2["hit"] is True and c2["images_encoded"] == 0
    assert c1["key"] == c2["key"] and c2["uri"].endswith(c2["key"])
    features = load_manifest(c2["uri"])
    assert features.settings["dtype"] == "float16" and features.settings["feature_dim"] == 96
    # The reader's plan depends on the sequence of row groups: the cache keeps it.
    for split in ("train", "val"):
        assert [g for s in features.split(split).shards for g in s.row_groups] == [
            g for s in m.split(split).shards for g in s.row_groups
        ]
        keys = [
            k
            for u in features.shard_uris(split)
            for k in storage.read_parquet(u).column("key").to_pylist()
        ]
        assert keys == [
            k
            for u in m.shard_uris(split)
            for k in storage.read_parquet(u, columns=["key"]).column("key").to_pylist()
        ]
    for r in (first, second):
        assert (
            len(r.metrics["history"]["head"]) == 3 and len(r.metrics["history"]["fine_tune"]) == 1
        )
        assert r.test_accuracy >= 0.8, r.metrics["test"]


def test_cached_and_online_train_the_same_architecture(cached_runs, trained_run):
    """The saved model is base + head either way: same layers, same weight shapes."""
    import tempfile

    import tf_keras

    def load(run_uri: str):
        path = f"{tempfile.mkdtemp()}/model.keras"
        storage.download_file(f"{run_uri}/model/model.keras", path)
        return tf_keras.models.load_model(path, compile=False)

    cached, online = load(cached_runs[1].run_uri), load(trained_run.run_uri)
    assert [(type(layer).__name__, layer.name) for layer in cached.layers] == [
        (type(layer).__name__, layer.name) for layer in online.layers
    ]
    assert [w.shape for w in cached.weights] == [w.shape for w in online.weights]
    assert json.loads(cached.to_json())["config"]["layers"][-1]["class_name"] == "Dense"


def test_changing_weights_or_image_size_misses(
    cached_runs, session_root, pretrained_weights, target_dataset
):
    manifest = load_manifest(target_dataset)
    same = cached_cfg(session_root, pretrained_weights)
    hit = plan_cache(same, manifest, fetch_weights(same.model.weights))
    assert not hit.build and hit.key == cached_runs[1].metrics["feature_cache"]["key"]
    for extra in (
        {"data.image_size": 40},
        {"model.weights": "none"},
        {"model.head.pooling": "avg"},
    ):
        cfg = cached_cfg(session_root, pretrained_weights, **extra)
        plan = plan_cache(cfg, manifest, fetch_weights(cfg.model.weights))
        assert plan.build and plan.key != hit.key, extra


def test_damaged_or_partial_cache_is_detected_and_cleared(
    cached_runs, session_root, pretrained_weights, target_dataset
):
    manifest = load_manifest(target_dataset)
    cfg = cached_cfg(session_root, pretrained_weights)
    uri = cached_runs[1].metrics["feature_cache"]["uri"]
    features = load_manifest(uri)
    shard = f"{uri}/{features.split('train').shards[0].path}"
    data = bytearray(storage.read_bytes(shard))
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    storage.write_bytes(shard, bytes(data))
    plan = plan_cache(cfg, manifest, fetch_weights(cfg.model.weights))
    assert plan.build and "fails its checksum" in plan.reason
    assert not storage.exists(f"{uri}/manifest.json"), "a damaged cache must be un-committed"
    assert not storage.exists(shard), "and its build removed"


@pytest.mark.slow
def test_partial_cache_is_rebuilt_by_the_next_run(
    cached_runs, session_root, pretrained_weights, target_dataset
):
    uri = cached_runs[1].metrics["feature_cache"]["uri"]
    run = train(cached_cfg(session_root, pretrained_weights))  # rebuilds (or builds) it
    storage.delete(f"{uri}/manifest.json")  # shards of a build, never committed
    cfg = cached_cfg(session_root, pretrained_weights)
    plan = plan_cache(cfg, load_manifest(target_dataset), fetch_weights(cfg.model.weights))
    assert plan.build and plan.reason == "no cache yet"  # uncommitted files are no cache
    rebuilt = train(cached_cfg(session_root, pretrained_weights))
    assert rebuilt.metrics["feature_cache"]["hit"] is False
    assert rebuilt.metrics["feature_cache"]["images_encoded"] > 0
    assert run.metrics["feature_cache"]["key"] == rebuilt.metrics["feature_cache"]["key"]


def _build_in_process(cfg, plan, dataset) -> None:
    """What the workers do, in this process (one rank): encode, write, commit."""
    from xfer.data.featurebuild import build_part
    from xfer.data.features import commit_cache
    from xfer.models.model import build_model, feature_extractor

    weights = fetch_weights(cfg.model.weights)
    model, _ = build_model(cfg.model, cfg.data.image_size, dataset.num_classes, weights.local_path)
    build_part(cfg, plan, dataset, feature_extractor(model, cfg.model), rank=0, world=1)
    commit_cache(plan, dataset, world=1)


def test_runs_sharing_a_key_never_delete_or_read_each_others_builds(
    bucket, pretrained_weights, target_dataset
):
    """A learning-rate sweep: several runs with one cache key at the same time."""
    cfg = cached_cfg(f"{bucket}/root", pretrained_weights, **{"data.dataset": target_dataset})
    dataset = load_manifest(target_dataset)
    weights = fetch_weights(cfg.model.weights)
    a = plan_cache(cfg, dataset, weights, build_id="run-a")
    b = plan_cache(cfg, dataset, weights, build_id="run-b")
    assert a.build and b.build and a.key == b.key and a.build_path != b.build_path
    # Run b is half-way through writing its build when run a commits.
    b_part = f"{b.uri}/{b.build_path}/train/part-00000.parquet"
    storage.write_bytes(b_part, b"half written by run b")
    assert plan_cache(cfg, dataset, weights, build_id="run-c").build, "nothing committed yet"
    _build_in_process(cfg, a, dataset)
    committed = load_manifest(a.uri)
    assert committed.settings["build"] == "run-a"
    assert all(s.path.startswith("builds/run-a/") for s in committed.split("train").shards)
    assert not plan_cache(cfg, dataset, weights, build_id="run-c").build  # a hit
    assert storage.exists(b_part), "committing run a touched run b's build"
    # A damaged commit is withdrawn with its own build only.
    shard = f"{a.uri}/{committed.split('train').shards[0].path}"
    storage.write_bytes(shard, b"damaged")
    again = plan_cache(cfg, dataset, weights, build_id="run-d")
    assert again.build and "wrong size" in again.reason
    assert not storage.exists(f"{a.uri}/manifest.json") and not storage.exists(shard)
    assert storage.exists(b_part)


@pytest.mark.slow
def test_cached_features_come_from_the_base_that_is_trained(
    session_root, pretrained_weights, target_dataset
):
    """With random weights (model.weights=none) a second copy of the base would not be
    the base the run trains and saves: the cache must hold the saved base's features."""
    import tempfile

    import numpy as np
    import tensorflow as tf
    import tf_keras

    from xfer.data.preprocess import decode_and_resize
    from xfer.models.model import feature_extractor

    cfg = cached_cfg(
        session_root,
        pretrained_weights,
        **{"model.weights": "none", "train.head.epochs": 1, "train.fine_tune.epochs": 0},
    )
    run = train(cfg)
    path = f"{tempfile.mkdtemp()}/model.keras"
    storage.download_file(f"{run.run_uri}/model/model.keras", path)
    extractor = feature_extractor(tf_keras.models.load_model(path, compile=False), cfg.model)
    cache = load_manifest(run.metrics["feature_cache"]["uri"])
    cached = storage.read_parquet(cache.shard_uris("val")[0])
    dataset = load_manifest(target_dataset)
    images = storage.read_parquet(dataset.shard_uris("val")[0])
    assert cached.column("key").to_pylist() == images.column("key").to_pylist()
    pixels = np.stack(
        [decode_and_resize(tf.constant(b), 48).numpy() for b in images.column("image").to_pylist()]
    )
    expected = np.asarray(extractor(pixels, training=False))
    got = np.stack(
        [np.frombuffer(v, dtype=np.float16) for v in cached.column("features").to_pylist()]
    ).astype("float32")
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2 * float(np.abs(expected).max()))


def test_ranks_share_the_row_groups_by_rows_not_by_shards():
    """A 1,600-row train shard and a 400-row val shard: both ranks encode ~1,000 rows."""
    from xfer.data.featurebuild import rank_pieces
    from xfer.data.manifest import Manifest, ShardInfo, SplitInfo

    def split(rows: int, groups: list[int]) -> SplitInfo:
        return SplitInfo(rows, [ShardInfo("s/part-00000.parquet", rows, 1, "x", groups)], {})

    train_groups, val_groups = [64] * 25, [64] * 6 + [16]
    m = Manifest(
        "d",
        ["a", "b"],
        {"train": split(1600, train_groups), "val": split(400, val_groups)},
        {},
        {},
        {},
    )
    for world in (1, 2, 3):
        shares = [rank_pieces(m, ["train", "val"], r, world) for r in range(world)]
        rows = [sum(sum(p.groups) for p in pieces) for pieces in shares]
        assert sum(rows) == 2000 and max(rows) - min(rows) <= 64, (world, rows)
        # In order, the ranks' pieces are the dataset's row groups, each exactly once.
        seq = [(p.split, p.first + i, g) for s in shares for p in s for i, g in enumerate(p.groups)]
        assert seq == [("train", i, g) for i, g in enumerate(train_groups)] + [
            ("val", i, g) for i, g in enumerate(val_groups)
        ]


def test_a_transient_read_never_deletes_a_committed_cache(
    bucket, pretrained_weights, target_dataset, fault_proxy
):
    """On main one SlowDown on the manifest GET read as "no usable manifest", and the
    plan deleted the manifest and the build other runs were training on."""
    cfg = cached_cfg(f"{bucket}/root", pretrained_weights, **{"data.dataset": target_dataset})
    dataset = load_manifest(target_dataset)
    weights = fetch_weights(cfg.model.weights)
    plan = plan_cache(cfg, dataset, weights, build_id="run-a")
    _build_in_process(cfg, plan, dataset)
    committed = storage.list_files(plan.uri)
    for action in ("slowdown", "denied"):
        fault_proxy.add("GET", r"/features/[^/]+/manifest\.json", action, times=1000)
        with pytest.raises(StorageError):
            plan_cache(cfg, dataset, weights, build_id="run-b")
        fault_proxy.clear()
        assert storage.list_files(plan.uri) == committed, f"{action}: the cache was touched"
    assert not plan_cache(cfg, dataset, weights, build_id="run-b").build  # still a hit
