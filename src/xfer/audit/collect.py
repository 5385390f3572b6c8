"""`xfer audit DATASET`: duplicate images and suspected label errors in a dataset.

    xfer audit cats_vs_dogs --config jobs/configs/local.yaml model.weights=/path/base.h5
    xfer audit s3://bucket/datasets/pets --folds 5 --out s3://bucket/audits/pets/today

Every image of every split is read from the shards, fingerprinted (sha256 of its
stored bytes and of its decoded pixels, imagehash's pHash) and run through the
configured base (``model.base``, ``model.weights``, ``data.image_size``, pooled as
``model.head.pooling``) in this process; :mod:`xfer.audit.find` then finds exact and
near duplicates within and across splits and suspected label errors (confident
learning on out-of-fold probabilities). :mod:`xfer.audit.report` writes, under the
output prefix (default ``<root>/audits/<dataset>/<UTC time>-<token>/``, new for
every run):

    issues.parquet, issues.csv   key, split, given_label, suggested_label, score,
                                 reason, duplicate_of, duplicate_split, detail
    audit.html                   thumbnails grouped by reason, the counts at the top

The list files are usable as ``data.exclude=<uri>`` (their ``key`` column), but they
hold every finding: filter them first (keep the rows you checked).

What a crash or a second run leaves: each file is one whole object, written in the
order above, ``audit.html`` last. A prefix with ``audit.html`` is complete; without it,
an interrupted audit (run it again). A default prefix is fresh per run, so runs never
mix; an explicit ``--out`` that holds an older audit has its ``audit.html`` deleted
first, so it never vouches for list files of another run.

Scale: one process holds every image's encoded bytes (~30 KB each at max_side 256)
and features; the forward pass ran at 15-46 images/s on 2 shared CPU cores for
MobileNetV2 at 224 px (2,000 photos: 1-4 minutes). The feature cache
(:mod:`xfer.data.features`) is not reused: it holds train and val only, and only for a
run's key. For hundreds of thousands of images, compute the features on Ray workers
(as the cache's build does) and search neighbours with an index, not all pairs.
"""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from xfer.audit.find import (
    Finding,
    Fingerprints,
    duplicate_findings,
    label_findings,
    similar_pairs,
)
from xfer.config import XferConfig
from xfer.data.manifest import Manifest, load_manifest
from xfer.errors import DataError
from xfer.models.weights import check_weights
from xfer.store import storage


@dataclass(frozen=True)
class AuditSettings:
    folds: int = 5
    phash_distance: int = 6  # of 64 bits
    cosine: float = 0.95  # of centred pooled base features; > 1 turns it off
    out: str | None = None
    seed: int = 0


@dataclass
class Images:
    """Every image of the dataset, in split order, with what the audit compares."""

    fingerprints: Fingerprints
    encoded: list[bytes]
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


@dataclass(frozen=True)
class AuditResult:
    dataset: str
    out: str
    images: int
    counts: dict[str, int]  # findings per reason
    files: dict[str, str]

    def describe(self) -> str:
        lines = [f"audited {self.images} images of {self.dataset}"]
        for reason, n in sorted(self.counts.items()):
            lines.append(f"  {reason}: {n}")
        if not self.counts:
            lines.append("  nothing found")
        lines += [f"  {name}: {uri}" for name, uri in self.files.items()]
        lines.append(
            "  to train without them: filter the list, then data.exclude=<its uri> "
            "(every row as it is would leave out every finding)"
        )
        return "\n".join(lines)


def output_prefix(cfg: XferConfig, dataset: Manifest, settings: AuditSettings) -> str:
    if settings.out:
        return settings.out.rstrip("/")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    name = storage.basename(dataset.uri) or dataset.name
    return storage.join(cfg.storage.root, "audits", name, f"{stamp}-{secrets.token_hex(3)}")


