"""Whether a piece of text is a location or a name: the one rule every command uses.

    is_uri("s3://b/xfer/runs/x")   # True: a scheme
    is_uri("/data/pets")           # True: an absolute path
    is_uri("pets")                 # False: a name, resolved under storage.root
    is_uri("photos/a.jpg")         # False: relative (to a list's folder, say)

A dataset, a run or a list entry given as a URI is used as it is; anything else is a
name (or a relative path) that the caller resolves against its own base.
"""

from __future__ import annotations


def is_uri(text: str) -> bool:
    """``scheme://…`` (``s3://``, ``file://``) or an absolute path."""
    return "://" in text or text.startswith("/")
