"""Every read, write and listing goes through here, by URI (listing lives in :mod:`xfer.store.listing`).

A URI is ``s3://bucket/key`` or a local path (optionally ``file://``). The S3
connection and error translation are :mod:`xfer.store.s3`; committing sets of objects is
:mod:`xfer.store.commit`. Every write is whole or absent (one S3 PUT or completed multipart
upload; locally a temporary file renamed into place). Errors are
:class:`~xfer.errors.StorageError` naming the URI; calls ride out a store that is
briefly away (:mod:`xfer.store.retry`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection
from typing import Any

import yaml

from xfer.errors import DataError, NotFoundError
from xfer.store.listing import FileInfo as FileInfo
from xfer.store.listing import iter_files as iter_files
from xfer.store.listing import list_dirs as list_dirs
from xfer.store.listing import list_files as list_files
from xfer.store.retry import ride_through
from xfer.store.s3 import (
    MISSING_CODES,
    arrow_filesystem,
    check_bucket,
    describe_client_error,
    is_s3,
    local_path,
    s3_client,
    split_s3,
    translate_errors,
)


def join(base: str, *parts: str) -> str:
    """Join URI parts with single slashes (local paths too)."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def basename(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1]


@ride_through("reading")
def read_bytes(uri: str) -> bytes:
    with translate_errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        with open(local_path(uri), "rb") as f:
            return f.read()


@ride_through("writing")
def write_bytes(uri: str, data: bytes, content_type: str | None = None) -> None:
    """Write ``data`` so that readers see either nothing/the old object or all of it."""
    with translate_errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            extra = {"ContentType": content_type} if content_type else {}
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, **extra)
            return
        path = local_path(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"), content_type="text/plain; charset=utf-8")


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise DataError(f"{uri} is not valid JSON: {exc}") from None


def write_json(uri: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=False, default=str).encode("utf-8")
    write_bytes(uri, data + b"\n", content_type="application/json")


def read_yaml(uri: str) -> Any:
    try:
        return yaml.safe_load(read_bytes(uri))
    except yaml.YAMLError as exc:
        raise DataError(f"{uri} is not valid YAML: {exc}") from None


def write_yaml(uri: str, obj: Any) -> None:
    write_bytes(uri, yaml.safe_dump(obj, sort_keys=False).encode("utf-8"), "application/yaml")


# ------------------------------------------------- objects (listing: xfer.store.listing)


@ride_through("looking for")
def exists(uri: str) -> bool:
    """True if an object (or a local file or directory) exists at ``uri``."""
    with translate_errors(uri):
        if is_s3(uri):
            from botocore.exceptions import ClientError

            bucket, key = split_s3(uri)
            try:
                s3_client().head_object(Bucket=bucket, Key=key)
                return True
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) not in MISSING_CODES:
                    raise
            check_bucket(uri)  # a 404 on HEAD may also mean the bucket is missing
            return False
        return os.path.exists(local_path(uri))