def load_images(dataset: Manifest) -> Images:
    """Read every split's rows (key, image, label) and fingerprint each image."""
    import imagehash
    from PIL import Image

    from xfer.console import Progress

    keys, splits, labels, encoded = [], [], [], []
    for split in dataset.splits:
        for uri in dataset.shard_uris(split):
            table = storage.read_parquet(uri, columns=["key", "image", "label"])
            keys += table.column("key").to_pylist()
            encoded += table.column("image").to_pylist()
            labels += table.column("label").to_pylist()
            splits += [split] * table.num_rows
    if not keys:
        raise DataError(f"dataset {dataset.uri} has no images to audit")
    if any(label is None for label in labels):
        raise DataError(f"dataset {dataset.uri} has unlabelled rows: a label audit needs labels")
    byte_hashes, pixel_hashes, phashes = [], [], []
    with Progress("fingerprints", len(keys), unit="image") as progress:
        for data in encoded:
            byte_hashes.append(_sha256(data))
            img = Image.open(io.BytesIO(data)).convert("RGB")
            pixel_hashes.append(_sha256(f"{img.size}".encode() + img.tobytes()))
            bits = imagehash.phash(img).hash.flatten()
            phashes.append(int.from_bytes(np.packbits(bits).tobytes(), "big"))
            progress.update()
    fp = Fingerprints(
        keys,
        splits,
        np.asarray(labels, np.int64),
        byte_hashes,
        pixel_hashes,
        np.asarray(phashes, np.uint64),
    )
    return Images(fp, encoded)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def base_features(cfg: XferConfig, encoded: list[bytes], num_classes: int) -> np.ndarray:
    """Pooled features of the configured base, decoded and resized as training does."""
    import tensorflow as tf

    from xfer.console import Progress
    from xfer.data.preprocess import decode_and_resize
    from xfer.models.model import build_model, feature_extractor
    from xfer.models.weights import fetch_weights

    weights = fetch_weights(cfg.model.weights)
    size = cfg.data.image_size
    model, _ = build_model(cfg.model, size, max(2, num_classes), weights.local_path)
    extractor = feature_extractor(model, cfg.model)
    batch = 64
    images = (
        tf.data.Dataset.from_tensor_slices(tf.constant(encoded, tf.string))
        .map(lambda b: decode_and_resize(b, size), num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch)
        .prefetch(2)
    )
    forward = tf.function(lambda x: extractor(x, training=False))
    out = []
    with Progress(f"features ({cfg.model.base}, {size}px)", len(encoded), unit="image") as bar:
        for x in images:
            out.append(np.asarray(forward(x), np.float32))
            bar.update(int(x.shape[0]))
    return np.concatenate(out)


def find_all(images: Images, classes: list[str], settings: AuditSettings) -> list[Finding]:
    fp, x = images.fingerprints, images.features
    pairs = similar_pairs(fp, x, settings.phash_distance, settings.cosine)
    findings = duplicate_findings(fp, x, pairs)
    return label_findings(x, fp.labels, classes, settings.folds, settings.seed) + findings


def run_audit(cfg: XferConfig, dataset_uri: str, settings: AuditSettings) -> AuditResult:
    """Audit the dataset at ``dataset_uri``; write the lists and the page."""
    from xfer.audit.report import write_outputs

    if settings.folds < 2:
        raise DataError(f"--folds {settings.folds}: cross-validation needs at least 2 folds")
    dataset = load_manifest(dataset_uri)
    check_labels(dataset, settings.folds)
    check_weights(cfg.model.weights)  # before minutes of reading
    out = output_prefix(cfg, dataset, settings)
    images = load_images(dataset)
    images.features = base_features(cfg, images.encoded, dataset.num_classes)
    findings = find_all(images, dataset.classes, settings)
    files = write_outputs(out, dataset, images, findings, _settings_record(cfg, settings))
    counts: dict[str, int] = {}
    for f in findings:
        counts[f.reason] = counts.get(f.reason, 0) + 1
    return AuditResult(dataset.uri, out, len(images.encoded), counts, files)


def check_labels(dataset: Manifest, folds: int) -> None:
    """Before any image is read: enough classes, and images per class for the folds."""
    if len(dataset.classes) < 2:
        raise DataError(
            f"dataset {dataset.uri} has {len(dataset.classes)} class(es): no labels to audit"
        )
    counts = {c: 0 for c in dataset.classes}
    for info in dataset.splits.values():
        for c, n in info.class_counts.items():
            counts[c] = counts.get(c, 0) + n
    smallest = min(counts, key=lambda c: counts[c])
    if counts[smallest] < folds:
        raise DataError(
            f"dataset {dataset.uri}: class {smallest!r} has {counts[smallest]} images, fewer "
            f"than --folds {folds}; lower --folds (at least 2) or add images"
        )


def _settings_record(cfg: XferConfig, settings: AuditSettings) -> dict[str, Any]:
    return {
        "base": cfg.model.base,
        "weights": cfg.model.weights,
        "image_size": cfg.data.image_size,
        "pooling": cfg.model.head.pooling,
        "folds": settings.folds,
        "phash_distance": settings.phash_distance,
        "cosine": settings.cosine,
    }
