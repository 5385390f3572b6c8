"""Where raw images come from: a folder tree or prefix, or a CSV/Parquet list of URIs.

Sharding (:mod:`xfer.shard`) and scoring (:mod:`xfer.scoreplan`) both take their
inputs from here, so that the same source means the same images to both:

- a prefix (local folder or ``s3://``): every object under it, keyed by its path
  under the prefix; for sharding, the first folder is the class;
- a ``.csv`` or ``.parquet`` list with a ``uri`` column (and ``label`` for
  sharding): a relative URI is relative to the list's own folder, and the key is
  the URI as the list gives it.

Hidden files (a path part starting with ``.``) and OS litter are never inputs.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

from xfer import s3, storage
from xfer.errors import DataError, NotFoundError

LIST_SUFFIXES = (".csv", ".parquet")
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class Input:
    key: str  # stable: the path under the prefix, or the URI as the list gives it
    uri: str  # where to read it
    label: str | None = None  # a class folder's or a list's label; None when there is none


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
                yield Input(rel, f.uri)
    except NotFoundError as exc:
        raise DataError(f"--input {uri}: {exc}") from None


def read_list(uri: str, labelled: bool) -> list[Input]:
    """The rows of a CSV/Parquet list; ``labelled`` lists need a ``label`` column too.

    Rows with an empty ``uri`` are left out; an empty label is None.
    """
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    try:
        if uri.lower().endswith(".csv"):
            table = pacsv.read_csv(io.BytesIO(data))
        else:
            table = pq.read_table(io.BytesIO(data))
    except Exception as exc:
        raise DataError(f"cannot read the list {uri}: {exc}") from None
    needed = ("uri", "label") if labelled else ("uri",)
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        needs = "uri,label" if labelled else "a uri column"
        raise DataError(f"{uri} needs {needs} (missing: {', '.join(sorted(missing))})")
    base = storage.parent(uri)
    labels = table.column("label").to_pylist() if labelled else [None] * table.num_rows
    out = []
    for given, label in zip(table.column("uri").to_pylist(), labels, strict=True):
        if given is None or str(given).strip() == "":
            continue
        given = str(given).strip()
        full = given if s3.is_s3(given) or given.startswith("/") else storage.join(base, given)
        out.append(Input(given, full, None if label is None or str(label) == "" else str(label)))
    return out
