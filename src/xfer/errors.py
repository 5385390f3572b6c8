"""Errors that reach the user as one clear line, not a traceback.

Anything raised as an ``XferError`` is printed by the CLI as one line,
``xfer: error: ...``, and exits with status 2 (:data:`EXIT_USER_ERROR`), except
two kinds that are no fault of the input: :class:`StoreUnavailable` (75, run it again
later) and :class:`JobFailed` (1, the job itself failed). Messages say what went
wrong and where (a URI, a config key, a file), and never contain secrets.
"""

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class XferError(Exception):
    """An error explained in one line; unless a subclass says otherwise, a problem the
    user can fix: bad input, bad config, credentials, a missing dataset or model."""


class JobFailed(XferError):
    """The job itself failed, not its input: a worker that died or raised, actors that
    kept dying, a bug. The CLI exits with :data:`EXIT_JOB_FAILED`; the log file and the
    run's journal say more."""


class ConfigError(XferError):
    """The configuration is invalid: names the key and the file."""


class StorageError(XferError):
    """Object storage or the local filesystem refused or failed an operation."""


class NotFoundError(StorageError):
    """The object or prefix does not exist."""


class DataError(XferError):
    """A dataset is missing, inconsistent or fails a quality check."""


class StoreUnavailable(StorageError):
    """The store did not answer, or answered "try later" (5xx, throttling).

    Transient by nature: retried within a budget (:mod:`xfer.store.retry`). When it
    escapes, the CLI exits with :data:`EXIT_STORE_UNAVAILABLE`, so a scheduler can
    tell "the store was down, run again later" from a bad config or a bug.
    """

    def __init__(self, message: str, endpoint: str = "", reason: str = ""):
        super().__init__(message)
        self.endpoint = endpoint
        self.reason = reason or message

    def __reduce__(self) -> tuple[object, ...]:  # survives pickling across Ray
        return (type(self), (str(self), self.endpoint, self.reason))


EXIT_JOB_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_STORE_UNAVAILABLE = 75  # EX_TEMPFAIL (sysexits.h): try again later


def one_line(message: str) -> str:
    """A message as the single line the CLI prints (its lines joined by "; ")."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def behind(exc: BaseException, kind: type[E]) -> E | None:
    """The first ``kind`` in ``exc`` and the errors behind it: ``__cause__``,
    ``__context__``, the ``cause`` Ray wraps a task's error in, and Ray Train's
    ``worker_failures`` (each worker's own error) and ``controller_failure``."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        stack += [getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        stack += [e.__cause__, e.__context__, *(getattr(e, "worker_failures", None) or {}).values()]
    return None
