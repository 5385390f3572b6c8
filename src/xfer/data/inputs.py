"""Where raw images come from: a folder tree or prefix, or a CSV/Parquet list of URIs.

Sharding (:mod:`xfer.data.shard`) and scoring (:mod:`xfer.scoring.scoreplan`) both take their
inputs from here, so that the same source means the same images to both:

- a prefix (local folder or ``s3://``): every object under it, keyed by its path
  under the prefix; for sharding, the first folder is the class;
- an S3 Inventory report's ``manifest.json`` (:mod:`xfer.store.inventory`, scoring only): every
  object it lists, keyed by its key in its bucket;
- a ``.csv`` or ``.parquet`` list with a ``uri`` column (and ``label`` for
  sharding): a relative URI is relative to the list's own folder, and the key is
  the URI as the list gives it. Labels are read as text (``01`` stays ``01``, ``NA``
  is a label). A row naming an object outside the list's folder (``../``, an
  absolute path, another bucket) is refused unless ``allow_outside`` (the
  ``allow_outside_inputs`` key): a list is often written by someone other than the
  job's owner, and must not make the job read whatever its credentials can.

Hidden files (a path part starting with ``.``) and OS litter are never inputs.
"""

from __future__ import annotations

import io
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from xfer.errors import DataError, NotFoundError
from xfer.store import inventory, s3, storage
from xfer.store.uris import is_uri

LIST_SUFFIXES = (".csv", ".parquet")
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Input:
    key: str  # stable: the path under the prefix, or the URI as the list gives it
    uri: str  # where to read it
    label: str | None = None  # a class folder's or a list's label; None when there is none
    size: int | None = None  # bytes, when the listing said (a prefix); None from a list


def is_list(uri: str) -> bool:
    return uri.lower().endswith(LIST_SUFFIXES)


def _skipped(rel: str, also: tuple[str, ...] = ()) -> bool:
    parts = rel.split("/")
    return (
        any(p.startswith(".") for p in parts)
        or parts[-1] in IGNORED_NAMES
        or (bool(also) and parts[-1].startswith(also))
    )


def class_tree(src: str) -> list[Input]:
    """Every file under ``src``; its first folder is its class (None at the top level)."""
    try:
        files = storage.list_files(src)
    except NotFoundError:
        raise DataError(f"source not found: {src}") from None
    base = src + "/"
    out = []
    for info in files:
        rel = info.uri[len(base) :] if info.uri.startswith(base) else storage.basename(info.uri)
        if not _skipped(rel):
            parts = rel.split("/")
            out.append(Input(rel, info.uri, parts[0] if len(parts) >= 2 else None))
    return out


def under_prefix(uri: str) -> Iterator[Input]:
    """The objects under a prefix, page by page (never all held at once).

    Names starting with ``_`` are skipped too: markers and reports of other jobs.
    """
    base = uri + "/"
    try:
        for f in storage.iter_files(uri):
            rel = f.uri[len(base) :] if f.uri.startswith(base) else f.uri
            if not _skipped(rel, also=("_",)):
                yield Input(rel, f.uri, size=f.size)
    except NotFoundError as exc:
        raise DataError(f"--input {uri}: {exc}") from None


def is_inventory(uri: str) -> bool:
    return inventory.is_inventory(uri)


def from_inventory(uri: str) -> Iterator[Input]:
    """The objects an S3 Inventory report lists, a data file at a time; "folder" keys
    (ending in ``/``) and names skipped under a prefix (hidden, ``_``) are skipped too."""
    try:
        for obj in inventory.objects(uri):
            if obj.key and not obj.key.endswith("/") and not _skipped(obj.key, also=("_",)):
                yield Input(obj.key, f"s3://{obj.bucket}/{obj.key}", size=obj.size)
    except NotFoundError as exc:
        raise DataError(f"--input {uri}: {exc}") from None


def read_list(uri: str, labelled: bool, allow_outside: bool = False) -> list[Input]:
    """The rows of a CSV/Parquet list; ``labelled`` lists need a ``label`` column too.

    Rows with an empty ``uri`` are left out; an empty label is None. A row outside
    the list's folder raises DataError unless ``allow_outside``.
    """
    table = _read_table(uri)
    needed = ("uri", "label") if labelled else ("uri",)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        needs = "uri,label" if labelled else "a uri column"
        raise DataError(f"{uri} needs {needs} (missing: {', '.join(sorted(missing))})")
    base = storage.parent(uri)
    labels = table.column("label").to_pylist() if labelled else [None] * table.num_rows
    out = []
    for row, (given, label) in enumerate(
        zip(table.column("uri").to_pylist(), labels, strict=True), start=1
    ):
        if given is None or str(given).strip() == "":
            continue
        given = str(given).strip()
        full = given if is_uri(given) else storage.join(base, given)
        if not allow_outside and not _inside(full, base):
            section = "shard" if labelled else "score"
            raise DataError(
                f"{uri} row {row}: {given!r} is outside the list's folder {base}/ "
                f"(set {section}.allow_outside_inputs=true to read it)"
            )
        out.append(Input(given, full, None if label is None or str(label) == "" else str(label)))
    return out


def _read_table(uri: str) -> Any:
    """The list as a table; CSV columns as text, so labels such as ``01`` keep their form."""
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    try:
        if uri.lower().endswith(".csv"):
            text = pacsv.ConvertOptions(
                column_types={"uri": pa.string(), "label": pa.string()},
                strings_can_be_null=False,
            )
            return pacsv.read_csv(io.BytesIO(data), convert_options=text)
        return pq.read_table(io.BytesIO(data))
    except Exception as exc:
        raise DataError(f"cannot read the list {uri}: {exc}") from None


def _inside(full: str, base: str) -> bool:
    """Whether ``full`` is under the folder ``base`` once ``.``/``..`` are resolved."""
    if s3.is_s3(full) != s3.is_s3(base):
        return False
    if s3.is_s3(full):
        (bucket, key), (base_bucket, base_key) = s3.split_s3(full), s3.split_s3(base)
        key, base_key = posixpath.normpath("/" + key), posixpath.normpath("/" + base_key)
        return bucket == base_bucket and key.startswith(base_key.rstrip("/") + "/")
    path = os.path.abspath(s3.local_path(full))
    folder = os.path.abspath(s3.local_path(base))
    return path.startswith(folder.rstrip(os.sep) + os.sep)
