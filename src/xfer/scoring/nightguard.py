"""Why a night of scoring stops before its commit, so a good partition stays whole.

- :func:`store_unavailable`: the store stayed down past its budget (exit 75);
- :func:`actor_died`: scoring actors kept dying (killed from outside, out of memory)
  past ``score.max_actor_restarts``;
- :func:`check_night`: more error rows than ``score.max_error_fraction``.

Reads refused for the whole night (a missing bucket, access denied) are caught where
they happen (:class:`xfer.scoring.scorer.InputRefused`).
"""

from __future__ import annotations

import re
from typing import Any

from xfer.configsections import ScoreConfig
from xfer.errors import DataError, JobFailed, StoreUnavailable, behind


def store_unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The StoreUnavailable behind an error raised through Ray (actor, task, worker)."""
    found = behind(exc, StoreUnavailable)
    if found is not None:
        return StoreUnavailable(str(found).splitlines()[0], found.endpoint, found.reason)
    match = re.search(r"StoreUnavailable: (.+)", str(exc))
    return StoreUnavailable(match.group(1).strip()) if match else None


def actor_died(exc: BaseException, restarts: int) -> JobFailed | None:
    """A clear error for a night whose actors kept dying (killed: memory, an input):
    the job failed (exit 1), as a training run whose workers do."""
    from ray.exceptions import RayActorError

    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and e not in seen:
        seen.append(e)
        if isinstance(e, RayActorError) or "ActorDiedError" in type(e).__name__:
            break
        e = e.__cause__ or e.__context__
    else:
        if "ActorDiedError" not in str(exc) and "actor died" not in str(exc).lower():
            return None
    return JobFailed(
        f"scoring actors kept dying (restarted up to score.max_actor_restarts={restarts} "
        "times, each block retried as often): killed from outside, or out of memory (see "
        "score.batch_size, score.max_object_mb); nothing committed, the previous "
        "partition stays"
    )


def check_night(
    summaries: dict[int, dict[str, Any]], input_uri: str, sc: ScoreConfig, parts: str
) -> None:
    """Refuse to commit a night too broken to replace what is there (error rows)."""
    rows = sum(int(s.get("rows", 0)) for s in summaries.values())
    errors = sum(int(s.get("errors", 0)) for s in summaries.values())
    if rows and errors / rows > sc.max_error_fraction:
        raise DataError(
            f"--input {input_uri}: {errors} of {rows} inputs ({errors / rows:.0%}) could not "
            f"be scored, over score.max_error_fraction ({sc.max_error_fraction:.0%}); nothing "
            f"committed, the previous partition stays (the night stays staged at {parts}: "
            "run again with a higher limit to commit it)"
        )
