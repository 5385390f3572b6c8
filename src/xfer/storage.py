"""Every read, write and listing goes through here, by URI.

A URI is ``s3://bucket/key`` or a local path (optionally ``file://``). Nothing else
in xfer knows which. S3 is configured from the standard AWS variables only
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, or any source of the
normal AWS credential chain); pyarrow ignores the endpoint variables, so the
endpoint is passed to it explicitly (DESIGN.md, decision 5).

Atomicity: a single S3 PUT (or a completed multipart upload) is all-or-nothing, and
local writes go to a temporary file that is renamed into place, so a reader never
sees half an object. Sets of objects (a model directory, a partition) are staged
under a temporary prefix and committed with :func:`commit_prefix`, which writes a
marker last. Temporary S3 objects live under ``s3://<bucket>/_tmp/`` so that one
lifecycle rule can expire anything a crashed job left behind.

Errors become :class:`~xfer.errors.StorageError` with the URI in the message:
missing bucket, access denied, bad credentials, unreachable endpoint. Secrets never
appear in messages.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import yaml

from xfer.errors import NotFoundError, StorageError, StoreUnavailable
from xfer.retry import ride_through

TMP_PREFIX = "_tmp"


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if len(bucket) < 3:
        raise StorageError(f"invalid bucket name in {uri!r} (at least 3 characters)")
    return bucket, key


def local_path(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


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


# ------------------------------------------------------------------ S3 settings


@dataclass(frozen=True)
class S3Settings:
    """What decides which S3 client to build; read from the environment."""

    endpoint_url: str | None
    region: str
    max_attempts: int
    credentials_fingerprint: str  # a hash, so that changed keys get a new client

    @classmethod
    def from_env(cls) -> S3Settings:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        attempts = int(os.environ.get("XFER_S3_MAX_ATTEMPTS", "5"))
        creds = "\0".join(
            os.environ.get(k, "")
            for k in (
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "AWS_SESSION_TOKEN",
                "AWS_PROFILE",
            )
        )
        fingerprint = hashlib.sha256(creds.encode()).hexdigest()[:16]
        return cls(endpoint or None, region, max(1, attempts), fingerprint)

    def describe(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


@functools.lru_cache(maxsize=8)
def _boto_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.region,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=5,
        read_timeout=120,
        # S3-compatible servers on an IP address or localhost need path-style URLs.
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
    )
    return boto3.session.Session().client("s3", endpoint_url=settings.endpoint_url, config=config)


def s3_client() -> Any:
    return _boto_client(S3Settings.from_env())


@functools.lru_cache(maxsize=8)
def _arrow_s3(settings: S3Settings) -> Any:
    from pyarrow import fs

    kwargs: dict[str, Any] = {
        "region": settings.region,
        "connect_timeout": 5,
        "request_timeout": 120,
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts),
    }
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    # Credentials are left to the AWS SDK's default chain (the same variables, profile
    # or role boto3 uses), so they are never pickled into Ray tasks with the filesystem.
    return fs.S3FileSystem(**kwargs)


def arrow_filesystem(uri: str) -> tuple[Any, str]:
    """A pyarrow filesystem and the path within it, for Parquet I/O and Ray."""
    from pyarrow import fs

    if is_s3(uri):
        bucket, key = split_s3(uri)
        return _arrow_s3(S3Settings.from_env()), f"{bucket}/{key}".rstrip("/")
    return fs.LocalFileSystem(), os.path.abspath(local_path(uri))


# ------------------------------------------------------------ error translation


_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "Forbidden", "403"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


# Answers that mean "try again later": server errors and throttling.
_TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "429",
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "TooManyRequests",
    "RequestTimeout",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
}


def _unavailable(uri: str, reason: str) -> StoreUnavailable:
    endpoint = S3Settings.from_env().describe()
    where = f"endpoint {endpoint}" if reason.endswith("S3") else f"at {endpoint}"
    return StoreUnavailable(f"{reason} {where} for {uri}", endpoint=endpoint, reason=reason)


def _describe_client_error(uri: str, code: str, message: str) -> StorageError:
    endpoint = S3Settings.from_env().describe()
    if code in _TRANSIENT_CODES:
        return _unavailable(uri, f"S3 answered {code}")
    if code == "NoSuchBucket":
        bucket = split_s3(uri)[0]
        return NotFoundError(f"bucket {bucket!r} does not exist (at {endpoint}), for {uri}")
    if code in _CREDENTIAL_CODES:
        return StorageError(
            f"S3 at {endpoint} rejected the credentials ({code}) for {uri}: check "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or your AWS profile)"
        )
    if code in _DENIED_CODES:
        return StorageError(
            f"access denied to {uri} at {endpoint}: the credentials lack permission"
        )
    if code in _MISSING_CODES:
        return NotFoundError(f"no such object: {uri}")
    return StorageError(f"S3 error {code} for {uri} at {endpoint}: {message}")


def _translate_arrow_error(uri: str, exc: Exception) -> StorageError:
    text = str(exc)
    if isinstance(exc, FileNotFoundError) or "Path does not exist" in text:
        return _missing_object_or_bucket(uri)
    for code in ("NoSuchBucket", *_CREDENTIAL_CODES, *_DENIED_CODES):
        if code in text:
            return _describe_client_error(uri, code, "")
    if "ACCESS_DENIED" in text:
        endpoint = S3Settings.from_env().describe()
        return StorageError(
            f"access denied to {uri} at {endpoint}: the credentials are wrong or lack permission"
        )
    if "NETWORK_CONNECTION" in text or "Couldn't connect" in text or "curlCode" in text:
        return _unavailable(uri, "cannot reach S3")
    for code in ("SlowDown", "ServiceUnavailable", "InternalError", "Throttling", "HTTP 503"):
        if code in text:
            return _unavailable(uri, f"S3 answered {code}")
    if "Bucket" in text and ("does not exist" in text or "NOT_FOUND" in text):
        return _describe_client_error(uri, "NoSuchBucket", "")
    return StorageError(f"storage error for {uri}: {text.splitlines()[0][:300]}")


def _missing_object_or_bucket(uri: str) -> StorageError:
    """pyarrow's 404 does not say whether the bucket or the key is missing: ask."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client().head_bucket(Bucket=split_s3(uri)[0])
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in {"404", "NoSuchBucket", "NotFound"}:
            return _describe_client_error(uri, "NoSuchBucket", "")
    except BotoCoreError:
        pass
    return NotFoundError(f"no such object: {uri}")