@ride_through("looking at")
def stat(uri: str) -> FileInfo:
    """Size and version of one object or file; NotFoundError if it is missing."""
    with translate_errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            head = s3_client().head_object(Bucket=bucket, Key=key)
            return FileInfo(uri, int(head["ContentLength"]), str(head.get("ETag", "")).strip('"'))
        path = local_path(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        st = os.stat(path)
        return FileInfo(uri, st.st_size, f"mtime:{st.st_mtime_ns}")


@ride_through("deleting")
def delete(uri: str) -> None:
    with translate_errors(uri):
        if is_s3(uri):
            bucket, key = split_s3(uri)
            s3_client().delete_object(Bucket=bucket, Key=key)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(local_path(uri))


@ride_through("deleting")
def delete_prefix(prefix: str, keep: Collection[str] = ()) -> int:
    """Delete everything under ``prefix`` except the URIs in ``keep``; returns how many went."""
    with translate_errors(prefix):
        gone = [f.uri for f in list_files(prefix) if f.uri not in keep]
        if is_s3(prefix):
            bucket, _ = split_s3(prefix)
            keys = [split_s3(uri)[1] for uri in gone]
            for i in range(0, len(keys), 1000):
                chunk = [{"Key": k} for k in keys[i : i + 1000]]
                answer = s3_client().delete_objects(
                    Bucket=bucket, Delete={"Objects": chunk, "Quiet": True}
                )
                for err in answer.get("Errors", [])[:1]:  # quiet: only failures come back
                    uri, code = f"s3://{bucket}/{err.get('Key')}", str(err.get("Code"))
                    raise describe_client_error(uri, code, str(err.get("Message", "")))
        elif keep:
            for uri in gone:
                os.remove(local_path(uri))
            for dirpath, _, _ in sorted(os.walk(local_path(prefix)), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(dirpath)  # children first; only the empty ones
        elif os.path.exists(local_path(prefix)):
            shutil.rmtree(local_path(prefix))  # the folders too
        return len(gone)


@ride_through("copying")
def copy(src: str, dst: str) -> None:
    """Copy one object; server-side when both ends are S3."""
    if is_s3(src) and is_s3(dst):
        with translate_errors(src):
            sb, sk = split_s3(src)
            db, dk = split_s3(dst)
            s3_client().copy({"Bucket": sb, "Key": sk}, db, dk)
        return
    if is_s3(dst):
        upload_file(local_path(src), dst)
    elif is_s3(src):
        download_file(src, local_path(dst))
    else:
        with translate_errors(src):
            os.makedirs(os.path.dirname(os.path.abspath(local_path(dst))), exist_ok=True)
            tmp = f"{local_path(dst)}.tmp-{uuid.uuid4().hex[:8]}"
            shutil.copyfile(local_path(src), tmp)
            os.replace(tmp, local_path(dst))


@ride_through("uploading to")
def upload_file(path: str, uri: str) -> None:
    if not is_s3(uri):
        copy(path, uri)
        return
    with translate_errors(uri):
        bucket, key = split_s3(uri)
        s3_client().upload_file(path, bucket, key)


@ride_through("downloading")
def download_file(uri: str, path: str) -> None:
    if not is_s3(uri):
        copy(uri, path)
        return
    with translate_errors(uri):
        bucket, key = split_s3(uri)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        s3_client().download_file(bucket, key, tmp)
        os.replace(tmp, path)


def upload_dir(local_dir: str, prefix: str) -> list[str]:
    """Copy a local directory tree to ``prefix``; returns the URIs written."""
    written = []
    for dirpath, _, names in os.walk(local_dir):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            dst = join(prefix, rel)
            upload_file(path, dst)
            written.append(dst)
    return written


def download_dir(prefix: str, local_dir: str) -> list[str]:
    """Copy every object under ``prefix`` into ``local_dir``; returns local paths."""
    files = list_files(prefix)
    if not files:
        raise NotFoundError(f"nothing found under {prefix}")
    out = []
    base = prefix.rstrip("/") + "/"
    for info in files:
        rel = info.uri[len(base) :] if info.uri.startswith(base) else basename(info.uri)
        dst = os.path.join(local_dir, *rel.split("/"))
        download_file(info.uri, dst)
        out.append(dst)
    return out


# --------------------------------------------------------------------- Parquet


def write_parquet(table: Any, uri: str, **kwargs: Any) -> None:
    """Write a pyarrow Table atomically (local temp file, then upload or rename)."""
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="xfer-pq-") as tmp:
        path = os.path.join(tmp, "part.parquet")
        pq.write_table(table, path, **kwargs)
        if is_s3(uri):
            upload_file(path, uri)
        else:
            copy(path, uri)


@ride_through("reading")
def read_parquet(uri: str, columns: list[str] | None = None) -> Any:
    import pyarrow.parquet as pq

    with translate_errors(uri):
        if is_s3(uri):
            return pq.read_table(io.BytesIO(read_bytes(uri)), columns=columns)
        return pq.read_table(local_path(uri), columns=columns)


@ride_through("reading")
def read_row_groups(uri: str, groups: list[int], columns: list[str] | None = None) -> Any:
    """Some row groups of a Parquet file, read (and retried) as one step."""
    import pyarrow.parquet as pq

    with translate_errors(uri):
        filesystem, path = arrow_filesystem(uri)
        with filesystem.open_input_file(path) as f:
            return pq.ParquetFile(f).read_row_groups(groups, columns=columns)


@ride_through("reading the footer of")
def parquet_metadata(uri: str) -> Any:
    """A Parquet file's footer (row counts, column statistics) without its data."""
    import pyarrow.parquet as pq

    with translate_errors(uri):
        filesystem, path = arrow_filesystem(uri)
        with filesystem.open_input_file(path) as f:
            return pq.ParquetFile(f).metadata


@ride_through("opening")
def open_parquet(uri: str) -> Any:
    """A ``ParquetFile`` that streams row groups from storage (no full download)."""
    import pyarrow.parquet as pq

    with translate_errors(uri):
        filesystem, path = arrow_filesystem(uri)
        return pq.ParquetFile(filesystem.open_input_file(path))
