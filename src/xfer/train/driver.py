"""`train(cfg)`: the driver of a training run, on a Ray cluster or a local Ray.

    xfer train --config jobs/configs/local.yaml train.head.epochs=2

0. Resolve the run: a new id, or a run resumed by id (``output.run_id``, or a retried
   ``ray job submit``) with its stored settings (:mod:`xfer.configresume`).
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
from dataclasses import dataclass
from typing import Any

from xfer import console
from xfer.config import XferConfig, resolved_dict
from xfer.data.exclude import Exclusion, check_same_exclusion, load_exclusion
from xfer.data.manifest import Manifest, load_manifest
from xfer.errors import ConfigError, DataError, JobFailed, XferError
from xfer.models.weights import WeightsSource
from xfer.registry.layout import CONFIG, CONSOLE_LOG, is_complete, runs_prefix
from xfer.registry.runindex import IndexWriter
from xfer.store import s3, storage
from xfer.store.commit import SUCCESS
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
    from xfer.models.weights import check_weights

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
        from xfer.models.model import unfreeze_top, untrained_base

        base = untrained_base(cfg.model, cfg.data.image_size)
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


# ------------------------------------------------------------------- train


@dataclass(frozen=True)
class RunPlan:
    """Which run this command trains: a new one, or one resumed by id (its stored
    settings in ``cfg``, what the command changed in ``resume_notes``)."""

    cfg: XferConfig
    run_id: str
    run_uri: str
    resuming: bool
    resume_notes: list[str]


@dataclass(frozen=True)
class Preflight:
    """What the checks before any worker found: the data, the weights, the feature cache."""

    manifest: Manifest
    exclusion: Exclusion | None  # data.exclude, read once, here
    weights: WeightsSource  # every worker checks that it loads exactly these bytes
    feature_cache: dict[str, Any] | None  # the plan of xfer.data.features, for the workers


def train(cfg: XferConfig) -> TrainResult:
    """Run (or resume) a training run, riding out a store that is away for
    ``storage.outage_seconds`` here (:mod:`xfer.store.retry`); each worker applies the same
    budget from its copy of the config (:mod:`xfer.train.worker`)."""
    from xfer.store.retry import budget

    cfg.apply_storage_env()
    with budget(cfg.storage.outage_seconds):
        return _train(cfg)


def _train(cfg: XferConfig) -> TrainResult:
    """Resolve the run, preflight, train on Ray, finish (outputs, gate, ``_SUCCESS``)."""
    from xfer.raycluster import max_failures

    started = time.monotonic()
    # Worker failures to recover from; a dashboard (http) address is refused here.
    recover = max_failures(cfg.cluster)
    run = resolve_run(cfg)
    if isinstance(run, TrainResult):
        return run
    checked = _preflight_run(run)
    trainer, index = _launch(run, checked, recover)
    return _fit_and_finish(run, checked, trainer, index, started)


def resolve_run(cfg: XferConfig) -> RunPlan | TrainResult:
    """The run's id (``output.run_id``, the submission's, or a new one) and, for a run
    that exists, its stored settings; a complete run of this submission as it is."""
    from xfer.configresume import resume_config
    from xfer.train.journal import last_position

    submitted = None if cfg.output.run_id else submission_run_id()
    run_id = cfg.output.run_id or submitted or new_run_id()
    run_uri = cfg.run_uri(run_id)
    resuming = bool(cfg.output.run_id) or (
        submitted is not None and storage.exists(storage.join(run_uri, CONFIG))
    )
    if not resuming:
        return RunPlan(cfg, run_id, run_uri, resuming=False, resume_notes=[])
    if is_complete(run_uri):
        if submitted:  # the same submission again (a retried submitter): done already
            print(f"[xfer] run {run_id} of this submission is already complete", flush=True)
            return completed_run(run_id, run_uri)
        raise XferError(
            f"run {run_id} is already complete ({run_uri}/{SUCCESS}); nothing to resume"
        )
    cfg, notes = resume_config(cfg, run_uri, epochs_done=lambda: last_position(run_uri))
    print(f"[xfer] resuming run {run_id}", flush=True)
    return RunPlan(cfg, run_id, run_uri, resuming=True, resume_notes=notes)


def _preflight_run(run: RunPlan) -> Preflight:
    """:func:`preflight`, the same data as before for a resumed run, the run's config
    written (a new run), the weights resolved and the feature cache planned."""
    from xfer.models.weights import fetch_weights

    cfg, run_uri = run.cfg, run.run_uri
    manifest = preflight(cfg)
    exclusion = load_exclusion(cfg.data.exclude, manifest)
    if run.resuming:
        check_same_dataset(run_uri, manifest)
        check_same_exclusion(run_uri, exclusion)
    s3.ensure_bucket(run_uri)
    if not run.resuming:
        storage.write_yaml(storage.join(run_uri, CONFIG), resolved_dict(cfg))
    weights = fetch_weights(cfg.model.weights)
    feature_cache = None
    if cfg.model.head.features == "cached" and cfg.train.head.epochs > 0:
        from xfer.data.features import plan_cache

        plan = plan_cache(cfg, manifest, weights, build_id=run.run_id)
        state = "hit" if not plan.build else f"miss ({plan.reason}): the workers will build it"
        print(f"[xfer] feature cache {plan.key}: {state}", flush=True)
        feature_cache = plan.to_dict()
    return Preflight(manifest, exclusion, weights, feature_cache)


def _say(cfg: XferConfig, line: str) -> None:
    """The driver's console line (with ``train.verbose: 0``, the log file's only)."""
    if cfg.train.verbose > 0:
        print(line, flush=True)
    else:
        console.detail(line)


def _launch(run: RunPlan, checked: Preflight, recover: int) -> tuple[Any, IndexWriter]:
    """Ray up and big enough, the run's start in its journal and index, the trainer."""
    from xfer.raycluster import ensure_ray, is_local
    from xfer.registry.provenance import code_identity, describe
    from xfer.train.journal import record_dataset, record_start

    cfg, run_uri = run.cfg, run.run_uri
    identity = code_identity()
    _say(cfg, f"[xfer] driver: {describe(identity)}")
    started_ray = ensure_ray(cfg.cluster.address, cfg.cluster.local_num_cpus)
    check_resources(cfg, is_local(started_ray, cfg.cluster.address))
    if not run.resuming:  # past every check: a config refused up to here leaves no run
        manifest = checked.manifest
        record_dataset(run_uri, manifest.uri, manifest.checksum, checked.exclusion)
    record_start(run_uri, run.resuming, recover)  # when it started (or resumed), for xfer runs
    index = IndexWriter(cfg, run.run_id, run_uri)  # xfer runs list's cache of the run's state
    index.started()
    trainer = _trainer(run, checked, recover, identity)
    _say(
        cfg,
        f"[xfer] run {run.run_id}: {cfg.cluster.num_workers} worker(s), "
        f"cluster.max_failures={recover}, outputs in {run_uri}",
    )
    return trainer, index


