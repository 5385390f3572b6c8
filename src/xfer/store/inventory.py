"""An S3 Inventory report as a list of objects: ``--input s3://dest/.../manifest.json``.

Listing 100 million keys takes 100,000 requests; S3 Inventory delivers the same list
daily or weekly as files. What this module relies on, from the AWS documentation
("Amazon S3 Inventory", "Locating your inventory list", docs.aws.amazon.com/AmazonS3/
latest/userguide/storage-inventory.html and storage-inventory-location.html):

- a report is ``<destination-prefix>/<source-bucket>/<config-ID>/<YYYY-MM-DDTHH-MMZ>/
  manifest.json``, a JSON object with ``sourceBucket``, ``destinationBucket`` (an ARN,
  ``arn:aws:s3:::name``), ``fileFormat`` (``CSV``, ``ORC`` or ``Parquet``),
  ``fileSchema`` and ``files``: ``[{"key", "size", "MD5checksum"}]``, the data files'
  keys in the destination bucket, their sizes and the MD5 of each file;
- CSV data files are gzipped, without a header; their columns are ``fileSchema``, a
  comma-separated list (``Bucket, Key, VersionId, IsLatest, IsDeleteMarker, Size, ...``).
  "When using the CSV file format, the key name is URL-encoded and must be decoded":
  a space is ``+`` and ``+`` is ``%2B`` (form encoding, cloud-custodian/cloud-custodian
  #1997), so keys are decoded with :func:`urllib.parse.unquote_plus`;
- Parquet data files (Snappy) have lower-case columns: ``bucket``, ``key`` (not
  encoded), ``size``, ``is_latest``, ``is_delete_marker``, ...;
- ``IsLatest`` and ``IsDeleteMarker`` are there when the report lists all versions.

ORC is refused with a clear error. Delete markers and versions that are not the latest
are skipped when those columns are there. A row naming another bucket than the
manifest's ``sourceBucket`` is refused: a manifest is a file anyone who can write the
destination may have written, and must not make the job read whatever its credentials
can. The manifest covers what its inventory configuration covers (a bucket, or a
prefix filter): every object it lists is an input.

Data files are read one at a time: downloaded to a temporary file (retried through an
outage), checked against their ``size`` and ``MD5checksum`` (the bytes are read anyway,
so checking costs one hash pass), then streamed row by row.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from xfer.errors import DataError, NotFoundError
from xfer.store import storage

MANIFEST_NAME = "manifest.json"
FORMATS = ("CSV", "Parquet")
PARQUET_COLUMNS = ["bucket", "key", "size", "is_latest", "is_delete_marker"]


@dataclass(frozen=True)
class DataFile:
    uri: str
    size: int | None
    md5: str | None


@dataclass(frozen=True)
class Inventory:
    uri: str  # the manifest
    source_bucket: str
    file_format: str
    columns: list[str]  # CSV: fileSchema's names, in order
    files: list[DataFile]


@dataclass(frozen=True)
class Listed:
    """One object the inventory lists."""

    bucket: str
    key: str
    size: int | None


def is_inventory(uri: str) -> bool:
    """Whether ``uri`` is an S3 Inventory ``manifest.json`` (read to tell it from a dataset's)."""
    if storage.basename(uri) != MANIFEST_NAME:
        return False
    try:
        data = storage.read_json(uri)
    except (NotFoundError, DataError):
        return False
    return isinstance(data, dict) and "sourceBucket" in data and "fileFormat" in data


def load(uri: str) -> Inventory:
    """The manifest at ``uri``; DataError naming it if it is not a usable one."""
    data = storage.read_json(uri)
    try:
        fmt = str(data["fileFormat"])
        dest = str(data["destinationBucket"]).removeprefix("arn:aws:s3:::")
        files = [
            DataFile(f"s3://{dest}/{f['key']}", _int(f.get("size")), f.get("MD5checksum"))
            for f in data["files"]
        ]
        source = str(data["sourceBucket"])
        schema = str(data.get("fileSchema", ""))
    except (KeyError, TypeError) as exc:
        raise DataError(f"{uri}: not an S3 Inventory manifest (missing {exc})") from None
    if fmt not in FORMATS:
        raise DataError(
            f"{uri}: inventory fileFormat {fmt!r} is not supported (CSV or Parquet are); "
            "configure the inventory report as CSV or Parquet"
        )
    columns = [c.strip() for c in schema.split(",")] if fmt == "CSV" else []
    if fmt == "CSV" and not {"Bucket", "Key"} <= set(columns):
        raise DataError(f"{uri}: fileSchema {schema!r} has no Bucket and Key columns")
    return Inventory(uri, source, fmt, columns, files)


def objects(uri: str) -> Iterator[Listed]:
    """The objects the inventory at ``uri`` lists, one data file at a time."""
    inv = load(uri)
    for data_file in inv.files:
        with tempfile.TemporaryDirectory(prefix="xfer-inventory-") as tmp:
            path = os.path.join(tmp, "data")
            storage.download_file(data_file.uri, path)
            _check(data_file, path, inv.uri)
            read = _csv_rows if inv.file_format == "CSV" else _parquet_rows
            rows = read(inv, path, data_file.uri)
            for bucket, key, size, latest, deleted in rows:
                if latest is False or deleted is True:
                    continue
                if bucket != inv.source_bucket:
                    raise DataError(
                        f"{inv.uri}: {data_file.uri} lists s3://{bucket}/{key}, outside the "
                        f"inventory's source bucket {inv.source_bucket}"
                    )
                yield Listed(bucket, key, size)


def _check(data_file: DataFile, path: str, manifest: str) -> None:
    """The downloaded data file is the one the manifest describes (size, then MD5)."""
    size = os.path.getsize(path)
    if data_file.size is not None and size != data_file.size:
        raise DataError(
            f"{manifest}: {data_file.uri} has {size} bytes, the manifest says {data_file.size}"
        )
    if data_file.md5:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != data_file.md5.lower():
            raise DataError(
                f"{manifest}: {data_file.uri} has MD5 {digest.hexdigest()}, the manifest says "
                f"{data_file.md5}: the file changed or is incomplete"
            )


Row = tuple[str, str, "int | None", "bool | None", "bool | None"]


def _csv_rows(inv: Inventory, path: str, uri: str) -> Iterator[Row]:
    at = {name: i for i, name in enumerate(inv.columns)}
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            for n, row in enumerate(csv.reader(f), start=1):
                if len(row) != len(inv.columns):
                    raise DataError(
                        f"row {n} has {len(row)} fields, fileSchema names {len(inv.columns)}"
                    )
                yield (
                    row[at["Bucket"]],
                    unquote_plus(row[at["Key"]]),
                    _int(row[at["Size"]]) if "Size" in at else None,
                    _flag(row[at["IsLatest"]]) if "IsLatest" in at else None,
                    _flag(row[at["IsDeleteMarker"]]) if "IsDeleteMarker" in at else None,
                )
    except (OSError, EOFError, UnicodeDecodeError, csv.Error, DataError) as exc:
        raise DataError(f"{inv.uri}: cannot read the CSV data file {uri}: {exc}") from None


def _parquet_rows(inv: Inventory, path: str, uri: str) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        present = [c for c in PARQUET_COLUMNS if c in parquet.schema_arrow.names]
        if not {"bucket", "key"} <= set(present):
            raise DataError(f"no bucket and key columns (it has {parquet.schema_arrow.names})")
        for batch in parquet.iter_batches(columns=present, batch_size=65536):
            cols: dict[str, Any] = {c: batch.column(c).to_pylist() for c in present}
            none = [None] * batch.num_rows
            yield from zip(
                cols["bucket"],
                cols["key"],
                cols.get("size", none),
                cols.get("is_latest", none),
                cols.get("is_delete_marker", none),
                strict=True,
            )
    except (OSError, pa.ArrowException, DataError) as exc:
        raise DataError(f"{inv.uri}: cannot read the Parquet data file {uri}: {exc}") from None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _flag(value: str) -> bool | None:
    text = value.strip().lower()
    return True if text == "true" else False if text == "false" else None
