"""What the Ray tasks of `xfer shard` run: read and check images, then write shards.

Stage 1 (:func:`process_chunk`): a task reads a chunk of inputs, checks and
normalises each image (:mod:`xfer.data.images`) and writes the accepted ones to staged
*pieces*, one per split, returning only small metadata rows to the driver. Stage 2
(:func:`assemble_shard`): a task copies rows of pieces, in the driver's order, into
one final shard with fixed-size row groups. The driver (:mod:`xfer.data.shard`) decides
what is rejected and which rows go to which shard, in between.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

from xfer.data.images import Accepted, ImageSettings, check_image
from xfer.errors import StorageError
from xfer.registry.provenance import file_sha256
from xfer.store import storage

if TYPE_CHECKING:
    from xfer.data.shard import Item


# ------------------------------------------------------ stage 1: pieces


class _Pieces:
    """One staged piece per split for a chunk: rows buffered, written a row group at a
    time to a local Parquet file, uploaded when the chunk is done."""

    def __init__(self, tmp: str, staging: str, chunk_id: int, row_group_rows: int):
        self._tmp, self._staging, self._chunk = tmp, staging, chunk_id
        self._row_group_rows = row_group_rows
        self._writers: dict[str, Any] = {}
        self._buffers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._rows: Counter[str] = Counter()

    def uri(self, split: str) -> str:
        return storage.join(self._staging, "pieces", split, f"chunk-{self._chunk:06d}.parquet")

    def add(self, split: str, record: dict[str, Any]) -> int:
        """Append a row to the split's piece; its row number there."""
        self._buffers[split].append(record)
        row = self._rows[split]
        self._rows[split] += 1
        if len(self._buffers[split]) >= self._row_group_rows:
            self._flush(split)
        return row

    def _flush(self, split: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self._buffers[split]:
            return
        schema = piece_schema()
        if split not in self._writers:
            path = os.path.join(self._tmp, f"{split}.parquet")
            self._writers[split] = pq.ParquetWriter(path, schema)
        table = pa.Table.from_pylist(self._buffers[split], schema=schema)
        self._writers[split].write_table(table)
        self._buffers[split].clear()

    def upload(self) -> None:
        for split in list(self._buffers):
            self._flush(split)
        for split, writer in self._writers.items():
            writer.close()
            storage.upload_file(os.path.join(self._tmp, f"{split}.parquet"), self.uri(split))


def _check_item(item: Item, image_settings: ImageSettings) -> Accepted | dict[str, Any]:
    """The item's checked image, or its metadata row with the reason it was refused."""
    row = {"key": item.key, "source_uri": item.uri, "split": item.split, "label": item.label}
    try:
        data = storage.read_bytes(item.uri)
    except StorageError as exc:
        return {**row, "reason": f"cannot read: {exc}", "sha256": None}
    result = check_image(data, image_settings)
    if not isinstance(result, Accepted):
        return {**row, "reason": result.reason, "sha256": result.sha256}
    return result


def _add_accepted(item: Item, result: Accepted, pieces: _Pieces) -> dict[str, Any]:
    """Stage the image in its split's piece; its metadata row for the driver."""
    record = {
        "key": item.key,
        "image": result.image,
        "source_uri": item.uri,
        "sha256": result.sha256,
        "width": result.width,
        "height": result.height,
    }
    piece_row = pieces.add(item.split, record)
    return {
        "key": item.key,
        "source_uri": item.uri,
        "split": item.split,
        "label": item.label,
        "reason": None,
        "sha256": result.sha256,
        "bytes": len(result.image),
        "piece": pieces.uri(item.split),
        "piece_row": piece_row,
        "converted_from": result.converted_from,
    }


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
    meta: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="xfer-shard-") as tmp:
        pieces = _Pieces(tmp, staging, chunk_id, row_group_rows)
        for item in items:
            result = _check_item(item, image_settings)
            if isinstance(result, Accepted):
                result = _add_accepted(item, result, pieces)
            meta.append(result)
        pieces.upload()
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
