"""What a URI is, and the S3 connection behind one: clients, pyarrow's filesystem, errors.

A URI is ``s3://bucket/key`` or a local path (optionally ``file://``). S3 is
configured from the standard AWS variables only (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, or any source of the normal AWS
credential chain); pyarrow ignores the endpoint variables, so the endpoint is passed
to it explicitly (docs/design.md, decision 5). Clients are cached per settings, so
changed keys or endpoints get new ones.

Errors become :class:`~xfer.errors.StorageError` with the URI in the message:
missing bucket, access denied, bad credentials, unreachable endpoint (that one is a
:class:`~xfer.errors.StoreUnavailable`, which :mod:`xfer.store.retry` rides out). Secrets
never appear in messages.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from xfer.errors import NotFoundError, StorageError, StoreUnavailable
from xfer.store.retry import ride_through

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
        keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")
        creds = "\0".join(os.environ.get(k, "") for k in keys)
        fingerprint = hashlib.sha256(creds.encode()).hexdigest()[:16]
        return cls(endpoint or None, region, max(1, attempts), fingerprint)

    def describe(self) -> str:
        return self.endpoint_url or f"AWS S3 ({self.region})"


def use_endpoint(endpoint_url: str | None, region: str | None) -> None:
    """``storage.endpoint_url`` / ``storage.region`` become the standard AWS variables of
    this process (and of the Ray workers it starts, which get them forwarded), which
    :meth:`S3Settings.from_env` and every AWS tool read; unset ones are left alone."""
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint_url
    if region:
        os.environ["AWS_REGION"] = region


# Connections the shared client keeps open: room for the threads that share it (a
# commit's xfer.store.commit.COPY_WORKERS copies at once, a scoring actor's reads in flight,
# 96 by default with a GPU); botocore's default is 10, and past it each extra request
# opens and drops a connection. Connections open only when used.
MAX_POOL_CONNECTIONS = 128


@functools.lru_cache(maxsize=8)
def _boto_client(settings: S3Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=settings.region,
        retries={"max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=5,
        read_timeout=120,
        max_pool_connections=MAX_POOL_CONNECTIONS,
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
# A missing object; a missing bucket (HEAD on a bucket answers a bare 404).
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET_CODES = {"NoSuchBucket", "404", "NotFound"}


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


def describe_client_error(uri: str, code: str, message: str) -> StorageError:
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
    if code in MISSING_CODES:
        return NotFoundError(f"no such object: {uri}")
    return StorageError(f"S3 error {code} for {uri} at {endpoint}: {message}")


# pyarrow (the AWS C++ SDK) names errors by type and status, not by S3 code:
# "AWS Error SLOW_DOWN during PutObject operation: ...", "AWS Error UNKNOWN (HTTP
# status 503) during HeadObject operation: ...", sometimes with "ExceptionName: X".
_ARROW_ERROR = re.compile(r"AWS Error (?P<type>[A-Z_]+)(?: \(HTTP status (?P<status>\d{3})\))?")
_ARROW_EXCEPTION = re.compile(r"ExceptionName: (?P<code>[A-Za-z]+)")
_ARROW_TYPES = {
    "ACCESS_DENIED": "AccessDenied",
    "NO_SUCH_BUCKET": "NoSuchBucket",
    "NO_SUCH_KEY": "NoSuchKey",
    "RESOURCE_NOT_FOUND": "NoSuchKey",
    "INVALID_ACCESS_KEY_ID": "InvalidAccessKeyId",
    "SIGNATURE_DOES_NOT_MATCH": "SignatureDoesNotMatch",
    "INVALID_CLIENT_TOKEN_ID": "InvalidToken",
    "EXPIRED_TOKEN": "ExpiredToken",
    "INTERNAL_FAILURE": "InternalError",
    "SERVICE_UNAVAILABLE": "ServiceUnavailable",
    "SLOW_DOWN": "SlowDown",
    "THROTTLING": "Throttling",
    "REQUEST_TIMEOUT": "RequestTimeout",
}


def _arrow_code(text: str) -> str | None:
    """The S3 error code behind a pyarrow error message, or None when it names none."""
    named = _ARROW_EXCEPTION.search(text)
    if named:
        return named["code"]
    found = _ARROW_ERROR.search(text)
    if not found:
        return None
    if found["type"] in _ARROW_TYPES:
        return _ARROW_TYPES[found["type"]]
    return found["status"] or found["type"]


def _translate_arrow_error(uri: str, exc: Exception) -> StorageError:
    text = str(exc)
    if isinstance(exc, FileNotFoundError) or "Path does not exist" in text:
        return _missing_object_or_bucket(uri)
    code = _arrow_code(text)
    if code == "NETWORK_CONNECTION" or (code is None and _CURL_ERROR.search(text)):
        return _unavailable(uri, "cannot reach S3")
    if code in MISSING_CODES:
        return _missing_object_or_bucket(uri)
    if code is not None and code.isupper() and not code.isdigit():
        code = None  # a type with no S3 meaning: report the message as it is
    if code == "AccessDenied" and not _ARROW_EXCEPTION.search(text):
        endpoint = S3Settings.from_env().describe()  # a bare 403: no body says which
        return StorageError(
            f"access denied to {uri} at {endpoint}: the credentials are wrong or lack permission"
        )
    if code is not None:
        return describe_client_error(uri, code, text.splitlines()[0][:300])
    return StorageError(f"storage error for {uri}: {text.splitlines()[0][:300]}")


_CURL_ERROR = re.compile(r"curlCode: \d+")


def _client_error_in(exc: BaseException) -> Any:
    """The botocore error a boto3 transfer error wraps (S3UploadFailedError keeps it
    as its context; RetriesExceededError as ``last_exception``), or None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if cur is not exc and type(cur).__module__.startswith(("botocore", "urllib3")):
            return cur
        cur = getattr(cur, "last_exception", None) or cur.__cause__ or cur.__context__
    return None


