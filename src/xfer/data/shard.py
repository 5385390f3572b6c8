"""`xfer shard SRC DEST`: images -> Parquet shards + manifest.json, in parallel on Ray.

    xfer shard s3://bucket/raw/pets s3://bucket/datasets/pets --max-side 256
    xfer shard labels.csv s3://bucket/datasets/pets        # CSV/Parquet with uri,label

How it runs, and why:
1. List the inputs (a class-per-folder tree, or a ``uri,label`` list). Each input has
   a stable key (its path under SRC, or its URI); the split is a hash of the key, so a
   re-run on the same input gives the same split, the same shards, the same manifest.
2. Ray tasks read, check and normalise the images in chunks (order: by key hash, so
   classes mix), writing *pieces* to a staging prefix. The driver only ever holds
   small per-row metadata, never image bytes: memory stays bounded at any size.
3. The driver rejects what must go (bad files; the same content under two labels;
   exact duplicates) and fails, committing nothing, if too much was rejected.
4. Ray tasks assemble the pieces into final shards with equal row counts (+-1), so
   workers get equal work, then everything is committed with the manifest last.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from xfer.config import ShardConfig
from xfer.data import inputs
from xfer.data.manifest import MANIFEST, SCHEMA_VERSION, Manifest, ShardInfo, SplitInfo
from xfer.data.shardtasks import assemble_shard, process_chunk
from xfer.errors import DataError, StorageError
from xfer.store import commit, s3, storage

SPLITS = ("train", "val", "test")
REJECTS = "rejects.parquet"


@dataclass(frozen=True)
class Item:
    key: str
    uri: str
    label: str
    split: str
    order: str  # sha256 of the key: the deterministic processing order


@dataclass
class ShardSummary:
    dest: str
    inputs: int
    rows: dict[str, int]
    shards: dict[str, int]
    rejected: Counter[str]
    seconds: float
    classes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [
            f"sharded {self.inputs} inputs into {self.dest} in {self.seconds:.1f}s "
            f"({self.inputs / max(self.seconds, 1e-9):.0f} files/s)",
            f"  classes: {', '.join(self.classes)}",
        ]
        for split, n in self.rows.items():
            lines.append(f"  {split}: {n} rows in {self.shards[split]} shard(s)")
        total = sum(self.rejected.values())
        lines.append(f"  rejected: {total}" + (f" (see {self.dest}/{REJECTS})" if total else ""))
        for reason, n in self.rejected.most_common(10):
            lines.append(f"    {n:6d}  {reason}")
        return "\n".join(lines)


# ------------------------------------------------------------------ inputs


def _hash_unit(key: str) -> tuple[str, float]:
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return digest, int(digest[:15], 16) / float(16**15)


def _split_for(unit: float, fractions: tuple[float, ...]) -> str:
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if unit < edge:
            return name
    return SPLITS[0] if fractions[0] >= 1 else SPLITS[-1]


def _generic_reason(reason: str) -> str:
    """Group reasons for the summary: 'truncated ... (details)' -> 'truncated ...'."""
    return reason.split(" (")[0].split(": ")[0]


def list_inputs(
    src: str, fractions: tuple[float, ...], allow_outside: bool = False
) -> tuple[list[Item], list[dict[str, str]]]:
    """Inputs and early rejects, from a folder tree or a uri,label list."""
    src = src.rstrip("/")
    if inputs.is_list(src):
        found = inputs.read_list(src, labelled=True, allow_outside=allow_outside)
    else:
        found = inputs.class_tree(src)
    items, rejects = [], []
    for found_input in found:
        key, uri, label = found_input.key, found_input.uri, found_input.label
        if label is None:
            rejects.append({"key": key, "source_uri": uri, "reason": "not inside a class folder"})
            continue
        order, unit = _hash_unit(key)
        items.append(Item(key, uri, label, _split_for(unit, fractions), order))
    if not items:
        raise DataError(f"no images found under {src}")
    return items, rejects


# -------------------------------------------------------------- driver


def _dedupe(accepted: list[dict[str, Any]]) -> dict[str, str]:
    """key -> reason, for rows that must go: conflicting labels, exact duplicates."""
    by_hash: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in accepted:
        by_hash[row["sha256"]].append(row)
    drop: dict[str, str] = {}
    for rows in by_hash.values():
        if len(rows) < 2:
            continue
        rows = sorted(rows, key=lambda r: r["key"])
        labels = sorted({r["label"] for r in rows})
        if len(labels) > 1:
            for r in rows:
                others = ", ".join(o["key"] for o in rows if o is not r)
                drop[r["key"]] = (
                    f"same content under different labels ({' / '.join(labels)}): also {others}"
                )
        else:
            for r in rows[1:]:
                drop[r["key"]] = f"duplicate of {rows[0]['key']} (same content, same label)"
    return drop


def _plan_shards(rows: list[dict[str, Any]], target_bytes: float) -> list[list[dict[str, Any]]]:
    """Split rows (in order) into k shards with equal counts (+-1)."""
    total = sum(r["bytes"] for r in rows)
    k = max(1, min(len(rows), math.ceil(total / target_bytes)))
    return [rows[i * len(rows) // k : (i + 1) * len(rows) // k] for i in range(k)]


def _segments(
    rows: list[dict[str, Any]], class_ids: dict[str, int]
) -> list[tuple[str, list[int], list[int]]]:
    segments: list[tuple[str, list[int], list[int]]] = []
    for row in rows:
        if segments and segments[-1][0] == row["piece"]:
            segments[-1][1].append(row["piece_row"])
            segments[-1][2].append(class_ids[row["label"]])
        else:
            segments.append((row["piece"], [row["piece_row"]], [class_ids[row["label"]]]))
    return segments


def _read_and_check(items: list[Item], settings: ShardConfig, staging: str) -> list[dict[str, Any]]:
    """Stage 2: Ray tasks read, check and normalise the images in chunks, in processing
    order, writing pieces under ``staging``; per-row metadata comes back."""
    from xfer.raycluster import run_tasks

    items.sort(key=lambda i: i.order)
    n = settings.files_per_task
    chunks = [items[i : i + n] for i in range(0, len(items), n)]
    calls = [
        (ci, chunk, settings.image_settings(), staging, settings.row_group_rows)
        for ci, chunk in enumerate(chunks)
    ]
    parts = run_tasks(
        process_chunk, calls, "shard: read and check", max_in_flight=settings.num_tasks
    )
    return [row for part in parts for row in part]


def _sort_out(
    meta: list[dict[str, Any]],
    early: list[dict[str, str]],
    total: int,
    settings: ShardConfig,
    dest: str,
) -> tuple[list[dict[str, Any]], list[dict[str, str]], Counter[str]]:
    """Stage 3: the rows kept, the rejects (bad files, conflicting labels, duplicates)
    and their count by reason. Too many rejects: DataError, nothing written."""
    rejects = list(early) + [
        {"key": r["key"], "source_uri": r["source_uri"], "reason": r["reason"]}
        for r in meta
        if r["reason"]
    ]
    accepted = [r for r in meta if not r["reason"]]
    drop = _dedupe(accepted)
    rejects += [
        {"key": r["key"], "source_uri": r["source_uri"], "reason": drop[r["key"]]}
        for r in accepted
        if r["key"] in drop
    ]
    reasons = Counter(_generic_reason(r["reason"]) for r in rejects)
    fraction = len(rejects) / max(total, 1)
    if fraction > settings.max_rejected_fraction:
        examples = ", ".join(f"{r['source_uri']} ({r['reason']})" for r in rejects[:3])
        summary = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
        raise DataError(
            f"{len(rejects)} of {total} inputs rejected ({fraction:.1%}), above "
            f"--max-rejected-fraction {settings.max_rejected_fraction:.1%}; nothing was "
            f"written to {dest}; by reason: {summary}; first: {examples}"
        )
    return [r for r in accepted if r["key"] not in drop], rejects, reasons


def _write_shards(
    kept: list[dict[str, Any]], classes: list[str], settings: ShardConfig, final: str
) -> dict[str, SplitInfo]:
    """Stage 4: Ray tasks assemble the kept rows' pieces into each split's shards
    (equal row counts, +-1) under ``final``; the splits as the manifest lists them."""
    from xfer.raycluster import run_tasks

    class_ids = {c: i for i, c in enumerate(classes)}
    plans: list[tuple[str, int, list[dict[str, Any]]]] = []
    for split in SPLITS:
        rows = [r for r in kept if r["split"] == split]  # already in processing order
        if rows:
            shards = _plan_shards(rows, settings.target_shard_mb * 1e6)
            plans += [(split, i, shard_rows) for i, shard_rows in enumerate(shards)]
    calls = [
        (
            _segments(rows, class_ids),
            storage.join(final, split, f"part-{i:05d}.parquet"),
            settings.row_group_rows,
        )
        for split, i, rows in plans
    ]
    infos = run_tasks(
        assemble_shard, calls, "shard: write shards", max_in_flight=settings.num_tasks
    )
    splits: dict[str, SplitInfo] = {}
    for (split, i, rows), info in zip(plans, infos, strict=True):
        entry = splits.setdefault(split, SplitInfo(rows=0, shards=[], class_counts={}))
        entry.shards.append(ShardInfo(path=f"{split}/part-{i:05d}.parquet", **info))
        for c, k in Counter(r["label"] for r in rows).items():
            entry.class_counts[c] = entry.class_counts.get(c, 0) + k
    return {
        s: SplitInfo(
            rows=sum(sh.rows for sh in v.shards),
            shards=v.shards,
            class_counts=dict(sorted(v.class_counts.items())),
        )
        for s, v in splits.items()
    }


def _classes(items: list[Item], src: str) -> list[str]:
    classes = sorted({i.label for i in items})
    if len(classes) < 2:
        raise DataError(
            f"{src}: found {len(classes)} class(es) ({', '.join(classes)}); need at least 2"
        )
    return classes


def shard_dataset(src: str, dest: str, settings: ShardConfig | None = None) -> ShardSummary:
    """Shard ``src`` into ``dest``; see the module docstring for the stages."""
    from xfer.raycluster import ensure_ray

    settings = settings or ShardConfig()
    start = time.monotonic()
    dest = dest.rstrip("/")
    items, early_rejects = list_inputs(src, settings.split_fractions, settings.allow_outside_inputs)
    classes = _classes(items, src)
    total_inputs = len(items) + len(early_rejects)
    s3.ensure_bucket(dest)
    check_destination(dest)
    ensure_ray()
    staging = commit.staging_prefix(dest)
    final_staging = storage.join(staging, "final")
    try:
        meta = _read_and_check(items, settings, staging)
        kept, rejects, reasons = _sort_out(meta, early_rejects, total_inputs, settings, dest)
        if not kept:
            raise DataError(f"every input under {src} was rejected")
        splits = _write_shards(kept, classes, settings, final_staging)
        rejects_sha = _write_rejects(rejects, storage.join(final_staging, REJECTS))
        version, splits = _in_version_folder(splits, rejects_sha)
        manifest = Manifest(
            name=settings.name or storage.basename(dest),
            classes=classes,
            splits=splits,
            source={"uri": src, "inputs": total_inputs},
            settings=settings.recorded(),
            rejected={
                "count": len(rejects),
                "by_reason": dict(sorted(reasons.items())),
                "converted_to_rgb": sum(1 for r in kept if r.get("converted_from")),
                "list": f"{version}/{REJECTS}",
            },
            schema_version=SCHEMA_VERSION,
        )
    except BaseException:
        with contextlib.suppress(StorageError):
            storage.delete_prefix(staging)  # nothing was committed: the staging is scratch
        raise
    # A commit that fails keeps its staging (the old dataset is still whole; see commit).
    commit.commit_prefix(
        final_staging, dest, marker=MANIFEST, marker_body=manifest.to_json(), into=version
    )
    storage.delete_prefix(staging)
    return ShardSummary(
        dest=dest,
        inputs=total_inputs,
        rows={s: v.rows for s, v in splits.items()},
        shards={s: len(v.shards) for s, v in splits.items()},
        rejected=reasons,
        seconds=time.monotonic() - start,
        classes=classes,
    )


def _in_version_folder(
    splits: dict[str, SplitInfo], rejects_sha: str
) -> tuple[str, dict[str, SplitInfo]]:
    """The new dataset's folder, named by its content, and the shards moved into it:
    the new files never overwrite what the old manifest names."""
    version = commit.version_name(
        rejects_sha, *(f"{s.path}:{s.sha256}" for v in splits.values() for s in v.shards)
    )
    moved = {
        name: dataclasses.replace(
            v, shards=[dataclasses.replace(s, path=f"{version}/{s.path}") for s in v.shards]
        )
        for name, v in splits.items()
    }
    return version, moved


def check_destination(dest: str) -> None:
    """Refuse a destination that holds something other than one xfer dataset.

    Committing a dataset deletes what its new manifest does not name, so ``dest``
    must be empty, a dataset (``manifest.json`` at its top), or hold only the version
    folders a crashed commit left there. ``s3://b/datasets`` (the folder of all the
    datasets) is none of these.
    """
    if storage.exists(storage.join(dest, MANIFEST)):
        return
    base = dest.rstrip("/") + "/"
    for info in storage.iter_files(dest):
        top = info.uri[len(base) :].split("/", 1)[0]
        if not commit.is_version_name(top):
            raise DataError(
                f"{dest} is not empty and is not a dataset (no {MANIFEST}; it holds "
                f"{info.uri}): sharding into it would replace what is there. Give the "
                f"dataset's own prefix, e.g. {storage.join(dest, '<name>')}"
            )


def _write_rejects(rejects: list[dict[str, str]], uri: str) -> str:
    """Write the rejects list; returns a digest of its rows."""
    import pyarrow as pa

    rows = sorted(rejects, key=lambda r: r["key"])
    table = pa.table(
        {
            "key": [r["key"] for r in rows],
            "source_uri": [r["source_uri"] for r in rows],
            "reason": [r["reason"] for r in rows],
        },
        schema=pa.schema(
            [("key", pa.string()), ("source_uri", pa.string()), ("reason", pa.string())]
        ),
    )
    storage.write_parquet(table, uri)
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
