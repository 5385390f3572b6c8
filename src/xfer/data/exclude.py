"""``data.exclude``: keys a training run leaves out of every split, read once on the driver.

    exclusion = load_exclusion(cfg.data.exclude, manifest)   # None when no list is set
    ReaderSpec(manifest, "train", ..., exclude=exclusion.of("train"))

The list is what ``xfer audit`` writes (``issues.csv`` / ``issues.parquet``, filtered
by a team): a CSV or Parquet file with a ``key`` column (other columns are ignored),
or a text file with one key per line; ``.csv`` and ``.parquet`` by their extension,
anything else by its content. A key is the row key ``xfer shard`` stores (the image's
path under the source, or its URI).

The driver reads the list, then the ``key`` column of every shard, and turns it into
what each split leaves out: the keys, and how many rows each row group loses. The
reader's equal-steps plan (docs/design.md, decision 3) counts the rows that remain,
so every worker runs the same number of steps; the counts apply to the feature cache
as they are, since its row groups mirror the dataset's. Keys the dataset does not
hold are counted and warned about once (a list made for another dataset).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xfer.data.manifest import Manifest
from xfer.errors import ConfigError, DataError, NotFoundError, StoreUnavailable
from xfer.store import storage


@dataclass(frozen=True)
class SplitExclusion:
    """What one split leaves out: its keys, and the rows each row group loses (in the
    manifest's order of shards and row groups)."""

    keys: tuple[str, ...]
    per_group: tuple[int, ...]


@dataclass(frozen=True)
class Exclusion:
    uri: str
    sha256: str  # of the list's bytes: a resumed run must leave out the same keys
    listed: int  # distinct keys in the list
    splits: dict[str, SplitExclusion]
    not_in_dataset: int

    def of(self, split: str) -> SplitExclusion | None:
        found = self.splits.get(split)
        return found if found is not None and found.keys else None

    def keys_of(self, split: str) -> tuple[str, ...]:
        found = self.of(split)
        return found.keys if found is not None else ()

    def lineage(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "sha256": self.sha256,
            "keys": self.listed,
            "excluded": {name: len(s.keys) for name, s in self.splits.items()},
            "not_in_dataset": self.not_in_dataset,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.lineage(),
            "splits": {
                name: {"keys": list(s.keys), "per_group": list(s.per_group)}
                for name, s in self.splits.items()
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Exclusion:
        splits = {
            name: SplitExclusion(tuple(s["keys"]), tuple(s["per_group"]))
            for name, s in d["splits"].items()
        }
        return cls(d["uri"], d["sha256"], d["keys"], splits, d["not_in_dataset"])


def load_exclusion(uri: str | None, manifest: Manifest) -> Exclusion | None:
    """The list at ``uri`` resolved against the dataset's shards; None without a list."""
    if not uri:
        return None
    data = _read(uri)
    wanted = set(parse_keys(uri, data))
    splits: dict[str, SplitExclusion] = {}
    found: set[str] = set()
    for name in manifest.splits:
        splits[name] = _split_exclusion(manifest, name, wanted)
        found.update(splits[name].keys)
    if "train" in splits and len(splits["train"].keys) >= manifest.split("train").rows:
        raise DataError(f"data.exclude={uri} leaves no training rows in {manifest.uri}")
    exclusion = Exclusion(
        uri, hashlib.sha256(data).hexdigest(), len(wanted), splits, len(wanted - found)
    )
    counts = ", ".join(f"{n} {len(s.keys)}" for n, s in splits.items())
    print(f"[xfer] data.exclude {uri}: {len(wanted)} key(s); leaving out {counts}", flush=True)
    if exclusion.not_in_dataset:
        print(
            f"[xfer] warning: data.exclude {uri}: {exclusion.not_in_dataset} of its "
            f"{len(wanted)} key(s) are not in the dataset {manifest.uri} (a list made for "
            "another dataset?)",
            file=sys.stderr,
            flush=True,
        )
    return exclusion


def _read(uri: str) -> bytes:
    try:
        return storage.read_bytes(uri)
    except StoreUnavailable:
        raise
    except NotFoundError:
        raise ConfigError(f"data.exclude: no list at {uri}") from None
    except Exception as exc:  # access denied, a folder, ...: the one line names the URI
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"data.exclude: cannot read {uri}: {first}") from None


def parse_keys(uri: str, data: bytes) -> list[str]:
    """The keys of a CSV or Parquet list (its ``key`` column) or of a text file."""
    name = uri.lower().rstrip("/")
    try:
        if name.endswith(".parquet") or data[:4] == b"PAR1":
            return _parquet_keys(uri, data)
        text = data.decode("utf-8-sig")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"data.exclude: {uri} is not a readable list: {exc}") from None
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if name.endswith(".csv") or first == "key" or first.startswith("key,"):
        return _csv_keys(uri, text)
    return [line.strip() for line in lines if line.strip()]


def _parquet_keys(uri: str, data: bytes) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(pa.BufferReader(data))
    if "key" not in schema.names:
        raise ConfigError(
            f"data.exclude: {uri} has no 'key' column (columns: {', '.join(schema.names)})"
        )
    column = pq.read_table(pa.BufferReader(data), columns=["key"]).column("key")
    return [str(k).strip() for k in column.to_pylist() if k is not None and str(k).strip()]


def _csv_keys(uri: str, text: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "key" not in columns:
        raise ConfigError(
            f"data.exclude: {uri} has no 'key' column (columns: {', '.join(columns) or 'none'})"
        )
    reader.fieldnames = columns
    return [row["key"].strip() for row in reader if (row.get("key") or "").strip()]


def _split_exclusion(manifest: Manifest, split: str, wanted: set[str]) -> SplitExclusion:
    """Which keys of ``split`` are listed, and how many rows each row group loses."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    values = pa.array(sorted(wanted), pa.string())
    shards = manifest.split(split).shards
    uris = manifest.shard_uris(split)
    with ThreadPoolExecutor(max_workers=8) as pool:
        columns = list(pool.map(lambda u: storage.read_parquet(u, ["key"]).column("key"), uris))
    keys: list[str] = []
    per_group: list[int] = []
    for shard, column in zip(shards, columns, strict=True):
        mask = pc.is_in(column, value_set=values).to_numpy(zero_copy_only=False)
        bounds = np.cumsum([0, *(shard.row_groups or [shard.rows])])
        per_group.extend(int(mask[a:b].sum()) for a, b in itertools.pairwise(bounds))
        keys.extend(column.filter(pa.array(mask)).to_pylist())
    return SplitExclusion(tuple(keys), tuple(per_group))


def check_same_exclusion(run_uri: str, exclusion: Exclusion | None) -> None:
    """A resumed run leaves out the keys it started without (the list's sha256)."""
    from xfer.train.journal import recorded_dataset

    started = (recorded_dataset(run_uri) or {}).get("exclude_sha256")
    now = exclusion.sha256 if exclusion is not None else None
    if started is None or started == now:
        return
    raise DataError(
        f"output.run_id={storage.basename(run_uri)}: the data.exclude list "
        f"{exclusion.uri if exclusion else ''} changed since the run started (sha256 "
        f"{started[:12]} then, {str(now)[:12]} now): a resumed run leaves out the keys it "
        "started without; restore that list or start a new run"
    )
