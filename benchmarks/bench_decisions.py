"""The numbers a team decides on, on real photos: calibration and the paired gate.

    python benchmarks/bench_decisions.py --images ../shared/data/cats_vs_dogs \\
        --weights ../shared/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5

The photos are split 60/20/20 (train/val/test) so that the temperature is fitted on
one split (val) and judged on another (test). Two runs that differ only in their
seed train a head on cached MobileNetV2 features at 160 px (no fine-tuning: a few
minutes); the first is published, the second is gated against it in ``better`` and
``not_worse`` mode on the same 400 test images. Recorded as ``decisions``:

- the temperature, and the test split's expected calibration error (ECE) and
  log-loss with the network's own probabilities and calibrated;
- the second run against the first: discordant images, McNemar's exact p-value, the
  bootstrap interval, and what each mode decided.
"""

from __future__ import annotations

import argparse

from common import ROOT, environment, photo_overrides, record

IMAGE_SIZE = 160
HEAD_EPOCHS = 5


def prepare(images: str, weights: str) -> str:
    from xfer.config import ShardConfig
    from xfer.data.shard import shard_dataset
    from xfer.store import storage

    if not storage.exists(f"{ROOT}/datasets/decisions/manifest.json"):
        shard_dataset(
            images,
            f"{ROOT}/datasets/decisions",
            ShardConfig(split_fractions=(0.6, 0.2, 0.2), max_side=256),
        )
    weights_uri = f"{ROOT}/weights/mobilenet_v2_1.0_224_imagenet_no_top.h5"
    if not storage.exists(weights_uri):
        storage.upload_file(weights, weights_uri)
    return weights_uri


def overrides(weights_uri: str, seed: int, **extra: object) -> list[str]:
    items = {
        **photo_overrides(weights_uri, "decisions", IMAGE_SIZE),
        "model.head.features": "cached",
        "train.head.epochs": HEAD_EPOCHS,
        "train.fine_tune.epochs": 0,
        "train.seed": seed,
        "output.predictions": "true",
        "output.model_name": "decisions",
        **extra,
    }
    return [f"{k}={v}" for k, v in items.items()]


def test_log_loss(run_uri: str) -> tuple[float, float]:
    """The test split's log-loss, the network's own probabilities and calibrated."""
    from xfer.models.calibration import apply_temperature, nll
    from xfer.store import storage
    from xfer.train.outputs import labelled_probabilities

    table = storage.read_parquet(f"{run_uri}/predictions/test.parquet")
    probs, labels = labelled_probabilities(table)
    t = float(table.schema.metadata[b"xfer.temperature"])
    return nll(apply_temperature(probs, 1 / t), labels), nll(probs, labels)


def run_in(images: str, weights: str) -> dict:
    from xfer.config import load_config
    from xfer.train.driver import train

    weights_uri = prepare(images, weights)
    first = train(load_config(None, overrides(weights_uri, 1)))
    cal = first.metrics["test"]["calibration"]
    fitted = first.metrics["calibration"]
    own, calibrated = test_log_loss(first.run_uri)
    figures: dict[str, object] = {
        "test images": first.metrics["test"]["examples"],
        "test accuracy, first run": first.metrics["test"]["accuracy_from_predictions"],
        "temperature (fitted on val)": round(cal["temperature"], 3),
        "val ECE, network's own -> calibrated": f"{fitted['ece_before']:.4f} -> {fitted['ece_after']:.4f}",
        "test ECE, network's own -> calibrated": f"{cal['ece_uncalibrated']:.4f} -> {cal['ece']:.4f}",
        "test log-loss, network's own -> calibrated": f"{own:.4f} -> {calibrated:.4f}",
        "calibration_ece_ratio": cal["ece"] / cal["ece_uncalibrated"],
    }
    for mode in ("better", "not_worse"):
        second = train(
            load_config(
                None,
                overrides(
                    weights_uri,
                    2,
                    **{"output.gate.vs_published": "true", "output.gate.mode": mode},
                ),
            )
        )
        vs = second.metrics["gate"]["vs_published"]
        lo, hi = vs["interval"]
        figures[f"second run vs first ({mode})"] = (
            f"{vs['challenger_only']} only second right, {vs['champion_only']} only first right "
            f"of {vs['pairs']}; p = {vs['p_value']:.3g}; {100 * vs['difference']:+.2f} points "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}]: {vs['verdict']}, "
            + ("published" if second.published else "not published")
        )
        if second.published:  # the next mode compares with the first run again
            from xfer.registry.runs import promote

            promote(ROOT, first.run_id, force=True)
    record(
        "decisions",
        figures,
        notes=(
            f"Photos split 60/20/20; MobileNetV2 1.0 @{IMAGE_SIZE} px, ImageNet weights; head only, "
            f"{HEAD_EPOCHS} epochs on cached features (Adam 1e-3); 2 Ray workers. Temperature "
            "scaling fitted on val, judged on test (ECE: 10 equal-width bins of the top-class "
            "probability). The second run differs from the first only in train.seed; it is gated "
            "against the first (published) on the same test images, in each mode."
        ),
    )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    parser.add_argument("--weights", required=True)
    args = parser.parse_args()
    with environment():
        print(run_in(args.images, args.weights))