@contextlib.contextmanager
def translate_errors(uri: str) -> Iterator[None]:
    """Turn botocore/pyarrow/OS errors into one StorageError naming ``uri``."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    try:
        yield
    except StorageError:
        raise
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise _describe_client_error(
            uri, str(err.get("Code", "")), str(err.get("Message", ""))
        ) from None
    except BotoConnectionError:  # refused, unreachable, connect timeout
        raise _unavailable(uri, "cannot reach S3") from None
    except HTTPClientError as exc:  # read timeout, connection reset or closed
        raise _unavailable(uri, f"S3 connection failed ({type(exc).__name__})") from None
    except (NoCredentialsError, PartialCredentialsError):
        raise StorageError(
            f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or configure an AWS profile or role"
        ) from None
    except BotoCoreError as exc:
        endpoint = S3Settings.from_env().describe()
        raise StorageError(
            f"S3 request to {endpoint} failed for {uri}: {type(exc).__name__}"
        ) from None
    except FileNotFoundError:
        if is_s3(uri):
            raise _missing_object_or_bucket(uri) from None
        raise NotFoundError(f"no such file or directory: {uri}") from None
    except PermissionError:
        raise StorageError(f"permission denied: {uri}") from None
    except OSError as exc:
        if is_s3(uri):
            raise _translate_arrow_error(uri, exc) from None
        raise StorageError(f"cannot access {uri}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------- bytes & text


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
        raise StorageError(f"{uri} is not valid JSON: {exc}") from None


def write_json(uri: str, obj: Any) -> None:
    data = json.dumps(obj, indent=2, sort_keys=False, default=str).encode("utf-8")
    write_bytes(uri, data + b"\n", content_type="application/json")


def read_yaml(uri: str) -> Any:
    try:
        return yaml.safe_load(read_bytes(uri))
    except yaml.YAMLError as exc:
        raise StorageError(f"{uri} is not valid YAML: {exc}") from None


def write_yaml(uri: str, obj: Any) -> None:
    write_bytes(uri, yaml.safe_dump(obj, sort_keys=False).encode("utf-8"), "application/yaml")


# ------------------------------------------------------------ listing & objects


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int
    version: str | None = None  # changes whenever the content may have: ETag, or mtime locally


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
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in {"404", "NoSuchKey", "NotFound"}:
                    # A 404 on HEAD may also mean the bucket is missing: ask.
                    try:
                        s3_client().head_bucket(Bucket=bucket)
                    except ClientError as bucket_exc:
                        code = str(bucket_exc.response.get("Error", {}).get("Code", ""))
                        if code in {"404", "NoSuchBucket", "NotFound"}:
                            code = "NoSuchBucket"
                        raise _describe_client_error(uri, code, "") from None
                    return False
                raise
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


@ride_through("listing")
def list_files(prefix: str) -> list[FileInfo]:
    """All objects under ``prefix`` (recursive), sorted by URI."""
    with translate_errors(prefix):
        if is_s3(prefix):
            bucket, key = split_s3(prefix)
            key = key.rstrip("/") + "/" if key else ""
            out = []
            pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            for page in pages:
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        out.append(FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"])))
            return sorted(out, key=lambda f: f.uri)
        root = local_path(prefix)
        if os.path.isfile(root):
            return [FileInfo(root, os.path.getsize(root))]
        out = []
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                out.append(FileInfo(path, os.path.getsize(path)))
        return sorted(out, key=lambda f: f.uri)


def iter_files(prefix: str) -> Iterator[FileInfo]:
    """Objects under ``prefix`` page by page (1,000 at a time on S3), in key order.

    For listings too long to hold at once; each page is fetched (and retried
    through an outage) on its own.
    """
    if not is_s3(prefix):
        yield from list_files(prefix)
        return
    token: str | None = None
    while True:
        infos, token = _list_page(prefix, token)
        yield from infos
        if not token:
            return


@ride_through("listing")
def _list_page(prefix: str, token: str | None) -> tuple[list[FileInfo], str | None]:
    with translate_errors(prefix):
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        extra = {"ContinuationToken": token} if token else {}
        page = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1000, **extra)
        infos = [
            FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]
        return infos, page.get("NextContinuationToken") if page.get("IsTruncated") else None


@ride_through("listing")
def list_dirs(prefix: str) -> list[str]:
    """The names of the "folders" directly under ``prefix`` (S3: common prefixes)."""
    with translate_errors(prefix):
        if not is_s3(prefix):
            root = local_path(prefix)
            if not os.path.isdir(root):
                return []
            return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        names: list[str] = []
        for page in (
            s3_client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=key, Delimiter="/")
        ):
            names += [p["Prefix"][len(key) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)


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
def delete_prefix(prefix: str) -> int:
    """Delete everything under ``prefix``; returns how many objects were removed."""
    with translate_errors(prefix):
        if is_s3(prefix):
            bucket, _ = split_s3(prefix)
            keys = [split_s3(f.uri)[1] for f in list_files(prefix)]
            for i in range(0, len(keys), 1000):
                chunk = [{"Key": k} for k in keys[i : i + 1000]]
                s3_client().delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
            return len(keys)
        path = local_path(prefix)
        if not os.path.exists(path):
            return 0
        n = sum(len(files) for _, _, files in os.walk(path))
        shutil.rmtree(path)
        return n


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


# ------------------------------------------------------------------ atomic sets


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
    wanted = {join(final, name) for name in [*keep, marker]}
    bucket, _ = split_s3(final)
    stale = [split_s3(f.uri)[1] for f in list_files(final) if f.uri not in wanted]
    for i in range(0, len(stale), 1000):
        chunk = [{"Key": k} for k in stale[i : i + 1000]]
        with translate_errors(final):
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": chunk, "Quiet": True})
    delete_prefix(staging)


def make_local_staging(final: str) -> str:
    """A local directory to build files in before :func:`commit_prefix` (local or S3)."""
    if is_s3(final):
        return tempfile.mkdtemp(prefix="xfer-stage-")
    path = staging_prefix(final)
    os.makedirs(path, exist_ok=True)
    return path


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


@ride_through("checking the bucket of")
def ensure_bucket(uri: str) -> None:
    """Create the bucket of an ``s3://`` URI if it is missing (local: the directory)."""
    with translate_errors(uri):
        if not is_s3(uri):
            os.makedirs(local_path(uri), exist_ok=True)
            return
        from botocore.exceptions import ClientError

        bucket, _ = split_s3(uri)
        client = s3_client()
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in {
                "404",
                "NoSuchBucket",
                "NotFound",
            }:
                client.create_bucket(Bucket=bucket)
            else:
                raise
