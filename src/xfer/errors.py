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
