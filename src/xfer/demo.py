"""`xfer demo` (`make demo`): the whole flow on one machine, in a few minutes.

    xfer demo                    # offline: pretrain a small base on a source task first
    xfer demo --weights imagenet # MobileNetV2 with Keras' ImageNet weights (needs internet)
    xfer demo --keep             # keep the S3 server up afterwards, to look around

Embedded S3 server -> generated images -> shards -> training with 2 local Ray workers
(real MultiWorkerMirroredStrategy) -> published model -> nightly-style batch scoring.

Transfer learning for real, without internet: a small base is first trained on a
*source* task (six shapes), its weights are stored in the object store, and the
target run (three other shapes) loads them through the ``s3://`` weights path, the
same path an air-gapped cluster uses. A baseline trains the same head on a randomly
initialised frozen base, so the summary shows what the pretrained base bought.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xfer import console
from xfer.config import XferConfig, load_config
from xfer.registry.layout import LATEST, MODEL_DIR, MODEL_FILE, REPORT, dataset_uri, model_uri
from xfer.store import storage

SOURCE_CLASSES = ["star", "cross", "ring", "hexagon", "stripes", "dots"]
TARGET_CLASSES = ["circle", "square", "triangle"]
ROOT = "s3://xfer"
RAW = f"{ROOT}/raw"
SOURCE_WEIGHTS = f"{ROOT}/weights/tiny_cnn-shapes-source.h5"
# The demo is the shipped local config (jobs/configs/local.yaml), which is also
# packaged with xfer so that `xfer demo` works from an installed wheel.
LOCAL_CONFIG = Path(__file__).parent / "configs" / "local.yaml"


@dataclass(frozen=True)
class DemoSettings:
    workdir: str = "xfer-demo"
    keep: bool = False
    weights: str = "source"  # "source" | "imagenet"
    quick: bool = False  # fewer images and epochs (tests)

    @property
    def sizes(self) -> dict[str, int]:
        if self.quick:
            return {
                "source": 80,
                "target": 60,
                "new": 12,
                "source_epochs": 4,
                "head": 3,
                "fine_tune": 1,
            }
        return {
            "source": 300,
            "target": 150,
            "new": 40,
            "source_epochs": 10,
            "head": 8,
            "fine_tune": 4,
        }


def _step(n: int, total: int, text: str) -> None:
    print(f"\n=== [{n}/{total}] {text}", flush=True)


def demo_config(settings: DemoSettings, **overrides: Any) -> XferConfig:
    """The target run's config: the shipped local config, with the demo's sizes."""
    s = settings.sizes
    items = [
        f"train.head.epochs={s['head']}",
        f"train.fine_tune.epochs={s['fine_tune']}",
    ]
    if settings.weights == "imagenet":
        items += [
            "model.base=mobilenet_v2",
            "model.alpha=1.0",
            "data.image_size=96",
            "model.weights=imagenet",
        ]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(str(LOCAL_CONFIG), items)


def export_base_weights(run_uri: str, dest: str) -> None:
    """Store the base of a trained run as an .h5 weights file (for ``model.weights``)."""
    import tf_keras

    from xfer.models.model import extract_base

    with tempfile.TemporaryDirectory(prefix="xfer-demo-") as tmp:
        path = os.path.join(tmp, MODEL_FILE)
        storage.download_file(storage.join(run_uri, MODEL_DIR, MODEL_FILE), path)
        model = tf_keras.models.load_model(path, compile=False)
        out = os.path.join(tmp, "base.h5")
        extract_base(model).save_weights(out)
        storage.upload_file(out, dest)


class _Steps:
    """The numbered step headings: ``=== [n/total] text``."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def next(self, text: str) -> None:
        self.done += 1
        _step(self.done, self.total, text)


