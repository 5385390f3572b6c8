"""`xfer audit` on real photos: what it flags, and whether it finds labels flipped on purpose.

    python benchmarks/bench_audit.py --images ../shared/data/cats_vs_dogs \\
        --weights ../shared/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5

Shards the photos (80/10/10, max side 256) into a local root under a temporary
folder, computes the audit's fingerprints and MobileNetV2 features once, then:
1. the audit as `xfer audit` runs it (its findings per reason, and the keys);
2. the margins behind the duplicate thresholds: the closest pairs by pHash and by
   centred cosine after the ones flagged;
3. ``--flips`` labels flipped at random (per seed): recall and precision of the label
   audit on them, and the images it flags besides.
Figures go to ``benchmarks/results/audit.json``; looking at the flagged photos is
left to a person (the README says what was seen).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from xfer.audit.collect import Images

RESULTS = Path(__file__).parent / "results" / "audit.json"


def closest_pairs(images: Images, n: int = 3) -> dict[str, list[list[object]]]:
    from xfer.audit.find import centred

    fp, x = images.fingerprints, centred(images.features)
    cos = x @ x.T
    bits = np.bitwise_count(fp.phashes[:, None] ^ fp.phashes[None, :])
    upper = np.triu_indices(len(fp.keys), 1)
    out: dict[str, list[list[object]]] = {}
    for name, values, best_first in (("cosine", cos, -1), ("phash_bits", bits, 1)):
        flat = values[upper]
        for k in np.argsort(best_first * flat, kind="stable")[:n]:
            i, j = upper[0][k], upper[1][k]
            out.setdefault(name, []).append([fp.keys[i], fp.keys[j], round(float(flat[k]), 3)])
    return out


def flip_trial(images: Images, classes: list[str], flips: int, seed: int) -> dict[str, object]:
    from xfer.audit.find import label_findings

    fp = images.fingerprints
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(fp.keys), flips, replace=False)
    labels = fp.labels.copy()
    labels[flipped] = (labels[flipped] + 1) % len(classes)
    found = {f.index for f in label_findings(images.features, labels, classes, 5)}
    hits = len(found & set(flipped.tolist()))
    return {
        "seed": seed,
        "flipped": flips,
        "flagged": len(found),
        "recall": round(hits / flips, 3),
        "precision": round(hits / max(1, len(found)), 3),
        "flagged_besides": sorted(fp.keys[i] for i in found - set(flipped.tolist())),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--flips", type=int, default=40)
    args = parser.parse_args()

    from xfer.audit.collect import AuditSettings, base_features, find_all, load_images
    from xfer.config import ShardConfig, load_config
    from xfer.data.manifest import load_manifest
    from xfer.data.shard import shard_dataset
    from xfer.raycluster import ensure_ray

    with tempfile.TemporaryDirectory(prefix="xfer-bench-audit-") as tmp:
        ensure_ray(num_cpus=2)
        uri = f"{tmp}/datasets/photos"
        shard_dataset(args.images, uri, ShardConfig(max_side=256))
        cfg = load_config(
            None,
            [
                f"storage.root={tmp}",
                "model.base=mobilenet_v2",
                f"model.weights={Path(args.weights).resolve()}",
                f"data.image_size={args.image_size}",
            ],
        )
        dataset = load_manifest(uri)
        images = load_images(dataset)
        images.features = base_features(cfg, images.encoded, dataset.num_classes)
    findings = find_all(images, dataset.classes, AuditSettings())
    keys = images.fingerprints.keys
    figures = {
        "images": len(keys),
        "image_size": args.image_size,
        "findings": [[keys[f.index], f.reason, round(f.score, 3)] for f in findings],
        "closest_pairs": closest_pairs(images),
        "flip_trials": [flip_trial(images, dataset.classes, args.flips, s) for s in (0, 1)],
    }
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
