"""``data.exclude``: a list of keys (as ``xfer audit`` writes it) that training leaves out.

One real two-worker run (cached head features, then fine-tuning on images) with a
list naming train, val and test keys and keys of no dataset; the rest needs no
training: list formats, bad lists, the equal-steps plan with rows left out, and a
resume refused when the list changed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math

import pyarrow as pa
import pytest

from xfer.config import load_config, resolved_dict
from xfer.data.exclude import Exclusion, load_exclusion, parse_keys
from xfer.data.manifest import load_manifest
from xfer.data.reader import ReaderSpec, make_dataset
from xfer.errors import ConfigError, DataError
from xfer.store import storage

from .conftest import IMAGE_SIZE, config_for, train_overrides

AUDIT_COLUMNS = ["key", "split", "given_label", "suggested_label", "score", "reason"]
GLOBAL_BATCH = 16  # train_overrides: batch 8 per replica, 2 workers


def split_keys(dataset: str) -> dict[str, list[str]]:
    manifest = load_manifest(dataset)
    return {
        split: [k for uri in manifest.shard_uris(split) for k in _keys(uri)]
        for split in manifest.splits
    }


def _keys(uri: str) -> list[str]:
    return storage.read_parquet(uri, ["key"]).column("key").to_pylist()


def audit_csv(rows: list[tuple[str, str]]) -> bytes:
    """An issues list in `xfer audit`'s column layout."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(AUDIT_COLUMNS)
    for key, split in rows:
        writer.writerow([key, split, "ring", "star", 0.93, "label_issue"])
    return out.getvalue().encode()


def seen_keys(spec: ReaderSpec, pipelines: int = 1) -> list[list[str]]:
    """Keys with weight 1 that each input pipeline yields in one pass."""
    import tensorflow as tf

    out = []
    for p in range(pipelines):
        ctx = tf.distribute.InputContext(pipelines, p, pipelines)
        keys = []
        for key, _, _, weight in make_dataset(spec, ctx if pipelines > 1 else None):
            keys += [k.decode() for k, w in zip(key.numpy(), weight.numpy(), strict=True) if w > 0]
        out.append(keys)
    return out


# ------------------------------------------------------------------ the list


def test_list_formats_give_the_same_keys():
    keys = ["ring/a.png", "star/b c.png", "ring/é.png"]
    csv_bytes = audit_csv([(k, "train") for k in keys])
    buf = pa.BufferOutputStream()
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"score": [0.1, 0.2, 0.3], "key": keys}), buf)
    text = ("\n".join(keys) + "\n\n").encode()
    assert parse_keys("s3://b/issues.csv", csv_bytes) == keys
    assert parse_keys("s3://b/issues.parquet", buf.getvalue().to_pybytes()) == keys
    assert parse_keys("s3://b/keys.txt", text) == keys
    assert parse_keys("s3://b/issues", csv_bytes) == keys  # sniffed: a CSV header
    assert parse_keys("s3://b/issues", buf.getvalue().to_pybytes()) == keys  # sniffed: PAR1


def test_bad_lists_are_one_line_naming_the_uri(
    session_root, pretrained_weights, target_dataset, capsys
):
    from xfer.cli import main

    manifest = load_manifest(target_dataset)
    missing = f"{session_root}/lists/no-such-list.csv"
    overrides = train_overrides(session_root, pretrained_weights, **{"data.exclude": missing})
    capsys.readouterr()
    assert main(["train", *overrides]) == 2  # refused before any worker starts
    err = capsys.readouterr().err.strip()
    assert missing in err and "data.exclude" in err and len(err.splitlines()) == 1
    no_key = f"{session_root}/lists/no-key.csv"
    storage.write_bytes(no_key, b"path,reason\nring/a.png,dup\n")
    with pytest.raises(ConfigError, match="has no 'key' column") as info:
        load_exclusion(no_key, manifest)
    assert no_key in str(info.value) and "\n" not in str(info.value)
    everything = f"{session_root}/lists/all-train.txt"
    storage.write_bytes(everything, "\n".join(split_keys(target_dataset)["train"]).encode())
    with pytest.raises(DataError, match="leaves no training rows"):
        load_exclusion(everything, manifest)


def test_equal_steps_with_rows_left_out(session_root, target_dataset):
    """Two pipelines: disjoint, every remaining row once, none of the excluded, the same
    number of batches each, from counts the driver resolved."""
    keys = split_keys(target_dataset)["train"]
    dropped = keys[1:30:3]  # spread over row groups
    uri = f"{session_root}/lists/reader.txt"
    storage.write_bytes(uri, "\n".join(dropped).encode())
    exclusion = load_exclusion(uri, load_manifest(target_dataset))
    assert exclusion is not None
    exclusion = Exclusion.from_dict(exclusion.to_dict())  # as the workers get it
    spec = ReaderSpec(
        load_manifest(target_dataset),
        "train",
        IMAGE_SIZE,
        per_replica_batch=8,
        decode=False,
        with_keys=True,
        exclude=exclusion.of("train"),
    )
    assert spec.num_rows == len(keys) - len(dropped)
    first, second = seen_keys(spec, pipelines=2)
    assert not set(first) & set(second)
    assert sorted(first + second) == sorted(set(keys) - set(dropped))
    assert spec.steps_per_epoch(2) == math.ceil((len(keys) - len(dropped)) / GLOBAL_BATCH)


