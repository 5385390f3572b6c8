"""The score stage of a night: its blocks to do, scored on an actor pool.

:meth:`Attempt.of` keeps the blocks an earlier attempt at the night wrote (their
counts read from the parts' Parquet footers) and lists the rest; :func:`score_blocks`
runs one :class:`xfer.scoring.scorer.BlockScorer` per actor over them (``map_batches`` with
``compute=ActorPoolStrategy``), each actor given the :class:`xfer.scoring.scorejob.ScoringJob`
and the :class:`xfer.scoring.scorejob.NightPlan`, and gathers the one-row summary of each
block with the attempt's pace and progress lines. A store outage past its budget
and actors that keep dying become one clear error each (:mod:`xfer.scoring.nightguard`).
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

from xfer.config import ScoreConfig
from xfer.errors import XferError
from xfer.scoring.nightguard import actor_died, store_unavailable
from xfer.scoring.predictions import ERROR
from xfer.scoring.scorejob import NightPlan, ScoringJob
from xfer.store import storage


@dataclass
class Attempt:
    """This attempt at a night: the blocks' summaries (kept and new) and its pace."""

    todo: list[int]
    summaries: dict[int, dict[str, Any]]
    resumed_blocks: int
    rows: int = 0  # images scored by this attempt
    began: float | None = None  # when the first block of this attempt began
    last_done: float | None = None

    @classmethod
    def of(cls, plan: NightPlan, resumed: bool) -> Attempt:
        """The blocks an earlier attempt left done are kept; the rest are to do."""
        from xfer.scoring.scoreplan import done_blocks

        done = done_blocks(plan)
        if resumed:
            print(
                f"[xfer] resuming the night staged at {plan.parts_uri} (attempt "
                f"{plan.attempt}): {len(done)} of {plan.blocks} blocks already scored",
                flush=True,
            )
        summaries = _summaries_of(plan, done) if done else {}
        todo = [b for b in range(plan.blocks) if b not in done]
        return cls(todo, summaries, len(done))

    def record(self, row: dict[str, Any]) -> None:
        self.summaries[int(row["block"])] = dict(row)
        self.last_done = time.monotonic()
        self.rows += int(row["rows"])
        if self.began is None:
            self.began = self.last_done - float(row["seconds"])

    def progress(self, n: int, total_rows: int) -> str:
        """The progress line after ``n`` blocks of this attempt."""
        now = self.last_done or time.monotonic()
        rate = self.rows / max(now - (self.began or now), 1e-9)
        left = total_rows - sum(int(s.get("rows", 0)) for s in self.summaries.values())
        return (
            f"scored {n}/{len(self.todo)} blocks, {self.rows} images this attempt, "
            f"{rate:.0f} images/s, about {left / max(rate, 1e-9):.0f}s left"
        )


def score_blocks(
    plan: NightPlan, job: ScoringJob, sc: ScoreConfig, attempt: Attempt, input_uri: str
) -> None:
    """The blocks to do, scored on the actor pool; each summary into ``attempt``."""
    import ray
    import ray.data

    resources = ray.cluster_resources()
    actors = min(sc.actors(resources.get("CPU", 1), resources.get("GPU", 0)), len(attempt.todo))
    todo = attempt.todo
    blocks = ray.data.from_items([{"block": b} for b in todo], override_num_blocks=len(todo))
    with warnings.catch_warnings():  # Ray 2.60 names no max_restarts option yet
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        scored = _scoring_stage(blocks, job, plan, sc, actors)
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
            attempt.record(row)
            if n % every == 0 or n == len(todo):
                print(f"{job.tag} {attempt.progress(n, plan.rows)}", flush=True)
    except Exception as exc:
        unavailable = store_unavailable(exc)
        if unavailable is not None:
            raise unavailable from None
        died = None if isinstance(exc, XferError) else actor_died(exc, sc.max_actor_restarts)
        if died is not None:
            raise died from None
        raise


def _scoring_stage(
    blocks: Any, job: ScoringJob, plan: NightPlan, sc: ScoreConfig, actors: int
) -> Any:
    """The actor pool over block numbers: one :class:`xfer.scoring.scorer.BlockScorer` per
    actor, each given the job and the plan (it applies the job's outage budget)."""
    import ray.data

    from xfer.raycluster import runtime_env
    from xfer.registry.provenance import code_identity
    from xfer.scoring.scorer import BlockScorer

    return blocks.map_batches(
        BlockScorer,
        fn_constructor_kwargs={"job": job, "plan": plan, "code": code_identity()},
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


def _summaries_of(plan: NightPlan, done: dict[int, str]) -> dict[int, dict[str, Any]]:
    """Row and error counts of blocks an earlier attempt wrote (from Parquet footers)."""
    out = {}
    for block, name in done.items():
        meta = storage.parquet_metadata(storage.join(plan.parts_uri, name))
        error_col = meta.schema.names.index(ERROR)
        errors = meta.num_rows - sum(
            meta.row_group(g).column(error_col).statistics.null_count
            for g in range(meta.num_row_groups)
        )
        out[block] = {"block": block, "rows": meta.num_rows, "errors": errors, "file": name}
    return out
