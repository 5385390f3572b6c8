"""`xfer score`: nightly batch scoring with Ray Data, Parquet predictions in object storage.

    xfer score --model s3://b/xfer/models/pets --input 's3://b/incoming/{date}/' \\
               --output s3://b/xfer/predictions/pets --date 2026-11-27

A night is a plan of blocks (:mod:`xfer.scoreplan`): the input is listed once, page
by page, into block lists staged beside the output. An actor pool
(``map_batches`` with ``compute=ActorPoolStrategy``) scores the blocks; each actor
loads the model once and, per block, reads, prepares and predicts its images and
writes the block's predictions itself (:mod:`xfer.scorer`). The driver only sees a
one-row summary per block. When every block is written, ``dt=<date>/`` is replaced
whole with ``_SUCCESS`` written last, so a reader never sees a mix of two runs or
half a partition. A bad image becomes a row with an ``error``, never a failed night;
a night that fails part-way resumes where it stopped when started again; a store
outage is ridden out for ``storage.outage_seconds`` (:mod:`xfer.retry`). The
training job writes its ``predictions/test.parquet`` through this same code. A night
with no images (an empty or missing folder) commits an empty partition. The nightly
report (:mod:`xfer.nightly`) comes after the commit: failing to write it is a
warning, and running the date again writes it without scoring again.

A bad night never replaces a good partition: reads refused for the whole night
(missing bucket, access denied), error rows over ``score.max_error_fraction`` and
actors that keep dying fail it before the commit; one run at a time holds a night
(:mod:`xfer.scorelock`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from xfer import s3, storage
from xfer.config import ScoreConfig, XferConfig
from xfer.errors import XferError
from xfer.images import MAX_PIXELS
from xfer.layout import ModelRef, resolve_model
from xfer.nightguard import actor_died, check_night, store_unavailable
from xfer.scorelock import NightLock, input_for_date, partition_date

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
    an earlier attempt are kept (see :mod:`xfer.scoreplan`).
    """
    import ray
    import ray.data

    from xfer.scoreplan import class_columns, commit_night, done_blocks, plan_night

    start = time.monotonic()
    class_columns(ref.classes)  # colliding class columns fail before any work
    tag = "[xfer-detail]" if quiet else "[xfer]"
    identity = _identity(ref, sc, quiet)
    if exclude:  # another list of keys left out is another night
        identity["exclude"] = hashlib.sha256("\n".join(sorted(exclude)).encode()).hexdigest()
    night, resumed = plan_night(
        identity,
        input_uri,
        split or sc.split,
        final,
        sc.block_size,
        sc.allow_outside_inputs,
    )
    done = done_blocks(night)
    todo = [b for b in range(night["blocks"]) if b not in done]
    if resumed:
        print(
            f"[xfer] resuming the night staged at {night['parts_uri']} (attempt "
            f"{night['attempt']}): {len(done)} of {night['blocks']} blocks already scored",
            flush=True,
        )
    summaries: dict[int, dict[str, Any]] = {b: {"file": f} for b, f in done.items()}
    if done:
        summaries.update(_summaries_of(night, done))
    resources = ray.cluster_resources()
    actors = min(sc.actors(resources.get("CPU", 1), resources.get("GPU", 0)), max(1, len(todo)))
    scored_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
    work = {
        **night,
        "classes": ref.classes,
        "model_uri": ref.model_uri,
        "model_name": ref.model_name,
        "run_id": ref.run_id,
        "image_size": ref.image_size,
        "max_side": ref.max_side,
        "jpeg_quality": ref.jpeg_quality,
        "temperature": ref.temperature if sc.calibrated else None,
        "max_pixels": MAX_PIXELS,
        "batch_size": sc.batch(),
        "threads": sc.threads(),
        "read_threads": sc.reads(),
        "tta": sc.tta,
        "scored_at": scored_at,
        "max_object_mb": sc.max_object_mb,
        "exclude": sorted(exclude),
    }
    began = last_done = None
    rows_now = 0
    if todo:
        blocks = ray.data.from_items([{"block": b} for b in todo], override_num_blocks=len(todo))
        with warnings.catch_warnings():  # Ray 2.60 names no max_restarts option yet
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            scored = _scoring_stage(blocks, work, sc, actors)
        every = max(1, len(todo) // 20)
        # A failed block is reported below, as one line when the store was down;
        # Ray Data's own copy of the user-code stack trace would bury it.
        logging.getLogger("ray.data.exceptions").setLevel(logging.CRITICAL)
        try:
            for n, row in enumerate(scored.iter_rows(), start=1):
                if row.get("refused"):
                    raise XferError(
                        f"--input {input_uri}: cannot read {row['refused']}; nothing "
                        "committed, the previous partition stays"
                    )
                summaries[int(row["block"])] = dict(row)
                last_done = time.monotonic()
                rows_now += int(row["rows"])
                if began is None:
                    began = last_done - float(row["seconds"])
                if n % every == 0 or n == len(todo):
                    rate = rows_now / max(last_done - began, 1e-9)
                    left = night["rows"] - sum(int(s.get("rows", 0)) for s in summaries.values())
                    print(
                        f"{tag} scored {n}/{len(todo)} blocks, {rows_now} images this attempt, "
                        f"{rate:.0f} images/s, about {left / max(rate, 1e-9):.0f}s left",
                        flush=True,
                    )
        except Exception as exc:
            unavailable = store_unavailable(exc)
            if unavailable is not None:
                raise unavailable from None
            died = None if isinstance(exc, XferError) else actor_died(exc, sc.max_actor_restarts)
            if died is not None:
                raise died from None
            raise
    check_night(summaries, input_uri, sc, night["parts_uri"])
    if lock is not None:
        lock.check()
    marker = commit_night(
        night,
        summaries,
        {
            "run_id": ref.run_id,
            "model_name": ref.model_name,
            "scored_at": scored_at,
            "input": input_uri,
            "classes": ref.classes,
            # What the files' probabilities are (each part's metadata says it too).
            "probabilities": "calibrated" if work["temperature"] is not None else "uncalibrated",
            "temperature": work["temperature"],
        },
        single_file=single_file,
    )
    end = time.monotonic()
    steady = last_done - began if began is not None and last_done is not None else 0.0
    return ScoreResult(
        output=final,
        rows=marker["rows"],
        errors=marker["errors"],
        seconds=end - start,
        model=ref,
        startup_seconds=(began or end) - start,
        steady_images_per_s=rows_now / steady if steady > 0 else 0.0,
        blocks=night["blocks"],
        resumed_blocks=len(done),
        temperature=work["temperature"],
    )


def _identity(ref: ModelRef, sc: ScoreConfig, quiet: bool = False) -> dict[str, Any]:
    """What of the model and the settings must match for a night to be the same night."""
    return {
        "run_id": ref.run_id,
        "max_side": ref.max_side,
        "jpeg_quality": ref.jpeg_quality,
        "image_size": ref.image_size,
        "temperature": ref.temperature if sc.calibrated else None,
        "tta": sc.tta,
        "quiet": quiet,
        "max_object_mb": sc.max_object_mb,
    }


def _scoring_stage(blocks: Any, work: dict[str, Any], sc: ScoreConfig, actors: int) -> Any:
    """The actor pool over block numbers (STYLE: Ray's shape)."""
    import ray.data

    from xfer.provenance import code_identity
    from xfer.raycluster import runtime_env
    from xfer.scorer import BlockScorer

    return blocks.map_batches(
        BlockScorer,
        fn_constructor_kwargs={"night": work, "code": code_identity()},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=sc.cpus_per_actor,
        num_gpus=sc.gpus_per_actor if sc.use_gpu else 0,
        runtime_env=runtime_env(use_gpu=sc.use_gpu),
        # Finite: Ray Data's defaults restart a killed actor and retry its block for
        # ever, so an input that kills its actor would spin the night for ever.
        max_restarts=sc.max_actor_restarts,
        max_task_retries=sc.max_actor_restarts,
    )


def _summaries_of(night: dict[str, Any], done: dict[int, str]) -> dict[int, dict[str, Any]]:
    """Row and error counts of blocks an earlier attempt wrote (from Parquet footers)."""
    out = {}
    for block, name in done.items():
        meta = storage.parquet_metadata(storage.join(night["parts_uri"], name))
        error_col = meta.schema.names.index("error")
        errors = meta.num_rows - sum(
            meta.row_group(g).column(error_col).statistics.null_count
            for g in range(meta.num_row_groups)
        )
        out[block] = {"block": block, "rows": meta.num_rows, "errors": errors, "file": name}
    return out


def score(
    cfg: XferConfig, model: str, input_uri: str, output: str, date: str | None = None
) -> ScoreResult:
    """Score ``input_uri`` with ``model`` into ``output/dt=<date>/`` (replaced whole)."""
    from xfer.retry import budget

    cfg.apply_storage_env()
    with budget(cfg.storage.outage_seconds):  # the actors get it through their env
        return _score(cfg, model, input_uri, output, date)


def _score(
    cfg: XferConfig, model: str, input_uri: str, output: str, date: str | None
) -> ScoreResult:
    from xfer.nightly import committed_without_report
    from xfer.scoreplan import night_identity, night_root

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
    from xfer.nightly import report_night
    from xfer.scoreplan import finish_commit

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
    from xfer.nightly import report_night

    report_night(final, ref.classes, ref.run_uri)  # committed: a failure here is a warning
    return result