def _translate_transfer_error(uri: str, exc: BaseException) -> StorageError:
    """boto3's managed transfers wrap the real error; classify that one."""
    inner = _client_error_in(exc)
    if inner is not None:
        try:
            with translate_errors(uri):
                raise inner
        except StorageError as translated:
            return translated
        except Exception:  # urllib3's own: a read that timed out or was cut
            return _unavailable(uri, f"S3 connection failed ({type(inner).__name__})")
    coded = re.search(r"An error occurred \((?P<code>\w+)\)", str(exc))
    if coded:
        return describe_client_error(uri, coded["code"], "")
    return _unavailable(uri, f"S3 transfer failed ({type(exc).__name__})")


def _missing_object_or_bucket(uri: str) -> StorageError:
    """pyarrow's 404 does not say whether the bucket or the key is missing: ask."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client().head_bucket(Bucket=split_s3(uri)[0])
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code")) in _NO_BUCKET_CODES:
            return describe_client_error(uri, "NoSuchBucket", "")
    except BotoCoreError:
        pass
    return NotFoundError(f"no such object: {uri}")


def check_bucket(uri: str) -> None:
    """After a 404 on an object: raise if its bucket is missing (or cannot be asked)."""
    from botocore.exceptions import ClientError

    try:
        s3_client().head_bucket(Bucket=split_s3(uri)[0])
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NO_BUCKET_CODES:
            code = "NoSuchBucket"
        raise describe_client_error(uri, code, "") from None


@contextlib.contextmanager
def translate_errors(uri: str) -> Iterator[None]:
    """Turn botocore/pyarrow/OS errors into one StorageError naming ``uri``."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError
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
    except (S3UploadFailedError, RetriesExceededError) as exc:
        raise _translate_transfer_error(uri, exc) from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise describe_client_error(
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


@ride_through("checking the bucket of")
def ensure_bucket(uri: str) -> None:
    """Create the bucket of an ``s3://`` URI if it is missing.

    Nothing to do for a local path: every write creates its directories.
    """
    if not is_s3(uri):
        return
    from botocore.exceptions import ClientError

    with translate_errors(uri):
        bucket, _ = split_s3(uri)
        client = s3_client()
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _NO_BUCKET_CODES:
                client.create_bucket(Bucket=bucket)
            else:
                raise
