"""`train(cfg)`: the driver of a training run, on a Ray cluster or a local Ray.

    xfer train --config jobs/configs/local.yaml train.head.epochs=2

1. Preflight, before any worker starts: the dataset's manifest, classes, weights file,
   the layer to unfreeze from, and the cluster's resources. A bad config fails here,
   with a message naming the problem.
2. A Ray Train ``TensorflowTrainer`` runs :func:`xfer.train.worker.train_loop_per_worker`
   on ``num_workers`` workers under MultiWorkerMirroredStrategy, checkpointing every
   epoch into ``<root>/runs/<run_id>/`` (Ray's ``storage_path``), recovering from up
   to ``cluster.max_failures`` worker failures from the latest checkpoint.
3. The driver scores the test split through the batch-scoring code path, writes
   ``metrics.json``, ``lineage.json``, ``report.html``, then ``_SUCCESS`` last, and
   moves ``models/<name>/latest.json`` only if the quality gate passes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import secrets
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from xfer import __version__, storage
from xfer.config import XferConfig, build_config, merge, resolved_dict
from xfer.errors import ConfigError, DataError, XferError
from xfer.manifest import Manifest, load_manifest

SUCCESS = "_SUCCESS"


@dataclass
class TrainResult:
    run_id: str
    run_uri: str
    metrics: dict[str, Any]
    published: bool

    @property
    def test_accuracy(self) -> float | None:
        return (self.metrics.get("test") or {}).get("accuracy")

    def describe(self) -> str:
        lines = [f"run {self.run_id} complete: {self.run_uri}"]
        for phase, info in self.metrics["phases"].items():
            lines.append(
                f"  {phase:9s} {info['epochs']} epoch(s), val accuracy {_pct(info.get('val_accuracy'))}, "
                f"{info['seconds']:.0f}s, {info['images_per_s']:.1f} images/s"
            )
        if self.test_accuracy is not None:
            lines.append(
                f"  test accuracy {_pct(self.test_accuracy)} on {self.metrics['test']['examples']} images"
            )
        gate = self.metrics["gate"]
        lines.append(
            f"  gate (test accuracy >= {gate['min_test_accuracy']}): "
            + ("passed, published as " + gate["latest"] if self.published else "not published")
        )
        lines.append(f"  report: {self.run_uri}/report.html")
        return "\n".join(lines)


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def apply_storage_env(cfg: XferConfig) -> None:
    """Config values for the S3 endpoint/region become the standard AWS variables."""
    if cfg.storage.endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = cfg.storage.endpoint_url
    if cfg.storage.region:
        os.environ["AWS_REGION"] = cfg.storage.region


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


# --------------------------------------------------------------- preflight


def preflight(cfg: XferConfig) -> Manifest:
    """Everything that can be checked before a worker starts."""
    from xfer.weights import check_weights

    manifest = load_manifest(cfg.dataset_uri())
    if "train" not in manifest.splits or manifest.splits["train"].rows == 0:
        raise DataError(f"dataset {manifest.uri} has no training rows")
    expected = cfg.data.classes
    if expected is not None and list(expected) != manifest.classes:
        raise ConfigError(
            f"data.classes {list(expected)} does not match the dataset's classes {manifest.classes} "
            f"({manifest.uri}/manifest.json)"
        )
    check_weights(cfg.model.weights)
    ft = cfg.train.fine_tune
    if ft.epochs > 0 and ft.unfreeze_from is not None:
        from xfer.model import REGISTRY, unfreeze_top

        base = REGISTRY[cfg.model.base].build(
            (cfg.data.image_size,) * 2 + (3,), None, cfg.model.alpha
        )
        unfreeze_top(base, ft.unfreeze_from, None)  # raises ConfigError naming the layer
    return manifest


def check_resources(cfg: XferConfig, local: bool) -> None:
    import ray

    have = ray.cluster_resources()
    c = cfg.cluster
    need_cpu = c.num_workers * c.cpus_per_worker
    need_gpu = c.num_workers * c.gpus_per_worker if c.use_gpu else 0
    problems = []
    if need_cpu > have.get("CPU", 0):
        problems.append(
            f"{need_cpu:g} CPUs (cluster.num_workers x cluster.cpus_per_worker), the cluster has {have.get('CPU', 0):g}"
        )
    if need_gpu > have.get("GPU", 0):
        problems.append(
            f"{need_gpu:g} GPUs (cluster.use_gpu), the cluster has {have.get('GPU', 0):g}"
        )
    if problems and local:
        raise ConfigError("this machine cannot run the job: it needs " + "; ".join(problems))
    if problems:
        print(
            f"[xfer] warning: waiting for resources (autoscaling?): needs {'; '.join(problems)}",
            flush=True,
        )


def _resume_config(cfg: XferConfig, run_uri: str) -> XferConfig:
    """A resumed run keeps its own data/model/train settings; cluster/output may change."""
    try:
        stored = storage.read_yaml(storage.join(run_uri, "config.yaml"))
    except storage.NotFoundError:
        raise XferError(f"output.run_id: no run at {run_uri} to resume") from None
    now = cfg.model_dump(mode="json")
    keep = {k: now[k] for k in ("cluster", "output", "storage", "fault", "score")}
    return build_config(merge(stored, keep), f"{run_uri}/config.yaml")


# ------------------------------------------------------------------- train


def train(cfg: XferConfig) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from xfer.raycluster import ensure_ray, worker_env
    from xfer.train.worker import train_loop_per_worker

    apply_storage_env(cfg)
    started = time.monotonic()
    if cfg.output.run_id:
        run_id = cfg.output.run_id
        run_uri = cfg.run_uri(run_id)
        if storage.exists(storage.join(run_uri, SUCCESS)):
            raise XferError(
                f"run {run_id} is already complete ({run_uri}/{SUCCESS}); nothing to resume"
            )
        cfg = _resume_config(cfg, run_uri)
        print(f"[xfer] resuming run {run_id}", flush=True)
    else:
        run_id = new_run_id()
        run_uri = cfg.run_uri(run_id)
    manifest = preflight(cfg)
    if storage.is_s3(run_uri):
        storage.ensure_bucket(run_uri)
    if not cfg.output.run_id:
        storage.write_yaml(storage.join(run_uri, "config.yaml"), resolved_dict(cfg))

    feature_cache = None
    if cfg.model.head.features == "cached" and cfg.train.head.epochs > 0:
        from xfer.features import plan_cache
        from xfer.weights import fetch_weights

        plan = plan_cache(cfg, manifest, fetch_weights(cfg.model.weights))
        state = "hit" if not plan.build else f"miss ({plan.reason}): the workers will build it"
        print(f"[xfer] feature cache {plan.key}: {state}", flush=True)
        feature_cache = plan.to_dict()

    started_ray = ensure_ray(cfg.cluster.address, cfg.cluster.local_num_cpus)
    local = started_ray and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS"))
    check_resources(cfg, local)
    c = cfg.cluster
    resources: dict[str, float] = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    if c.memory_per_worker_gb:
        resources["memory"] = c.memory_per_worker_gb * 1024**3
    fs, runs_path = storage.arrow_filesystem(storage.join(cfg.storage.root, "runs"))
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "run_uri": run_uri,
            "feature_cache": feature_cache,
            # Applied first thing on each worker, before TensorFlow is imported.
            "env": worker_env(use_gpu=c.use_gpu),
        },
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=runs_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    print(f"[xfer] run {run_id}: {c.num_workers} worker(s), outputs in {run_uri}", flush=True)
    try:
        result = trainer.fit()
    except Exception as exc:
        raise XferError(
            f"training run {run_id} failed: {_root_cause(exc)}\n  checkpoints are in {run_uri}; "
            f"resume with: xfer train --config <same config> output.run_id={run_id}"
        ) from None
    final = result.metrics or {}
    if not final.get("final"):
        raise XferError(f"training run {run_id} ended without its final report; see the Ray logs")
    return finish_run(cfg, manifest, run_id, run_uri, final, time.monotonic() - started)


def _root_cause(exc: BaseException) -> str:
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ("Error" in ln or "error" in ln) and not ln.startswith("File ")]
    return (errors[-1] if errors else (lines[-1] if lines else type(exc).__name__))[:500]


# ------------------------------------------------------------------ finish


def phase_summary(history: list[dict[str, float]]) -> dict[str, Any]:
    seconds = sum(r["seconds"] for r in history)
    last = history[-1] if history else {}
    return {
        "epochs": len(history),
        "seconds": seconds,
        "images_per_s": (sum(r["images_per_s"] * r["seconds"] for r in history) / seconds)
        if seconds
        else 0.0,
        "loss": last.get("loss"),
        "accuracy": last.get("accuracy"),
        "val_loss": last.get("val_loss"),
        "val_accuracy": last.get("val_accuracy"),
    }


def lineage(cfg: XferConfig, manifest: Manifest, final: dict[str, Any]) -> dict[str, Any]:
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in ("tensorflow", "tf-keras", "ray", "pyarrow", "numpy", "boto3"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    config_text = json.dumps(resolved_dict(cfg), sort_keys=True)
    import hashlib

    return {
        "dataset": {
            "uri": manifest.uri,
            "manifest_checksum": manifest.checksum,
            "name": manifest.name,
        },
        "code": {"xfer": __version__, "git_commit": _git_commit()},
        "packages": {"python": platform.python_version(), **versions},
        "weights": final.get("weights", {"source": cfg.model.weights, "sha256": None}),
        "config_sha256": hashlib.sha256(config_text.encode()).hexdigest(),
    }


def _git_commit() -> str | None:
    if os.environ.get("XFER_GIT_COMMIT"):
        return os.environ["XFER_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=os.path.dirname(__file__),
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def finish_run(
    cfg: XferConfig,
    manifest: Manifest,
    run_id: str,
    run_uri: str,
    final: dict[str, Any],
    wall: float,
) -> TrainResult:
    """Predictions, metrics, lineage, report; ``_SUCCESS`` last; then the gate."""
    from xfer.report import classification_metrics, render_report
    from xfer.score import input_dataset, resolve_model, write_predictions

    history = final["state"]["history"]
    test = dict(final.get("test") or {})
    if cfg.output.predictions and "test" in manifest.splits and manifest.splits["test"].rows:
        import pyarrow.compute as pc

        ref = resolve_model(run_uri, require_committed=False)
        ds, _ = input_dataset(manifest.uri, "test")
        preds_uri = storage.join(run_uri, "predictions")
        write_predictions(ref, ds, cfg.score, preds_uri, single_file="test.parquet")
        table = storage.read_parquet(storage.join(preds_uri, "test.parquet"))
        table = table.filter(pc.is_null(table.column("error")))
        cls = classification_metrics(
            table.column("true_index").to_pylist(),
            table.column("predicted_index").to_pylist(),
            manifest.classes,
        )
        test.update(
            examples=cls["examples"],
            per_class=cls["per_class"],
            confusion_matrix=cls["confusion_matrix"],
        )
        test["accuracy_from_predictions"] = cls["accuracy"]
    gate_value = test.get("accuracy")
    if gate_value is None and history.get("fine_tune"):
        gate_value = history["fine_tune"][-1].get("val_accuracy")
    if gate_value is None and history.get("head"):
        gate_value = history["head"][-1].get("val_accuracy")
    passed = gate_value is not None and gate_value >= cfg.output.gate.min_test_accuracy
    latest_uri = storage.join(cfg.model_uri(), "latest.json")
    metrics: dict[str, Any] = {
        "run_id": run_id,
        "model_name": cfg.output.model_name,
        "dataset": manifest.uri,
        "base": cfg.model.base,
        "classes": manifest.classes,
        "workers": final.get("workers"),
        "replicas": final.get("replicas"),
        "global_batch": cfg.train.batch_size * int(final.get("replicas") or 1),
        "steps_per_epoch": final.get("steps_per_epoch"),
        "mixed_precision": final.get("mixed_precision"),
        "phases": {p: phase_summary(h) for p, h in history.items() if h},
        "history": history,
        "test": test,
        "resumes": final["state"].get("resumes", []),
        "feature_cache": final.get("feature_cache") or None,
        "wall_time_s": wall,
        "gate": {
            "min_test_accuracy": cfg.output.gate.min_test_accuracy,
            "value": gate_value,
            "passed": passed,
            "published": bool(passed and cfg.output.publish),
            "latest": latest_uri,
        },
    }
    lin = lineage(cfg, manifest, final)
    storage.write_json(storage.join(run_uri, "metrics.json"), metrics)
    storage.write_json(storage.join(run_uri, "lineage.json"), lin)
    if cfg.output.report:
        storage.write_bytes(
            storage.join(run_uri, "report.html"), render_report(metrics, lin).encode(), "text/html"
        )
    storage.write_json(
        storage.join(run_uri, SUCCESS),
        {
            "run_id": run_id,
            "completed_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        },
    )
    published = False
    if passed and cfg.output.publish:
        publish(cfg, run_id, run_uri, gate_value)
        published = True
    return TrainResult(run_id, run_uri, metrics, published)


def publish(cfg: XferConfig, run_id: str, run_uri: str, accuracy: float | None) -> None:
    """Point ``models/<name>/latest.json`` at the run (one atomic PUT), keeping history."""
    model_uri = cfg.model_uri()
    latest_uri = storage.join(model_uri, "latest.json")
    previous = storage.read_json(latest_uri) if storage.exists(latest_uri) else None
    now = dt.datetime.now(dt.timezone.utc)
    pointer = {
        "model_name": cfg.output.model_name,
        "run_id": run_id,
        "run_uri": run_uri,
        "model_uri": storage.join(run_uri, "model"),
        "test_accuracy": accuracy,
        "published_at": now.isoformat(timespec="seconds"),
        "previous_run_id": previous.get("run_id") if previous else None,
    }
    storage.write_json(
        storage.join(model_uri, "history", f"{now:%Y%m%dT%H%M%S}-{run_id}.json"), pointer
    )
    storage.write_json(latest_uri, pointer)