def _trainer(run: RunPlan, checked: Preflight, recover: int, identity: dict[str, Any]) -> Any:
    """Ray Train's ``TensorflowTrainer``: the workers, their resources, checkpoints
    under ``<root>/runs/<run_id>/``, recovery from ``recover`` worker failures."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    from xfer.raycluster import worker_env
    from xfer.train.journal import FailureRecorder
    from xfer.train.worker import train_loop_per_worker

    cfg, c = run.cfg, run.cfg.cluster
    resources: dict[str, float] = {"CPU": c.cpus_per_worker}
    if c.use_gpu:
        resources["GPU"] = c.gpus_per_worker
    if c.memory_per_worker_gb:
        resources["memory"] = c.memory_per_worker_gb * 1024**3
    fs, runs_path = s3.arrow_filesystem(runs_prefix(cfg.storage.root))
    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg.model_dump(mode="json"),  # storage.outage_seconds included
            "run_uri": run.run_uri,
            "feature_cache": checked.feature_cache,
            "exclude": checked.exclusion.to_dict() if checked.exclusion else None,
            "weights_sha256": checked.weights.sha256,
            "code": identity,  # every worker checks it runs this very code
            # Tells the journal a Ray Train restart (same driver) from a resume by id.
            "driver": secrets.token_hex(8),
            # Applied first thing on each worker, before TensorFlow is imported.
            "env": worker_env(use_gpu=c.use_gpu),
        },
        scaling_config=ScalingConfig(
            num_workers=c.num_workers, use_gpu=c.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run.run_id,
            storage_path=runs_path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=recover),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[FailureRecorder(run.run_uri)],  # type: ignore[list-item]
        ),
    )


def _fit_and_finish(
    run: RunPlan, checked: Preflight, trainer: Any, index: IndexWriter, started: float
) -> TrainResult:
    """``trainer.fit()``, then the run's outputs (:func:`finish_run`); any failure is
    journalled and marks the run failed in the index. The console log is kept in the
    run in every case, before ``_SUCCESS`` when it commits."""
    from xfer.train.journal import describe_exception, enter_outputs, record_error

    run_id, run_uri = run.run_id, run.run_uri
    log_start = console.log_size()
    log_kept = False

    def keep_log() -> None:
        nonlocal log_kept
        console.keep_log(storage.join(run_uri, CONSOLE_LOG), since=log_start)
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
                run.cfg,
                checked.manifest,
                run_id,
                run_uri,
                final,
                time.monotonic() - started,
                run.resume_notes,
                before_commit=keep_log,  # the log is in the run before its _SUCCESS
                exclusion=checked.exclusion,
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
