"""`xfer score`: nightly batch scoring with Ray Data, Parquet predictions in object storage.

    xfer score --model s3://b/xfer/models/pets --input 's3://b/incoming/{date}/' \\
               --output s3://b/xfer/predictions/pets --date 2026-11-27

:func:`write_predictions` runs a night in three stages: plan, score, commit. The plan
(:func:`xfer.scoring.scoreplan.plan_night`, a :class:`xfer.scoring.scorejob.NightPlan`) lists the
input once, page by page, into block lists staged beside the output. An actor pool
(:mod:`xfer.scoring.scorepool`: ``map_batches`` with ``compute=ActorPoolStrategy``) scores
the blocks, each actor given the plan and a :class:`xfer.scoring.scorejob.ScoringJob` (the
model, the settings, the store-outage budget); each actor loads the model once and,
per block, reads, prepares and predicts its images and writes the block's
predictions itself (:mod:`xfer.scoring.scorer`). The driver only sees a one-row summary per
block. When every block is written, ``dt=<date>/`` is replaced whole with
``_SUCCESS`` written last, so a reader never sees a mix of two runs or
half a partition. A bad image becomes a row with an ``error``, never a failed night;
a night that fails part-way resumes where it stopped when started again; a store
outage is ridden out for ``storage.outage_seconds`` (:mod:`xfer.store.retry`). The
training job writes its ``predictions/test.parquet`` through this same code. A night
with no images (an empty or missing folder) commits an empty partition. The nightly
report (:mod:`xfer.reports.nightly`) comes after the commit: failing to write it is a
warning, and running the date again writes it without scoring again.

A bad night never replaces a good partition: reads refused for the whole night
(missing bucket, access denied), error rows over ``score.max_error_fraction`` and
actors that keep dying fail it before the commit; one run at a time holds a night
(:mod:`xfer.scoring.scorelock`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Collection
from dataclasses import dataclass, replace
from typing import Any

from xfer.config import ScoreConfig, XferConfig
from xfer.data.images import MAX_PIXELS
from xfer.registry.layout import ModelRef, resolve_model
from xfer.scoring.nightguard import check_night
from xfer.scoring.predictions import class_columns
from xfer.scoring.scorejob import NightPlan, ScoringJob
from xfer.scoring.scorelock import NightLock, input_for_date, partition_date
from xfer.scoring.scorepool import Attempt, score_blocks
from xfer.store import s3, storage

# ---------------------------------------------------------------- the night


@dataclass
class ScoreResult:
    output: str
    rows: int
    errors: int
    seconds: float
    model: ModelRef
    startup_seconds: float = 0.0  # from the start until the first block was written
    # Start-up: until the first actor began its first block (Ray, the plan, actors,
    # loading the model). Steady: the images of this attempt over the time from then
    # until the last block was written.
    steady_images_per_s: float = 0.0
    blocks: int = 0
    resumed_blocks: int = 0  # done by an earlier attempt at the same night
    report_only: bool = False  # committed before: only its missing report was written
    temperature: float | None = None  # the calibration applied (None: uncalibrated)

    @property
    def images_per_s(self) -> float:
        return self.rows / max(self.seconds, 1e-9)

    def describe(self) -> str:
        model = f"{self.model.model_name or 'model'} run {self.model.run_id}"
        if self.report_only:
            return (
                f"already committed: {self.rows} inputs ({self.errors} with errors) scored with "
                f"{model}; wrote its missing report\n  predictions: {self.output}"
            )
        if not self.rows:
            return f"0 images to score: committed an empty night\n  predictions: {self.output}"
        resumed = (
            f", {self.resumed_blocks} of {self.blocks} blocks kept from an earlier attempt"
            if self.resumed_blocks
            else ""
        )
        return (
            f"scored {self.rows} inputs ({self.errors} with errors) with "
            f"{model} in {self.seconds:.1f}s: "
            f"start-up {self.startup_seconds:.1f}s, then {self.steady_images_per_s:.1f} images/s"
            f"{resumed}\n  predictions: {self.output} ("
            + (
                f"calibrated probabilities, temperature {self.temperature:.3f})"
                if self.temperature is not None
                else "uncalibrated probabilities)"
            )
        )


def write_predictions(
    ref: ModelRef,
    input_uri: str,
    sc: ScoreConfig,
    final: str,
    single_file: str | None = None,
    split: str | None = None,
    quiet: bool = False,
    lock: NightLock | None = None,
    exclude: Collection[str] = (),
) -> ScoreResult:
    """Score ``input_uri`` in blocks on the actor pool; commit at ``final``, marker last.

    ``quiet``: progress and the actors' identity go to the log file only (a step of a
    larger job, such as a training run's test predictions). ``lock``: the night's
    lock, checked to be still ours just before the commit. ``exclude``: keys not scored.

    A night started again for the same partition resumes: blocks already written by
    an earlier attempt are kept (see :mod:`xfer.scoring.scoreplan`).
    """
    from xfer.scoring.scoreplan import commit_night, plan_night

    start = time.monotonic()
    class_columns(ref.classes)  # colliding class columns fail before any work
    plan, resumed = plan_night(
        _identity(ref, sc, exclude),
        input_uri,
        split or sc.split,
        final,
        sc.block_size,
        sc.allow_outside_inputs,
    )
    job = scoring_job(ref, sc, quiet, exclude)
    attempt = Attempt.of(plan, resumed)
    if attempt.todo:
        score_blocks(plan, job, sc, attempt, input_uri)
    check_night(attempt.summaries, input_uri, sc, plan.parts_uri)
    if lock is not None:
        lock.check()
    marker = commit_night(plan, attempt.summaries, _marker(job, input_uri), single_file)
    return _result(attempt, plan, job, marker, start)


def scoring_job(
    ref: ModelRef, sc: ScoreConfig, quiet: bool = False, exclude: Collection[str] = ()
) -> ScoringJob:
    """How the actors score a night with ``ref`` under ``sc``, scored now; they ride
    through store outages as long as this process does (:func:`xfer.store.retry.budget`)."""
    from xfer.store.retry import budget_seconds

    return ScoringJob(
        model=replace(ref, temperature=ref.temperature if sc.calibrated else None),
        scored_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
        batch_size=sc.batch(),
        threads=sc.threads(),
        read_threads=sc.reads(),
        tta=sc.tta,
        quiet=quiet,
        max_pixels=MAX_PIXELS,
        max_object_mb=sc.max_object_mb,
        exclude=tuple(sorted(exclude)),
        outage_seconds=budget_seconds(),
    )


def _identity(ref: ModelRef, sc: ScoreConfig, exclude: Collection[str] = ()) -> dict[str, Any]:
    """What of the model and the settings must match for a night to be the same night:
    what changes its rows. Not ``quiet``: where the lines go changes no row, so a quiet
    and a loud run of a night are the same night (one resumes the other)."""
    identity: dict[str, Any] = {
        "run_id": ref.run_id,
        "max_side": ref.max_side,
        "jpeg_quality": ref.jpeg_quality,
        "image_size": ref.image_size,
        "temperature": ref.temperature if sc.calibrated else None,
        "tta": sc.tta,
        "max_object_mb": sc.max_object_mb,
    }
    if exclude:  # another list of keys left out is another night
        identity["exclude"] = hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()
    return identity


def _marker(job: ScoringJob, input_uri: str) -> dict[str, Any]:
    """What ``_SUCCESS`` says of the night besides its files and counts."""
    return {
        "run_id": job.model.run_id,
        "model_name": job.model.model_name,
        "scored_at": job.scored_at,
        "input": input_uri,
        "classes": job.model.classes,
        # What the files' probabilities are (each part's metadata says it too).
        "probabilities": "calibrated" if job.temperature is not None else "uncalibrated",
        "temperature": job.temperature,
    }


def _result(
    attempt: Attempt, plan: NightPlan, job: ScoringJob, marker: dict[str, Any], start: float
) -> ScoreResult:
    """The night's result, committed as ``marker`` says; ``start``: when it started."""
    end = time.monotonic()
    began, last = attempt.began, attempt.last_done
    steady = last - began if began is not None and last is not None else 0.0
    return ScoreResult(
        output=plan.final,
        rows=marker["rows"],
        errors=marker["errors"],
        seconds=end - start,
        model=job.model,
        startup_seconds=(began or end) - start,
        steady_images_per_s=attempt.rows / steady if steady > 0 else 0.0,
        blocks=plan.blocks,
        resumed_blocks=attempt.resumed_blocks,
        temperature=job.temperature,
    )


