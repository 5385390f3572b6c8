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

import hashlib
import math
import os
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from xfer import storage
from xfer.errors import DataError, NotFoundError, XferError
from xfer.images import Accepted, ImageSettings, check_image
from xfer.manifest import MANIFEST, SCHEMA_VERSION, Manifest, ShardInfo, SplitInfo

SPLITS = ("train", "val", "test")
REJECTS = "rejects.parquet"
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class ShardSettings:
    split_fractions: tuple[float, ...] = (0.8, 0.1, 0.1)
    target_shard_mb: float = 96.0
    max_side: int | None = None
    jpeg_quality: int = 90
    max_pixels: int = 50_000_000
    max_rejected_fraction: float = 0.05
    num_tasks: int | None = None  # concurrent tasks; default: Ray's CPUs
    files_per_task: int = 256
    row_group_rows: int = 64
    name: str | None = None

    def __post_init__(self) -> None:
        f = self.split_fractions
        if len(f) != 3 or any(x < 0 for x in f) or not math.isclose(sum(f), 1.0, abs_tol=1e-6):
            raise XferError(f"--split needs three fractions train,val,test summing to 1 (got {f})")
        if f[0] <= 0:
            raise XferError("--split: the train fraction must be above 0")
        if self.target_shard_mb <= 0:
            raise XferError("--shard-size-mb must be positive")
        if self.max_side is not None and self.max_side < 16:
            raise XferError("--max-side must be at least 16 pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise XferError("--quality must be between 1 and 100")
        if not 0 <= self.max_rejected_fraction <= 1:
            raise XferError("--max-rejected-fraction must be between 0 and 1")

    def image_settings(self) -> ImageSettings:
        return ImageSettings(self.max_pixels, self.max_side, self.jpeg_quality)

    def recorded(self) -> dict[str, Any]:
        """What determines the output (recorded in the manifest)."""
        return {
            "split_fractions": list(self.split_fractions),
            "target_shard_mb": self.target_shard_mb,
            "max_side": self.max_side,
            "jpeg_quality": self.jpeg_quality,
            "max_pixels": self.max_pixels,
        }


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


def list_inputs(src: str, fractions: tuple[float, ...]) -> tuple[list[Item], list[dict[str, str]]]:
    """Inputs and early rejects, from a folder tree or a uri,label list."""
    src = src.rstrip("/")
    lower = src.lower()
    pairs = _read_list(src) if lower.endswith((".csv", ".parquet")) else _walk_tree(src)
    items, rejects = [], []
    for key, uri, label in pairs:
        if label is None:
            rejects.append({"key": key, "source_uri": uri, "reason": "not inside a class folder"})
            continue
        order, unit = _hash_unit(key)
        items.append(Item(key, uri, label, _split_for(unit, fractions), order))
    if not items:
        raise DataError(f"no images found under {src}")
    return items, rejects


def _walk_tree(src: str) -> list[tuple[str, str, str | None]]:
    try:
        files = storage.list_files(src)
    except NotFoundError:
        raise DataError(f"source not found: {src}") from None
    base = src + "/"
    out: list[tuple[str, str, str | None]] = []
    for info in files:
        rel = info.uri[len(base) :] if info.uri.startswith(base) else storage.basename(info.uri)
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or parts[-1] in IGNORED_NAMES:
            continue  # hidden files and OS litter are not inputs
        out.append((rel, info.uri, parts[0] if len(parts) >= 2 else None))
    return out


def _read_list(src: str) -> list[tuple[str, str, str | None]]:
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(src)
    try:
        if src.lower().endswith(".csv"):
            table = pacsv.read_csv(io.BytesIO(data))
        else:
            table = pq.read_table(io.BytesIO(data))
    except Exception as exc:
        raise DataError(f"cannot read the list {src}: {exc}") from None
    missing = {"uri", "label"} - set(table.column_names)
    if missing:
        raise DataError(f"{src} needs columns uri,label (missing: {', '.join(sorted(missing))})")
    base = storage.parent(src)
    out: list[tuple[str, str, str | None]] = []
    for uri, label in zip(
        table.column("uri").to_pylist(), table.column("label").to_pylist(), strict=True
    ):
        if uri is None or str(uri).strip() == "":
            continue
        uri = str(uri).strip()
        full = uri if storage.is_s3(uri) or uri.startswith("/") else storage.join(base, uri)
        out.append((uri, full, None if label is None or str(label) == "" else str(label)))
    return out


# ------------------------------------------------------ stage 1: pieces


def process_chunk(
    chunk_id: int,
    items: list[Item],
    image_settings: ImageSettings,
    staging: str,
    row_group_rows: int,
) -> list[dict[str, Any]]:
    """Read, check and normalise ``items``; write one staged piece per split.

    Returns one small metadata row per item (never image bytes).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta: list[dict[str, Any]] = []
    writers: dict[str, Any] = {}
    buffers: dict[str, list[dict[str, Any]]] = defaultdict(list)
    rows_in_piece: Counter[str] = Counter()
    schema = piece_schema()
    with tempfile.TemporaryDirectory(prefix="xfer-shard-") as tmp:

        def flush(split: str) -> None:
            if not buffers[split]:
                return
            if split not in writers:
                writers[split] = pq.ParquetWriter(os.path.join(tmp, f"{split}.parquet"), schema)
            writers[split].write_table(pa.Table.from_pylist(buffers[split], schema=schema))
            buffers[split].clear()

        for item in items:
            row = {
                "key": item.key,
                "source_uri": item.uri,
                "split": item.split,
                "label": item.label,
            }
            try:
                data = storage.read_bytes(item.uri)
            except storage.StorageError as exc:
                meta.append({**row, "reason": f"cannot read: {exc}", "sha256": None})
                continue
            result = check_image(data, image_settings)
            if not isinstance(result, Accepted):
                meta.append({**row, "reason": result.reason, "sha256": result.sha256})
                continue
            buffers[item.split].append(
                {
                    "key": item.key,
                    "image": result.image,
                    "source_uri": item.uri,
                    "sha256": result.sha256,
                    "width": result.width,
                    "height": result.height,
                }
            )
            piece_row = rows_in_piece[item.split]
            rows_in_piece[item.split] += 1
            meta.append(
                {
                    **row,
                    "reason": None,
                    "sha256": result.sha256,
                    "bytes": len(result.image),
                    "piece": storage.join(
                        staging, "pieces", item.split, f"chunk-{chunk_id:06d}.parquet"
                    ),
                    "piece_row": piece_row,
                    "converted_from": result.converted_from,
                }
            )
            if len(buffers[item.split]) >= row_group_rows:
                flush(item.split)
        for split in list(buffers):
            flush(split)
        for split, writer in writers.items():
            writer.close()
            storage.upload_file(
                os.path.join(tmp, f"{split}.parquet"),
                storage.join(staging, "pieces", split, f"chunk-{chunk_id:06d}.parquet"),
            )
    return meta


def piece_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("image", pa.binary()),
            ("source_uri", pa.string()),
            ("sha256", pa.string()),
            ("width", pa.int32()),
            ("height", pa.int32()),
        ]
    )


def shard_schema() -> Any:
    """The documented shard columns: a piece's, with the label id after the image."""
    import pyarrow as pa

    piece = piece_schema()
    return piece.insert(piece.get_field_index("image") + 1, pa.field("label", pa.int32()))


# ---------------------------------------------------- stage 2: shards


def assemble_shard(
    segments: list[tuple[str, list[int], list[int]]], dest_uri: str, row_group_rows: int
) -> dict[str, Any]:
    """Write one final shard from rows of staged pieces; returns its ShardInfo fields.

    ``segments``: (piece URI, row indices in the piece, label ids for those rows).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = shard_schema()
    row_groups: list[int] = []
    with tempfile.TemporaryDirectory(prefix="xfer-shard-") as tmp:
        path = os.path.join(tmp, "part.parquet")
        with pq.ParquetWriter(path, schema, compression="none") as writer:
            pending: list[Any] = []
            pending_rows = 0

            def flush() -> None:
                nonlocal pending, pending_rows
                if pending_rows:
                    writer.write_table(pa.concat_tables(pending), row_group_size=pending_rows)
                    row_groups.append(pending_rows)
                pending, pending_rows = [], 0

            for piece_uri, rows, labels in segments:
                piece = storage.read_parquet(piece_uri).take(pa.array(rows, pa.int64()))
                piece = piece.append_column("label", pa.array(labels, pa.int32())).select(
                    list(schema.names)
                )
                start = 0
                while start < piece.num_rows:
                    take = min(row_group_rows - pending_rows, piece.num_rows - start)
                    pending.append(piece.slice(start, take).cast(schema))
                    pending_rows += take
                    start += take
                    if pending_rows >= row_group_rows:
                        flush()
            flush()
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = os.path.getsize(path)
        storage.upload_file(path, dest_uri)
    return {
        "rows": sum(row_groups),
        "bytes": size,
        "sha256": digest.hexdigest(),
        "row_groups": row_groups,
    }


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


def _run_parallel(
    fn: Any, calls: list[tuple[Any, ...]], desc: str, num_cpus: float = 1
) -> list[Any]:
    """Run ``fn(*args)`` for each call as Ray tasks, with a progress bar, in order."""
    import ray

    from xfer.console import Progress

    remote = ray.remote(num_cpus=num_cpus, max_retries=2)(fn)
    refs = [remote.remote(*args) for args in calls]
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[Any] = [None] * len(refs)
    pending = list(refs)
    with Progress(desc, len(refs), unit="task") as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                bar.update()
    return results


def shard_dataset(src: str, dest: str, settings: ShardSettings | None = None) -> ShardSummary:
    """Shard ``src`` into ``dest``; see the module docstring for the stages."""
    from xfer.raycluster import ensure_ray

    settings = settings or ShardSettings()
    start = time.monotonic()
    dest = dest.rstrip("/")
    items, early_rejects = list_inputs(src, settings.split_fractions)
    classes = sorted({i.label for i in items})
    if len(classes) < 2:
        raise DataError(
            f"{src}: found {len(classes)} class(es) ({', '.join(classes)}); need at least 2"
        )
    class_ids = {c: i for i, c in enumerate(classes)}
    if storage.is_s3(dest):
        storage.ensure_bucket(dest)
    ensure_ray()
    staging = storage.staging_prefix(dest)
    final_staging = storage.join(staging, "final")
    try:
        items.sort(key=lambda i: i.order)
        n = settings.files_per_task
        chunks = [items[i : i + n] for i in range(0, len(items), n)]
        calls = [
            (ci, chunk, settings.image_settings(), staging, settings.row_group_rows)
            for ci, chunk in enumerate(chunks)
        ]
        meta = [
            row
            for part in _run_parallel(process_chunk, calls, "shard: read and check")
            for row in part
        ]

        rejects = list(early_rejects) + [
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
        kept = [r for r in accepted if r["key"] not in drop]
        total_inputs = len(items) + len(early_rejects)
        reasons = Counter(_generic_reason(r["reason"]) for r in rejects)
        fraction = len(rejects) / max(total_inputs, 1)
        if fraction > settings.max_rejected_fraction:
            examples = "\n".join(f"    {r['source_uri']}: {r['reason']}" for r in rejects[:10])
            summary = "\n".join(f"    {n:6d}  {reason}" for reason, n in reasons.most_common())
            raise DataError(
                f"{len(rejects)} of {total_inputs} inputs rejected ({fraction:.1%}), above "
                f"--max-rejected-fraction {settings.max_rejected_fraction:.1%}; nothing was written "
                f"to {dest}.\n  by reason:\n{summary}\n  first rejects:\n{examples}"
            )
        if not kept:
            raise DataError(f"every input under {src} was rejected")

        split_rows: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
        for row in kept:  # already in processing order
            split_rows[row["split"]].append(row)
        plans: list[tuple[str, int, list[dict[str, Any]]]] = []
        for split, rows in split_rows.items():
            if rows:
                for i, shard_rows in enumerate(_plan_shards(rows, settings.target_shard_mb * 1e6)):
                    plans.append((split, i, shard_rows))
        calls2 = [
            (
                _segments(rows, class_ids),
                storage.join(final_staging, split, f"part-{i:05d}.parquet"),
                settings.row_group_rows,
            )
            for split, i, rows in plans
        ]
        infos = _run_parallel(assemble_shard, calls2, "shard: write shards")

        splits: dict[str, SplitInfo] = {}
        for (split, i, rows), info in zip(plans, infos, strict=True):
            entry = splits.setdefault(split, SplitInfo(rows=0, shards=[], class_counts={}))
            entry.shards.append(ShardInfo(path=f"{split}/part-{i:05d}.parquet", **info))
            counts = Counter(r["label"] for r in rows)
            for c, k in counts.items():
                entry.class_counts[c] = entry.class_counts.get(c, 0) + k
        splits = {
            s: SplitInfo(
                rows=sum(sh.rows for sh in v.shards),
                shards=v.shards,
                class_counts=dict(sorted(v.class_counts.items())),
            )
            for s, v in splits.items()
        }
        _write_rejects(rejects, storage.join(final_staging, REJECTS))
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
                "list": REJECTS,
            },
            schema_version=SCHEMA_VERSION,
        )
        storage.commit_prefix(final_staging, dest, marker=MANIFEST, marker_body=manifest.to_json())
    finally:
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


def _write_rejects(rejects: list[dict[str, str]], uri: str) -> None:
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
