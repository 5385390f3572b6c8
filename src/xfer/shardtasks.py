"""What the Ray tasks of `xfer shard` run: read and check images, then write shards.

Stage 1 (:func:`process_chunk`): a task reads a chunk of inputs, checks and
normalises each image (:mod:`xfer.images`) and writes the accepted ones to staged
*pieces*, one per split, returning only small metadata rows to the driver. Stage 2
(:func:`assemble_shard`): a task copies rows of pieces, in the driver's order, into
one final shard with fixed-size row groups. The driver (:mod:`xfer.shard`) decides
what is rejected and which rows go to which shard, in between.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from xfer import storage
from xfer.errors import StorageError
from xfer.images import Accepted, ImageSettings, check_image
from xfer.provenance import file_sha256

if TYPE_CHECKING:
    from xfer.shard import Item


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
            except StorageError as exc:
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
        digest = file_sha256(path)
        size = os.path.getsize(path)
        storage.upload_file(path, dest_uri)
    return {
        "rows": sum(row_groups),
        "bytes": size,
        "sha256": digest,
        "row_groups": row_groups,
    }