def score(
    cfg: XferConfig, model: str, input_uri: str, output: str, date: str | None = None
) -> ScoreResult:
    """Score ``input_uri`` with ``model`` into ``output/dt=<date>/`` (replaced whole)."""
    from xfer.store.retry import budget

    cfg.apply_storage_env()
    with budget(cfg.storage.outage_seconds):  # the scoring job carries it to the actors
        return _score(cfg, model, input_uri, output, date)


def _score(
    cfg: XferConfig, model: str, input_uri: str, output: str, date: str | None
) -> ScoreResult:
    from xfer.reports.nightly import committed_without_report
    from xfer.scoring.scoreplan import night_identity, night_root

    sc = cfg.score
    day = partition_date(date, sc.date_offset_days)
    input_uri = input_for_date(input_uri, day)
    ref = resolve_model(model)
    final = storage.join(output, f"dt={day}")
    s3.ensure_bucket(final)
    with NightLock(night_root(final), sc.lock_stale_minutes * 60) as lock:
        identity = night_identity(_identity(ref, sc), input_uri, sc.split, sc.block_size)
        marker = committed_without_report(final, identity)
        if marker is not None:
            return _report_only(ref, final, marker, lock)
        return _score_night(cfg, ref, input_uri, final, lock)


def _report_only(ref: ModelRef, final: str, marker: dict[str, Any], lock: NightLock) -> ScoreResult:
    """This very night is committed, its report is not: write it, score nothing."""
    from xfer.reports.nightly import report_night
    from xfer.scoring.scoreplan import finish_commit

    start = time.monotonic()
    print(
        f"[xfer] {final} is committed (scored at {marker.get('scored_at')}) but has no "
        "report: writing it, without scoring again",
        flush=True,
    )
    lock.check()
    finish_commit(final, marker)
    report_night(final, ref.classes, ref.run_uri)
    rows, blocks = int(marker["rows"]), int(marker["blocks"])
    return ScoreResult(
        final,
        rows,
        int(marker["errors"]),
        time.monotonic() - start,
        ref,
        blocks=blocks,
        resumed_blocks=blocks,
        report_only=True,
    )


def _score_night(
    cfg: XferConfig, ref: ModelRef, input_uri: str, final: str, lock: NightLock
) -> ScoreResult:
    from xfer.raycluster import check_capacity, ensure_ray, is_local

    sc = cfg.score
    started = ensure_ray(cfg.cluster.address, cfg.cluster.local_num_cpus)
    import ray

    have = ray.cluster_resources()
    actors = sc.actors(have.get("CPU", 1), have.get("GPU", 0))
    check_capacity(
        actors * sc.cpus_per_actor,
        actors * sc.gpus_per_actor if sc.use_gpu else 0,
        "score.num_actors x score.cpus_per_actor / gpus_per_actor, score.use_gpu",
        is_local(started, cfg.cluster.address),
        wait_seconds=sc.resource_wait_seconds,
    )
    result = write_predictions(ref, input_uri, sc, final, lock=lock)
    from xfer.reports.nightly import report_night

    report_night(final, ref.classes, ref.run_uri)  # committed: a failure here is a warning
    return result
