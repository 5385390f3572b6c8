"""What a failed ``trainer.fit`` ends `xfer train` with: one line, and the exit status
that says whose move it is (:mod:`xfer.errors`).

- the store stayed away past ``storage.outage_seconds``, on the driver or a worker, or
  past the S3 client's retries in Ray Train's own checkpoint upload:
  :class:`~xfer.errors.StoreUnavailable` (75: run it again later, it resumes);
- a worker's own :class:`~xfer.errors.XferError` (the dataset, the weights or the
  code changed under the run): that error (2: the user can fix it);
- anything else (a worker that died or raised, past ``cluster.max_failures``):
  :class:`~xfer.errors.JobFailed` (1: the job failed).
"""

from __future__ import annotations

from xfer import console
from xfer.errors import JobFailed, StoreUnavailable, XferError, behind, one_line
from xfer.store import s3


def failed_run(exc: BaseException, run_id: str, run_uri: str) -> XferError:
    """The error to raise for ``exc``, naming the run and how to resume it."""
    from xfer.scoring.nightguard import store_unavailable
    from xfer.train.journal import describe_exception

    resume = f"resume with: xfer train --config <same config> output.run_id={run_id}"
    unavailable = store_unavailable(exc) or _checkpoint_upload(exc, run_uri)
    if unavailable is not None:
        return StoreUnavailable(
            f"training run {run_id} stopped: {unavailable}; {resume}",
            endpoint=unavailable.endpoint,
            reason=unavailable.reason,
        )
    fixable = behind(exc, XferError)
    if fixable is not None and not isinstance(fixable, JobFailed):
        return XferError(f"training run {run_id} failed: {one_line(str(fixable))}; {resume}")
    cause = describe_exception(exc).split(". ")[0]  # Ray's advice follows: the log has it
    return JobFailed(
        f"training run {run_id} failed: {cause}; checkpoints are in "
        f"{run_uri}; the workers' output is in {console.log_path()}; {resume}"
    )


def _checkpoint_upload(exc: BaseException, run_uri: str) -> StoreUnavailable | None:
    """Ray Train uploads checkpoints itself (pyarrow), outside xfer's retries: a pyarrow
    error that names a transient S3 reply is the store's too."""
    arrow = behind(exc, OSError)
    if arrow is None:
        return None
    try:
        with s3.translate_errors(run_uri):
            raise arrow
    except StoreUnavailable as unavailable:
        return unavailable
    except Exception:  # not the store's: the job failed
        return None
