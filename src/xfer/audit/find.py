"""What `xfer audit` looks for: duplicate images and suspected label errors.

    pairs = similar_pairs(fingerprints, features, phash_distance=6, cosine=0.95)
    dups = duplicate_findings(fingerprints, features, pairs)
    labels = label_findings(features, fingerprints.labels, ["cats", "dogs"], folds=5)

Pure computation on arrays (no I/O, no TensorFlow): :mod:`xfer.audit.collect` reads the
images and computes the fingerprints and features; :mod:`xfer.audit.report` writes
what is found here.

Duplicates: two images are one if their stored bytes or their decoded pixels are
identical (exact), or if their perceptual hashes (imagehash's 64-bit pHash) differ in
at most ``phash_distance`` bits or their pooled base features, centred, have a
cosine similarity of at least ``cosine`` (near). Of linked images one is kept (test before
val before train, then the first key); every other one is a finding whose
``duplicate_of`` is a kept image it is itself similar to. So a near-copy of a test
image in train is reported against the train copy, the one to leave out of training.
The cosine threshold belongs to the base: with ImageNet MobileNetV2 at 224 px, the
2,000 cat/dog photos' one near-duplicate pair scored 0.983 and the next pair 0.775.

Label issues are confident learning (cleanlab): out-of-fold predicted probabilities
from a logistic regression on L2-normalised features, ``folds``-fold stratified,
then ``cleanlab.filter.find_label_issues``; the score is 1 - cleanlab's label quality
(self-confidence), the suggested label the out-of-fold argmax.

Comparisons are all pairs, in blocks of ``BLOCK`` rows (memory O(BLOCK x n)): fine to
~100k images on one machine; beyond that a nearest-neighbour index would replace them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from xfer.errors import DataError

BLOCK = 1024
# The kept member of a duplicate group: test first, then val, then train (the copies
# in training are the ones to leave out; test images stay and keep measuring).
SPLIT_ORDER = {"test": 0, "val": 1, "train": 2}


@dataclass(frozen=True)
class Fingerprints:
    """Per image, in one order: what the duplicate search compares."""

    keys: list[str]
    splits: list[str]
    labels: np.ndarray  # int class ids
    byte_hashes: list[str]  # sha256 of the stored (encoded) image
    pixel_hashes: list[str]  # sha256 of the decoded RGB pixels and their shape
    phashes: np.ndarray  # uint64 perceptual hashes


@dataclass(frozen=True)
class Finding:
    index: int  # the flagged image
    reason: str
    score: float  # 0..1, higher = surer it is a problem
    detail: str
    other: int | None = None  # duplicate_of: the kept image of the group
    suggested: int | None = None  # a class id (label issues)


def normalised(features: np.ndarray) -> np.ndarray:
    x = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def centred(features: np.ndarray) -> np.ndarray:
    """Unit vectors of the features minus their mean, for cosine similarity.

    Pooled ReLU features all point into the positive orthant, so that raw cosines of
    unrelated images run high (0.98 for a tiny base's); centred, they spread out.
    """
    x = np.asarray(features, dtype=np.float32)
    return normalised(x - x.mean(axis=0, keepdims=True))


def _blocks(n: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, BLOCK):
        yield start, min(n, start + BLOCK)


def similar_pairs(
    fp: Fingerprints, features: np.ndarray, phash_distance: int, cosine: float
) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, that are exact or near duplicates."""
    pairs: set[tuple[int, int]] = set()
    for hashes in (fp.byte_hashes, fp.pixel_hashes):
        first: dict[str, int] = {}
        for j, h in enumerate(hashes):  # chain each copy to the first: a group needs no more
            i = first.setdefault(h, j)
            if i != j:
                pairs.add((i, j))
    x, n = centred(features), len(fp.keys)
    for start, stop in _blocks(n):
        near = (
            np.bitwise_count(fp.phashes[start:stop, None] ^ fp.phashes[None, :]) <= phash_distance
        )
        if cosine <= 1.0:
            near |= (x[start:stop] @ x.T) >= cosine
        rows, cols = np.nonzero(near)
        rows = rows + start
        pairs.update((int(i), int(j)) for i, j in zip(rows, cols, strict=True) if i < j)
    return sorted(pairs)


def duplicate_findings(
    fp: Fingerprints, features: np.ndarray, pairs: list[tuple[int, int]]
) -> list[Finding]:
    """One finding per duplicate image, against an image it is directly linked to.

    Images are visited in keeping order (test, val, train, then key); each one not
    yet flagged is kept and flags its unflagged neighbours. Links never chain: a
    flagged image is always similar to its ``duplicate_of`` itself, not through a
    run of near pairs (which, on a weak base, can link half a data set).
    """
    neighbours: dict[int, list[int]] = {}
    for i, j in pairs:
        neighbours.setdefault(i, []).append(j)
        neighbours.setdefault(j, []).append(i)
    order = sorted(neighbours, key=lambda k: (SPLIT_ORDER.get(fp.splits[k], 3), fp.keys[k]))
    x = centred(features)
    kept: set[int] = set()
    flagged: dict[int, Finding] = {}
    for keep in order:
        if keep in flagged:
            continue
        kept.add(keep)
        for m in neighbours[keep]:
            if m not in kept and m not in flagged:
                flagged[m] = _duplicate(fp, x, m, keep)
    return list(flagged.values())


def _duplicate(fp: Fingerprints, x: np.ndarray, m: int, keep: int) -> Finding:
    exact = fp.byte_hashes[m] == fp.byte_hashes[keep] or fp.pixel_hashes[m] == fp.pixel_hashes[keep]
    kind = "exact_duplicate" if exact else "near_duplicate"
    cos = float(np.clip(x[m] @ x[keep], -1.0, 1.0))
    distance = int(np.bitwise_count(fp.phashes[m] ^ fp.phashes[keep]))
    what = "identical image" if exact else f"phash distance {distance}, cosine {cos:.3f}"
    mine, theirs = fp.splits[m], fp.splits[keep]
    detail = f"{kind.replace('_', ' ')} of {theirs} image {fp.keys[keep]} ({what})"
    if mine != theirs:
        kind += "_across_splits"
        detail += (
            f": a copy in {mine} inflates {'test' if theirs == 'test' else 'validation'} accuracy"
        )
    return Finding(m, kind, 1.0 if exact else max(cos, 0.0), detail, other=keep)


def out_of_fold_probabilities(
    features: np.ndarray, labels: np.ndarray, classes: list[str], folds: int, seed: int = 0
) -> np.ndarray:
    """Each image's class probabilities from a model that never saw it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if len(classes) < 2:
        raise DataError(
            f"label audit: the dataset has {len(classes)} class(es); it needs 2 or more"
        )
    counts = np.bincount(labels, minlength=len(classes))
    smallest = int(counts.argmin())
    if counts[smallest] < folds:
        raise DataError(
            f"label audit: class {classes[smallest]!r} has {int(counts[smallest])} images, "
            f"fewer than --folds {folds}; lower --folds (at least 2) or add images"
        )
    model = LogisticRegression(max_iter=2000)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs: Any = cross_val_predict(
        model, normalised(features), labels, cv=split, method="predict_proba"
    )
    return np.asarray(probs)


def label_findings(
    features: np.ndarray, labels: np.ndarray, classes: list[str], folds: int, seed: int = 0
) -> list[Finding]:
    """Suspected label errors, most suspect first."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = out_of_fold_probabilities(features, labels, classes, folds, seed)
    # n_jobs=1: its default forks workers, which hangs in a process running TensorFlow.
    issues = find_label_issues(labels, probs, n_jobs=1)
    quality = get_label_quality_scores(labels, probs)
    suggested = probs.argmax(axis=1)
    findings = [
        Finding(
            int(i),
            "label_issue",
            float(1.0 - quality[i]),
            f"labelled {classes[labels[i]]}, out-of-fold P({classes[suggested[i]]}) = "
            f"{probs[i, suggested[i]]:.3f}",
            suggested=int(suggested[i]),
        )
        for i in np.flatnonzero(issues)
    ]
    return sorted(findings, key=lambda f: -f.score)