def run_demo(settings: DemoSettings) -> int:
    """S3 server -> images -> shards -> (source base) -> training -> baseline -> scoring."""
    from xfer.store.s3server import EmbeddedS3
    from xfer.train.driver import train

    started = time.monotonic()
    source = settings.weights == "source"
    steps = _Steps(7 if source else 6)
    work = Path(settings.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps.next(f"starting the embedded S3 server (data in {work / 's3'})")
    server = EmbeddedS3(work / "s3", buckets=("xfer",)).start()
    try:
        _start_local(server)
        steps.next("generating images: a source task (6 shapes) and a target task (3 other shapes)")
        _generate(settings)
        steps.next("sharding into Parquet (xfer shard)")
        _shard(settings)
        if source:
            steps.next(
                "pretraining the base on the source task (2 Ray workers, MultiWorkerMirroredStrategy)"
            )
            _pretrain_base(settings)
        steps.next("transfer learning on the target task: head, then fine-tuning (2 Ray workers)")
        cfg = demo_config(settings)
        result = train(cfg)
        print(result.describe(), flush=True)
        steps.next("baseline: the same head on a randomly initialised, frozen base")
        baseline = _baseline(settings)
        steps.next("nightly scoring of new images with the published model (xfer score)")
        scored = _score_new_images(cfg, result)
        local_report = work / REPORT
        storage.download_file(storage.join(result.run_uri, REPORT), str(local_report))
        print_summary(
            settings, server, result, baseline, scored, local_report, time.monotonic() - started
        )
        import ray

        ray.shutdown()
        if settings.keep:
            _keep_serving(server)
        return 0
    finally:
        server.stop()


def _start_local(server: Any) -> None:
    """This process talks to the embedded server; Ray runs on this machine."""
    from xfer.raycluster import ensure_ray

    os.environ.update(server.env())
    print(f"S3 endpoint {server.endpoint}", flush=True)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ensure_ray(num_cpus=max(2, os.cpu_count() or 2))


def _generate(settings: DemoSettings) -> None:
    from xfer.data.synth import synthesize

    s = settings.sizes
    for name, classes, per, seed in (
        ("shapes-source", SOURCE_CLASSES, s["source"], 1),
        ("shapes", TARGET_CLASSES, s["target"], 2),
        ("incoming", TARGET_CLASSES, s["new"], 3),
    ):
        if name == "shapes-source" and settings.weights != "source":
            continue
        storage.delete_prefix(f"{RAW}/{name}")
        synthesize(f"{RAW}/{name}", classes, per_class=per, size=64, seed=seed)


def _shard(settings: DemoSettings) -> None:
    from xfer.config import ShardConfig
    from xfer.data.shard import shard_dataset

    for name in ("shapes-source", "shapes"):
        if name == "shapes-source" and settings.weights != "source":
            continue
        summary = shard_dataset(
            f"{RAW}/{name}", dataset_uri(ROOT, name), ShardConfig(target_shard_mb=0.2)
        )
        print(summary.describe().splitlines()[0], flush=True)  # the rest: `xfer shard`


def _pretrain_base(settings: DemoSettings) -> None:
    """Train a base on the source task and store its weights at SOURCE_WEIGHTS."""
    from xfer.train.driver import train

    source_cfg = demo_config(
        settings,
        **{
            "data.dataset": "shapes-source",
            "model.weights": "none",
            "model.head.dense": "[]",
            "train.head.epochs": 0,
            "train.fine_tune.epochs": settings.sizes["source_epochs"],
            "train.fine_tune.learning_rate": 0.003,
            "output.model_name": "shapes-source",
            "output.gate.min_test_accuracy": 0.0,
            "output.predictions": "false",
            "train.verbose": 0,  # a means to an end: no per-epoch lines
        },
    )
    source = train(source_cfg)
    export_base_weights(source.run_uri, SOURCE_WEIGHTS)
    print(
        f"source task test accuracy {console.percent(source.test_accuracy)}; base weights -> {SOURCE_WEIGHTS}"
    )


def _baseline(settings: DemoSettings) -> Any:
    from xfer.train.driver import train

    baseline_cfg = demo_config(
        settings,
        **{
            "model.weights": "none",
            "train.fine_tune.epochs": 0,
            "output.model_name": "shapes-baseline",
            "output.publish": "false",
            "output.predictions": "false",
            "train.verbose": 0,
        },
    )
    baseline = train(baseline_cfg)
    baseline_head = baseline.metrics["phases"].get("head", {}).get("val_accuracy")
    print(
        f"baseline: val accuracy after the head phase {console.percent(baseline_head)}", flush=True
    )
    return baseline


def _score_new_images(cfg: XferConfig, result: Any) -> Any:
    """Score the incoming images with the published model (the run's, if the gate failed)."""
    from xfer.scoring.score import score

    model = model_uri(ROOT, "shapes")
    if not result.published:
        print(
            f"the run did not pass its quality gate, so it is not published: scoring {result.run_uri}"
        )
        model = result.run_uri
    scored = score(
        cfg, model=model, input_uri=f"{RAW}/incoming", output=f"{ROOT}/predictions/shapes"
    )
    print(scored.describe().splitlines()[0], flush=True)  # where: in the summary
    return scored


def _keep_serving(server: Any) -> None:
    print("\n--keep: the S3 server stays up until Ctrl-C. In another shell:")
    for key, value in server.env().items():
        print(f"  export {key}={value}")
    try:
        while server.running():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


def print_summary(
    settings: DemoSettings,
    server: Any,
    result: Any,
    baseline: Any,
    scored: Any,
    report: Path,
    seconds: float,
) -> None:
    m, b = result.metrics, baseline.metrics
    head = m["phases"].get("head", {})
    ft = m["phases"].get("fine_tune", {})
    pretrained = "ImageNet" if settings.weights == "imagenet" else "source-task"
    work = Path(settings.workdir)
    lines = [
        "",
        "=" * 72,
        f"xfer demo finished in {seconds / 60:.1f} min",
        "",
        f"  validation accuracy after the head phase   {console.percent(head.get('val_accuracy'))}   ({pretrained} base, frozen)",
        f"  validation accuracy after fine-tuning      {console.percent(ft.get('val_accuracy'))}",
        f"  test accuracy                              {console.percent(result.test_accuracy)}",
        "",
        "  what the pretrained base bought, head phase with the same head and epochs:",
        f"    pretrained frozen base {console.percent(head.get('val_accuracy'))}"
        f" vs random frozen base {console.percent(b['phases'].get('head', {}).get('val_accuracy'))}",
        "",
        f"  run        {result.run_uri}  (metrics.json, predictions/, logs/)",
        f"  model      {result.run_uri}/{MODEL_DIR}/{MODEL_FILE}  (loads with tf_keras alone)",
        f"  published  {model_uri(ROOT, 'shapes')}/{LATEST}"
        if result.published
        else "  published  no (gate not passed)",
        f"  nightly    {scored.output}/  ({scored.rows} images, {scored.errors} errors)",
        f"  report     {report}  (a copy; open it in a browser)",
        f"  full log   {console.log_path()}  (Ray's and TensorFlow's output; --verbose shows it)",
        "",
        f"  look around later: xfer s3-server --data-dir {work / 's3'}  (then paste its exports)",
        f"    aws s3 ls --recursive {result.run_uri}/",
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)
