"""`train(cfg)`: the driver of a training run, on a Ray cluster or a local Ray.

    xfer train --config jobs/configs/local.yaml train.head.epochs=2

1. Preflight, before any worker starts: the dataset's manifest, classes, weights file,
   the layer to unfreeze from, and the cluster's resources. A bad config fails here,
   with a message naming the problem.
2. A Ray Train ``TensorflowTrainer`` runs :func:`xfer.train.worker.train_loop_per_worker`
   on ``num_workers`` workers under MultiWorkerMirroredStrategy, checkpointing every
   epoch into ``<root>/runs/<run_id>/`` (Ray's ``storage_path``), recovering from up
   to ``cluster.max_failures`` worker failures from the latest checkpoint.
3. :func:`xfer.train.outputs.finish_run` scores the test split, writes the metrics,
   lineage and report, then ``_SUCCESS`` last, and publishes past the quality gate.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import secrets
import time
from typing import Any

from pydantic import BaseModel

from xfer import console, s3, storage
from xfer.commit import SUCCESS
from xfer.config import XferConfig, build_config, resolved_dict
from xfer.configbase import merge
from xfer.errors import ConfigError, DataError, JobFailed, NotFoundError, XferError
from xfer.exclude import check_same_exclusion, load_exclusion
from xfer.layout import CONFIG, CONSOLE_LOG, is_complete, runs_prefix
from xfer.manifest import Manifest, load_manifest
from xfer.runindex import IndexWriter
from xfer.train.failure import failed_run
from xfer.train.outputs import TrainResult, completed_run, finish_run


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def submission_run_id() -> str | None:
    """Under `ray job submit`, a run id made from the job's submission id.

    A submission id is stable across retries of the same submission (KubeRay's
    submitter re-runs with the RayJob's ``jobId``), so a retried submitter reaches
    the same run: it resumes it, or finds it complete, instead of starting another.
    """
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        submission = json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None
    if not submission:
        return None
    # Names under runs/ that start with "_" or "." are not runs (the run index is one).
    return re.sub(r"[^A-Za-z0-9._-]", "-", str(submission))[:120].lstrip("_.") or None


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
        from xfer.bases import REGISTRY
        from xfer.model import unfreeze_top

        base = REGISTRY[cfg.model.base].build(
            (cfg.data.image_size,) * 2 + (3,), None, cfg.model.alpha
        )
        unfreeze_top(base, ft.unfreeze_from, None)  # raises ConfigError naming the layer
    return manifest


def check_resources(cfg: XferConfig, local: bool) -> None:
    from xfer.raycluster import check_capacity

    c = cfg.cluster
    check_capacity(
        c.num_workers * c.cpus_per_worker,
        c.num_workers * c.gpus_per_worker if c.use_gpu else 0,
        "cluster.num_workers x cluster.cpus_per_worker / gpus_per_worker, cluster.use_gpu",
        local,
    )


# Sections a resumed run takes from the new command line; the others (data, model,
# train) define what is being trained and come from the stored run.
RESUME_FREE = ("cluster", "output", "storage", "fault", "score")
# Settings of data/model/train that a resume may change, and why that is safe.
RESUME_SAFE = {
    "train.verbose": "console output only",
    "data.parallel_reads": "read concurrency only",
    "train.fine_tune.epochs": "more epochs continue the phase",
    "train.head.epochs": "more epochs continue the head phase, while it is not finished",
}


def _resume_config(cfg: XferConfig, run_uri: str) -> tuple[XferConfig, list[str]]:
    """The stored run's data/model/train settings with this command's other sections.

    A data/model/train setting given now (in the file or as an override) that differs
    from the stored run is applied when it is safe (more epochs, verbosity) and said
    so; any other difference is an error naming the keys: a resumed run keeps the
    settings its checkpoints were made with. Returns the config and what changed.
    """
    from xfer.train.journal import last_position

    config_uri = storage.join(run_uri, CONFIG)
    try:
        stored = storage.read_yaml(config_uri)
    except NotFoundError:
        raise XferError(f"output.run_id: no run at {run_uri} to resume") from None
    now = cfg.model_dump(mode="json")
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in explicit_settings(cfg).items():
        if key.split(".")[0] in RESUME_FREE:
            continue
        before = _lookup(stored, key)
        if before != value:
            changed[key] = (before, value)
    refused = [k for k in changed if k not in RESUME_SAFE]
    for key in ("train.head.epochs", "train.fine_tune.epochs"):
        if key in changed and (changed[key][1] or 0) < (changed[key][0] or 0):
            refused.append(key)
    head_epochs = _lookup(stored, "train.head.epochs") or 0
    if "train.head.epochs" in changed and last_position(run_uri) >= head_epochs:
        refused.append("train.head.epochs")
    if refused:
        details = "; ".join(
            f"{k}: {changed[k][0]!r} in the run, {changed[k][1]!r} now"
            for k in sorted(set(refused))
        )
        raise ConfigError(
            f"output.run_id={run_uri.rsplit('/', 1)[-1]}: settings differ from the run's own "
            f"({config_uri}): {details}. A resumed run keeps the settings it was started with "
            "(only more epochs of an unfinished phase, train.verbose and data.parallel_reads may "
            "change): drop these overrides, or start a new run"
        )
    keep = {k: now[k] for k in RESUME_FREE}
    merged = merge(stored, keep)
    notes = []
    for key, (before, after) in sorted(changed.items()):
        _assign(merged, key, after)
        notes.append(f"{key}: {before!r} -> {after!r} ({RESUME_SAFE[key]})")
    resumed = build_config(merged, config_uri)
    if notes:
        print("[xfer] applying to the resumed run: " + "; ".join(notes), flush=True)
        storage.write_yaml(config_uri, resolved_dict(resumed))
    return resumed, notes


def check_same_dataset(run_uri: str, manifest: Manifest) -> None:
    """A resumed run continues on the dataset it started on (its manifest checksum)."""
    from xfer.train.journal import recorded_dataset

    started = recorded_dataset(run_uri)
    if started is None or started.get("manifest_checksum") == manifest.checksum:
        return
    raise DataError(
        f"output.run_id={storage.basename(run_uri)}: the dataset {manifest.uri} changed since "
        f"the run started (manifest checksum {str(started.get('manifest_checksum'))[:12]} then, "
        f"{manifest.checksum[:12]} now): a resumed run trains on the data it started with; "
        "restore that dataset or start a new run"
    )


def explicit_settings(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The settings given explicitly (file or overrides), not defaults, as JSON values."""
    out: dict[str, Any] = {}
    dumped = model.model_dump(mode="json")
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(explicit_settings(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = dumped[name]
    return out


def _lookup(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _assign(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


# ------------------------------------------------------------------- train


def train(cfg: XferConfig) -> TrainResult:
    """Run (or resume) a training run, riding out a store that is away for
    ``storage.outage_seconds`` here and on every worker (:mod:`xfer.retry`)."""
    from xfer.retry import budget

    cfg.apply_storage_env()
    with budget(cfg.storage.outage_seconds):  # worker_env forwards it to every worker
        return _train(cfg)


def _train(cfg: XferConfig) -> TrainResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from xfer.provenance import code_identity, describe
    from xfer.raycluster import ensure_ray, is_local, max_failures, worker_env
    from xfer.train.journal import (
        FailureRecorder,
        describe_exception,
        enter_outputs,
        record_dataset,
        record_error,
        record_start,
    )
    from xfer.train.worker import train_loop_per_worker
    from xfer.weights import fetch_weights

    started = time.monotonic()
    # Worker failures to recover from; a dashboard (http) address is refused here.
    recover = max_failures(cfg.cluster)
    resume_notes: list[str] = []
    submitted = None if cfg.output.run_id else submission_run_id()
    run_id = cfg.output.run_id or submitted or new_run_id()
    run_uri = cfg.run_uri(run_id)
    resuming = bool(cfg.output.run_id) or (
        submitted is not None and storage.exists(storage.join(run_uri, CONFIG))
    )
    if resuming:
        if is_complete(run_uri):
            if submitted:  # the same submission again (a retried submitter): done already
                print(f"[xfer] run {run_id} of this submission is already complete", flush=True)
                return completed_run(run_id, run_uri)
            raise XferError(
                f"run {run_id} is already complete ({run_uri}/{SUCCESS}); nothing to resume"
            )
        cfg, resume_notes = _resume_config(cfg, run_uri)
        print(f"[xfer] resuming run {run_id}", flush=True)
    manifest = preflight(cfg)
    exclusion = load_exclusion(cfg.data.exclude, manifest)  # data.exclude: read once, here
    if resuming:
        check_same_dataset(run_uri, manifest)
        check_same_exclusion(run_uri, exclusion)
    s3.ensure_bucket(run_uri)
    if not resuming:
        storage.write_yaml(storage.join(run_uri, CONFIG), resolved_dict(cfg))
    # Resolved once here; every worker checks that it loads exactly these bytes.
    weights = fetch_weights(cfg.model.weights)

    feature_cache = None
    if cfg.model.head.features == "cached" and cfg.train.head.epochs > 0:
        from xfer.features import plan_cache

        plan = plan_cache(cfg, manifest, weights, build_id=run_id)
        state = "hit" if not plan.build else f"miss ({plan.reason}): the workers will build it"
        print(f"[xfer] feature cache {plan.key}: {state}", flush=True)
        feature_cache = plan.to_dict()

    identity = code_identity()

    def say(line: str) -> None:  # train.verbose 0: the log file's only
        if cfg.train.verbose > 0:
            print(line, flush=True)
        else:
            console.detail(line)

    say(f"[xfer] driver: {describe(identity)}")
    started_ray = ensure_ray(cfg.cluster.address, cfg.cluster.local_num_cpus)
    check_resources(cfg, is_local(started_ray, cfg.cluster.address))
    if not resuming:  # past every check: a config refused up to here leaves no run
        record_dataset(run_uri, manifest.uri, manifest.checksum, exclusion)
    record_start(run_uri, resuming, recover)  # when it started (or resumed), for xfer runs
    index = IndexWriter(cfg, run_id, run_uri)  # xfer runs list's cache of the run's state
    index.started()
    c = cfg.cluster
    resources: dict[str, float] = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    if c.memory_per_worker_gb:
        resources["memory"] = c.memory_per_worker_gb * 1024**3
    fs, runs_path = s3.arrow_filesystem(runs_prefix(cfg.storage.root))
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),
            "run_uri": run_uri,
            "feature_cache": feature_cache,
            "exclude": exclusion.to_dict() if exclusion else None,
            "weights_sha256": weights.sha256,
            "code": identity,  # every worker checks it runs this very code
            # Tells the journal a Ray Train restart (same driver) from a resume by id.
            "driver": secrets.token_hex(8),
            # Applied first thing on each worker, before TensorFlow is imported
            # (XFER_STORE_RETRY_SECONDS included: the budget set above).
            "env": worker_env(use_gpu=c.use_gpu),
        },
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_id,
            storage_path=runs_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=recover),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[FailureRecorder(run_uri)],  # type: ignore[list-item]
        ),
    )
    say(
        f"[xfer] run {run_id}: {c.num_workers} worker(s), cluster.max_failures={recover}, "
        f"outputs in {run_uri}"
    )
    log_start = console.log_size()
    log_uri = storage.join(run_uri, CONSOLE_LOG)
    log_kept = False

    def keep_log() -> None:
        nonlocal log_kept
        console.keep_log(log_uri, since=log_start)
        log_kept = True

    try:
        try:
            result = trainer.fit()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the run stops, and says so
            record_error(run_uri, None, "stopped by the user (Ctrl-C or SIGTERM)")
            index.failed()
            raise
        except Exception as exc:
            record_error(run_uri, None, describe_exception(exc))
            index.failed()
            raise failed_run(exc, run_id, run_uri) from None
        final = result.metrics or {}
        if not final.get("final"):
            raise JobFailed(
                f"training run {run_id} ended without its final report; "
                f"see the workers' output in {console.log_path()}"
            )
        enter_outputs(run_uri)
        try:
            done = finish_run(
                cfg,
                manifest,
                run_id,
                run_uri,
                final,
                time.monotonic() - started,
                resume_notes,
                before_commit=keep_log,  # the log is in the run before its _SUCCESS
                exclusion=exclusion,
            )
        except Exception as exc:
            record_error(run_uri, None, describe_exception(exc))
            index.failed()
            raise
        index.committed(done.metrics)
        return done
    finally:
        if not log_kept:  # a run that did not commit keeps its log too
            keep_log()
