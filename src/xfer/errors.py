"""Errors that reach the user as one clear line, not a traceback.

Anything raised as an ``XferError`` is printed by the CLI as ``xfer: error: ...``
and exits with status 2. Messages say what went wrong and where (a URI, a config
key, a file), and never contain secrets.
"""


class XferError(Exception):
    """A problem the user can fix: bad input, bad config, unreachable storage."""


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

    Transient by nature: retried within a budget (:mod:`xfer.retry`). When it
    escapes, the CLI exits with :data:`EXIT_STORE_UNAVAILABLE`, so a scheduler can
    tell "the store was down, run again later" from a bad config or a bug.
    """

    def __init__(self, message: str, endpoint: str = "", reason: str = ""):
        super().__init__(message)
        self.endpoint = endpoint
        self.reason = reason or message

    def __reduce__(self) -> tuple[object, ...]:  # survives pickling across Ray
        return (type(self), (str(self), self.endpoint, self.reason))


EXIT_USER_ERROR = 2
EXIT_STORE_UNAVAILABLE = 75  # EX_TEMPFAIL (sysexits.h): try again later
