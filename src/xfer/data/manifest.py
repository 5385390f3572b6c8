"""`manifest.json`: the contract between `xfer shard` and the jobs that read shards.

    <dataset>/manifest.json
    <dataset>/<split>/part-00000.parquet   key, image, label, source_uri, sha256, width, height

The manifest lists classes (ids are positions in the sorted class list, stable for a
given set of classes), splits with their shards (relative path, rows, bytes, sha256)
and per-class counts, the source and the settings used, and a summary of rejected
inputs. It is written last, so a dataset without it is incomplete. Its ``checksum``
(sha256 of its canonical JSON) identifies the dataset in lineage and caches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from xfer.errors import DataError, NotFoundError
from xfer.store import storage

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARD_COLUMNS = ("key", "image", "label", "source_uri", "sha256", "width", "height")


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the dataset prefix
    rows: int
    bytes: int
    sha256: str
    row_groups: list[int] = field(default_factory=list)  # rows per row group


@dataclass(frozen=True)
class SplitInfo:
    rows: int
    shards: list[ShardInfo]
    class_counts: dict[str, int]


@dataclass(frozen=True)
class Manifest:
    name: str
    classes: list[str]
    splits: dict[str, SplitInfo]
    source: dict[str, Any]
    settings: dict[str, Any]
    rejected: dict[str, Any]
    schema_version: int = SCHEMA_VERSION
    uri: str = ""  # where it was read from (the dataset prefix); not stored

    # ----------------------------------------------------------- accessors

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(
                f"dataset {self.uri or self.name} has no split {name!r} (has: {', '.join(self.splits)})"
            )
        return self.splits[name]

    def shard_uris(self, split: str) -> list[str]:
        return [storage.join(self.uri, s.path) for s in self.split(split).shards]

    # ------------------------------------------------------- serialisation

    def body(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("uri")
        return d

    @property
    def checksum(self) -> str:
        canonical = json.dumps(self.body(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> bytes:
        d = self.body()
        d["checksum"] = self.checksum
        return (json.dumps(d, indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_dict(cls, d: dict[str, Any], uri: str = "") -> Manifest:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(
                f"{uri or 'manifest'}: schema_version {version!r} is not supported "
                f"(this xfer reads version {SCHEMA_VERSION}); re-run `xfer shard`"
            )
        try:
            splits = {
                name: SplitInfo(
                    rows=int(s["rows"]),
                    shards=[ShardInfo(**sh) for sh in s["shards"]],
                    class_counts={k: int(v) for k, v in s["class_counts"].items()},
                )
                for name, s in d["splits"].items()
            }
            m = cls(
                name=d["name"],
                classes=list(d["classes"]),
                splits=splits,
                source=d.get("source", {}),
                settings=d.get("settings", {}),
                rejected=d.get("rejected", {}),
                schema_version=version,
                uri=uri,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(
                f"{uri or 'manifest'} is malformed: {type(exc).__name__}: {exc}"
            ) from None
        stored = d.get("checksum")
        if stored and stored != m.checksum:
            raise DataError(
                f"{uri}/{MANIFEST}: checksum mismatch (the manifest was edited or damaged)"
            )
        return m


def load_manifest(dataset_uri: str) -> Manifest:
    """Read ``<dataset_uri>/manifest.json``; a clear error if the dataset is missing."""
    dataset_uri = dataset_uri.rstrip("/")
    if dataset_uri.endswith("/" + MANIFEST):
        dataset_uri = storage.parent(dataset_uri)
    try:
        data = storage.read_json(storage.join(dataset_uri, MANIFEST))
    except NotFoundError as exc:
        raise DataError(
            f"no dataset at {dataset_uri}: {MANIFEST} not found ({exc}); create it with `xfer shard`"
        ) from None
    return Manifest.from_dict(data, uri=dataset_uri)
