"""The head-phase feature cache: built once, reused by key, rebuilt when damaged."""

from __future__ import annotations

import json

import pytest

from xfer import storage
from xfer.config import load_config
from xfer.features import plan_cache
from xfer.manifest import load_manifest
from xfer.train.driver import train
from xfer.weights import fetch_weights

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
    assert [s.rows for s in features.split("train").shards] == [
        s.rows for s in m.split("train").shards
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
    assert storage.list_files(uri) == [], "a damaged cache must not be left to be used"


@pytest.mark.slow
def test_partial_cache_is_rebuilt_by_the_next_run(
    cached_runs, session_root, pretrained_weights, target_dataset
):
    uri = cached_runs[1].metrics["feature_cache"]["uri"]
    run = train(cached_cfg(session_root, pretrained_weights))  # rebuilds (or builds) it
    storage.delete(f"{uri}/manifest.json")  # now a partial cache: shards, no manifest
    cfg = cached_cfg(session_root, pretrained_weights)
    plan = plan_cache(cfg, load_manifest(target_dataset), fetch_weights(cfg.model.weights))
    assert plan.build and "no usable manifest" in plan.reason
    rebuilt = train(cached_cfg(session_root, pretrained_weights))
    assert rebuilt.metrics["feature_cache"]["hit"] is False
    assert rebuilt.metrics["feature_cache"]["images_encoded"] > 0
    assert run.metrics["feature_cache"]["key"] == rebuilt.metrics["feature_cache"]["key"]