def test_resume_refused_when_the_list_changed(session_root, pretrained_weights, target_dataset):
    """A run started with one list cannot be resumed after the list's bytes changed."""
    from xfer.train.driver import train
    from xfer.train.journal import record_dataset

    uri = f"{session_root}/lists/resume.csv"
    keys = split_keys(target_dataset)["train"][:3]
    storage.write_bytes(uri, audit_csv([(k, "train") for k in keys]))
    cfg = load_config(
        None, train_overrides(session_root, pretrained_weights, **{"data.exclude": uri})
    )
    manifest = load_manifest(target_dataset)
    run_uri = cfg.run_uri("exclude-resume")
    storage.write_yaml(storage.join(run_uri, "config.yaml"), resolved_dict(cfg))
    record_dataset(run_uri, manifest.uri, manifest.checksum, load_exclusion(uri, manifest))
    storage.write_bytes(uri, audit_csv([(k, "train") for k in keys[:2]]))
    with pytest.raises(DataError, match=r"data.exclude list .* changed since the run started"):
        train(config_for(session_root, "output.run_id=exclude-resume"))


# ------------------------------------------------------------------ a real run


@pytest.mark.slow
def test_training_leaves_the_listed_keys_out(bucket, pretrained_weights, target_dataset):
    from xfer.train.driver import train

    # A root of its own: its feature cache must not be the one test_features sees built.
    root = f"{bucket}/xfer"

    keys = split_keys(target_dataset)
    rows = {split: len(k) for split, k in keys.items()}
    # Enough train keys that the steps per epoch drop: they must come from the rows left.
    n_train = (rows["train"] - 1) % GLOBAL_BATCH + 1
    n_train += GLOBAL_BATCH if n_train < 10 else 0
    left_out = {"train": keys["train"][:n_train], "val": keys["val"][:3], "test": keys["test"][:4]}
    listed = [(k, s) for s, ks in left_out.items() for k in ks]
    listed += [("elsewhere/not-here.png", "train"), ("elsewhere/nor-here.png", "test")]
    uri = f"{root}/lists/issues.csv"
    body = audit_csv(listed)
    storage.write_bytes(uri, body)

    cfg = load_config(
        None,
        train_overrides(
            root,
            pretrained_weights,
            **{
                "data.dataset": target_dataset,
                "data.exclude": uri,
                "model.head.features": "cached",
                "output.model_name": "shapes-exclude",
            },
        ),
    )
    result = train(cfg)
    lineage = storage.read_json(storage.join(result.run_uri, "lineage.json"))
    assert lineage["exclude"] == {
        "uri": uri,
        "sha256": hashlib.sha256(body).hexdigest(),
        "keys": len(listed),
        "excluded": {split: len(left_out.get(split, [])) for split in keys},
        "not_in_dataset": 2,
    }
    metrics = result.metrics
    assert metrics["test"]["examples"] == rows["test"] - 4
    predicted = set(_keys(storage.join(result.run_uri, "predictions", "test.parquet")))
    assert predicted == set(keys["test"]) - set(left_out["test"])
    # Steps from the rows that remain (fewer than the manifest's count would give).
    remaining = rows["train"] - n_train
    assert metrics["steps_per_epoch"] == math.ceil(remaining / GLOBAL_BATCH)
    assert metrics["steps_per_epoch"] < math.ceil(rows["train"] / GLOBAL_BATCH)

    # The head phase trained on the cache; read it as the head phase did: its rows
    # are the dataset's (shared with other runs), the run's reader leaves the list out.
    cache = metrics["feature_cache"]
    assert cache and cache["uri"]
    features = load_manifest(cache["uri"])
    assert features.splits["train"].rows == rows["train"]
    exclusion = load_exclusion(uri, load_manifest(target_dataset))
    assert exclusion is not None
    for split in ("train", "val"):
        spec = ReaderSpec(
            features,
            split,
            IMAGE_SIZE,
            per_replica_batch=8,
            column="features",
            feature_dim=int(features.settings["feature_dim"]),
            with_keys=True,
            exclude=exclusion.of(split),
        )
        (seen,) = seen_keys(spec)
        assert sorted(seen) == sorted(set(keys[split]) - set(left_out[split]))
    head = metrics["history"]["head"][-1]
    assert head["images_per_s"] * head["train_seconds"] == pytest.approx(remaining)
