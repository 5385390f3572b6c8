"""Committing a set of objects atomically: a reader never sees half a model or a partition.

A single S3 PUT (or a completed multipart upload) is all-or-nothing, and local writes
go to a temporary file renamed into place (:mod:`xfer.store.storage`), so no reader sees
half an object. Sets of objects (a model directory, a dataset, a partition) are
staged under a temporary prefix and committed here, with a marker written last
(``_SUCCESS``): :func:`commit_prefix` copies a set in, switches the marker, then deletes
what the marker no longer names; :func:`commit_partition` is the same for a
partition whose files carry the night's token. Temporary S3
objects live under ``s3://<bucket>/_tmp/`` so that one lifecycle rule can expire
anything a crashed job left behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from xfer.errors import StorageError
from xfer.store.s3 import is_s3, local_path, split_s3, translate_errors
from xfer.store.storage import copy, delete_prefix, join, list_files, write_bytes

SUCCESS = "_SUCCESS"  # the marker of a committed run or partition, written last
TMP_PREFIX = "_tmp"
# Objects copied at once by a commit (server-side copies: mostly waiting on the store).
# boto3's client is shared by the threads; its connection pool (xfer.store.s3) has room for them.
COPY_WORKERS = 16


def staging_prefix(final: str) -> str:
    """A fresh temporary prefix to stage a set of objects destined for ``final``.

    On S3 it is under ``s3://<bucket>/_tmp/`` (one lifecycle rule expires leftovers);
    locally it is a hidden sibling directory, so the final rename stays on one disk.
    """
    token = uuid.uuid4().hex[:12]
    if is_s3(final):
        bucket, key = split_s3(final)
        return f"s3://{bucket}/{TMP_PREFIX}/{token}/{key.strip('/')}"
    path = local_path(final).rstrip("/")
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{token}")


def version_name(*parts: str) -> str:
    """The folder of one committed version of a set: named by its content.

    The same content gets the same name (re-sharding the same inputs gives the same
    manifest), other content another one, so a new version never overwrites a file
    the old marker names.
    """
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return f"v-{digest[:16]}"


def is_version_name(name: str) -> bool:
    return bool(_VERSION.fullmatch(name))


_VERSION = re.compile(r"v-[0-9a-f]{16}")


def commit_prefix(
    staging: str,
    final: str,
    marker: str | None = None,
    marker_body: bytes = b"",
    into: str = "",
    before_delete: Callable[[list[str]], None] | None = None,
) -> list[str]:
    """Move a staged set of objects to ``final``, write ``marker``, then drop the rest.

    The order is the commit rule (docs/design.md, "The write contract"): every staged
    object is copied in (server-side on S3, a rename locally; :data:`COPY_WORKERS` at
    a time, every one finished before the next step), then the marker is
    written in one PUT, and only then is whatever the new set does not hold deleted,
    staging last. Nothing is deleted before the marker that replaces it is written,
    so a crash or an error at any step leaves the old marker and every object it
    names whole; running the commit again completes it. Objects the caller wants
    kept readable by the old marker until the switch must have new names (a version
    folder from :func:`version_name`, given as ``into``, or a token in the name): an
    object copied over one of the same name replaces it at once. A failed commit
    keeps its staging. ``before_delete`` runs after the marker, before any delete,
    with the committed URIs (a second marker, e.g. a table's manifest, goes there).

    Returns the URIs of the committed set, the marker included.
    """
    base = staging.rstrip("/") + "/"
    names = [info.uri[len(base) :] for info in list_files(staging)]
    move_all([(join(staging, name), join(final, into, name)) for name in names])
    kept = [join(final, into, name) for name in names]
    if marker:
        write_bytes(join(final, marker), marker_body, "application/json")
        kept.append(join(final, marker))
    if before_delete is not None:
        before_delete(kept)
    delete_prefix(final, keep=set(kept))
    delete_prefix(staging)
    return kept


def commit_partition(
    staging: str,
    final: str,
    marker: str,
    marker_body: bytes,
    keep: list[str],
    before_delete: Callable[[list[str]], None] | None = None,
) -> None:
    """Publish a partition by switching its marker; readers follow the marker.

    ``keep`` are the relative names of the staged files; they must be new names
    (xfer puts the night's token in them), so the old marker's files stay whole until
    the new marker, which lists them, replaces it in one PUT (:func:`commit_prefix`).
    A reader that follows the marker sees the old partition or the new one, never a
    mix; one that lists the prefix instead may briefly see both (don't).
    """
    staged = {storage_rel(info.uri, staging) for info in list_files(staging)}
    missing = sorted(set(keep) - staged)
    if missing:
        raise StorageError(f"{staging}: staged files missing for the commit: {missing[:5]}")
    commit_prefix(
        staging, final, marker=marker, marker_body=marker_body, before_delete=before_delete
    )


def storage_rel(uri: str, prefix: str) -> str:
    return uri[len(prefix.rstrip("/")) + 1 :]


def move_all(pairs: list[tuple[str, str]]) -> None:
    """Every ``(src, dst)`` moved, :data:`COPY_WORKERS` at a time; returns only when all
    are done. One failure cancels the moves not yet started and is raised once the
    running ones end (the first in order, as :func:`move` raised it: a
    :class:`StorageError` naming the object), so no copy outlives the commit's
    failure and the marker is never written after a failed copy."""
    if len(pairs) < 2:
        for src, dst in pairs:
            move(src, dst)
        return
    with ThreadPoolExecutor(max_workers=min(COPY_WORKERS, len(pairs))) as pool:
        futures = [pool.submit(move, src, dst) for src, dst in pairs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        if any(f.exception() for f in done):
            for f in futures:
                f.cancel()
        wait(futures)
    failed = [f.exception() for f in futures if not f.cancelled() and f.exception()]
    if failed and failed[0] is not None:
        raise failed[0]


def move(src: str, dst: str) -> None:
    """Put a staged object in place: a rename on one local disk, else a copy."""
    if is_s3(src) or is_s3(dst):
        copy(src, dst)
        return
    with translate_errors(dst):
        os.makedirs(os.path.dirname(os.path.abspath(local_path(dst))), exist_ok=True)
        os.replace(local_path(src), local_path(dst))
