"""Committing a set of objects atomically: a reader never sees half a model or a partition.

A single S3 PUT (or a completed multipart upload) is all-or-nothing, and local writes
go to a temporary file renamed into place (:mod:`xfer.storage`), so no reader sees
half an object. Sets of objects (a model directory, a dataset, a partition) are
staged under a temporary prefix and committed here, with a marker written last
(``_SUCCESS``): :func:`commit_prefix` replaces the destination whole,
:func:`commit_partition` switches a partition by replacing its marker. Temporary S3
objects live under ``s3://<bucket>/_tmp/`` so that one lifecycle rule can expire
anything a crashed job left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid

from xfer.s3 import is_s3, local_path, split_s3, translate_errors
from xfer.storage import copy, delete, delete_prefix, join, list_files, write_bytes

SUCCESS = "_SUCCESS"  # the marker of a committed run or partition, written last
TMP_PREFIX = "_tmp"


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


def commit_prefix(
    staging: str, final: str, marker: str | None = None, marker_body: bytes = b""
) -> None:
    """Move a staged set of objects to ``final`` and, last, write ``marker``.

    Whatever was under ``final`` is replaced whole. Locally this is a directory
    rename. On S3, objects are copied server-side; readers that honour the marker
    (``_SUCCESS``) never see a mix: the old marker is removed first and the new one
    written only after every object is in place.
    """
    if is_s3(final):
        old_marker = join(final, marker) if marker else None
        if old_marker:
            delete(old_marker)
        delete_prefix(final)
        staged = list_files(staging)
        base = staging.rstrip("/") + "/"
        for info in staged:
            copy(info.uri, join(final, info.uri[len(base) :]))
        if marker:
            write_bytes(join(final, marker), marker_body)
        delete_prefix(staging)
        return
    with translate_errors(final):
        src, dst = local_path(staging), local_path(final).rstrip("/")
        if marker:
            with open(os.path.join(src, marker), "wb") as f:
                f.write(marker_body)
        if os.path.exists(dst):
            trash = f"{dst}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dst, trash)
            os.replace(src, dst)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
            os.replace(src, dst)


def commit_partition(
    staging: str, final: str, marker: str, marker_body: bytes, keep: list[str]
) -> None:
    """Publish a partition by switching its marker; readers follow the marker.

    ``keep`` are the relative names of the staged files; they must be new names
    (xfer puts a run token in them). The files are copied in next to the old ones,
    then the marker, which lists them, is replaced in one PUT, then everything the
    new marker does not list is deleted. A reader that reads the marker and then the
    files it lists sees the old partition or the new one, never a mix; one that lists
    the prefix instead of reading the marker may briefly see both (don't).
    Locally the directory is swapped by rename.
    """
    if not is_s3(final):
        commit_prefix(staging, final, marker=marker, marker_body=marker_body)
        return
    base = staging.rstrip("/") + "/"
    for info in list_files(staging):
        copy(info.uri, join(final, info.uri[len(base) :]))
    write_bytes(join(final, marker), marker_body, "application/json")
    delete_prefix(final, keep={join(final, name) for name in [*keep, marker]})
    delete_prefix(staging)


def make_local_staging(final: str) -> str:
    """A local directory to build files in before :func:`commit_prefix` (local or S3)."""
    if is_s3(final):
        return tempfile.mkdtemp(prefix="xfer-stage-")
    path = staging_prefix(final)
    os.makedirs(path, exist_ok=True)
    return path
