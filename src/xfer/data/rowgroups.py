"""Reading row groups of a dataset's Parquet shards: the one read the data paths share.

    table = read_row_groups(uri, [3], ["key", "image", "label"], files)   # kept open
    table = read_row_groups(uri, [0, 1, 2], ["key", "image", "label"])    # opened once

The training reader (:mod:`xfer.data.reader`), the feature-cache build
(:mod:`xfer.data.featurebuild`) and scoring a dataset (:func:`xfer.scoring.scoreplan.block_items`)
all read whole row groups of a few columns, streamed from storage (no full download)
and retried through a store outage (:mod:`xfer.store.retry`) as one step. A caller that
reads many row groups of the same shards passes ``files``, a dict of open
``ParquetFile`` objects by URI that it keeps (one per thread: a ``ParquetFile`` is not
safe for concurrent reads), so each footer is fetched once; without it this is
:func:`xfer.store.storage.read_row_groups`, the file opened for the read and closed. ``benchmarks/bench_rowgroups.py`` measures
this read against the three it replaced.
"""

from __future__ import annotations

from typing import Any

from xfer.store import s3, storage
from xfer.store.retry import ride_through


@ride_through("reading")
def read_row_groups(
    uri: str, groups: list[int], columns: list[str], files: dict[str, Any] | None = None
) -> Any:
    """Row groups ``groups`` of the Parquet file ``uri``, ``columns`` only, as one table."""
    if files is None:  # the store's own read: opened, read, closed
        return storage.read_row_groups(uri, groups, columns)
    with s3.translate_errors(uri):
        parquet_file = files.get(uri)
        if parquet_file is None:
            parquet_file = files[uri] = storage.open_parquet(uri)
        return parquet_file.read_row_groups(groups, columns=columns)
