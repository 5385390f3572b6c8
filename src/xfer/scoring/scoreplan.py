"""A night of scoring as a plan of blocks, staged, resumable, committed once.

    plan, resumed = plan_night(identity, input_uri, split, final, block_size)
    ... actors score the blocks not in done_blocks(plan), into plan.parts_uri ...
    commit_night(plan, summaries, marker)          # dt=<date>/ replaced whole

Layout, for a partition ``<out>/dt=<date>`` (on S3 under the bucket's ``_tmp/``,
which one lifecycle rule expires; locally a hidden sibling directory)::

    <night root>/_night.json              identity of the night, its token, the plan
    <night root>/<token>/plan/block-N.parquet   key, source_uri of block N (objects)
    <night root>/<token>/parts/part-N-<token>.parquet   predictions of block N

A block's predictions are one object written in one PUT, so a block is done exactly
when its part exists. A night started again for the same partition, model, input
and settings keeps the plan it made the first time (the input as listed then) and
skips the blocks already done; anything else starts a new night. Nothing is ever
written into the live partition except by :func:`commit_night`, which copies the
parts in, switches ``_SUCCESS`` and then removes what the new marker does not list.
The live prefix is never written with an "overwrite" mode (Ray Data's
``write_parquet(mode=overwrite)`` has lost rows at scale, ray-project/ray#54949).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import uuid
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from xfer.data import inputs
from xfer.errors import DataError, NotFoundError, StorageError, XferError
from xfer.scoring.predictions import KEY, SOURCE_URI
from xfer.scoring.scorejob import NightPlan
from xfer.store import commit, s3, storage

NIGHT_FILE = "_night.json"
IMAGE_COLUMNS = [KEY, "image", "label", SOURCE_URI]


# ------------------------------------------------------------------ the plan


def night_root(final: str) -> str:
    """Where the night for partition ``final`` is staged: the same place every attempt."""
    if s3.is_s3(final):
        bucket, key = s3.split_s3(final)
        return f"s3://{bucket}/{commit.TMP_PREFIX}/xfer-score/{key.strip('/')}"
    path = s3.local_path(final).rstrip("/")
    return os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.scoring")


def part_name(plan: NightPlan, block: int) -> str:
    return f"part-{block:05d}-{plan.token}.parquet"


def done_blocks(plan: NightPlan) -> dict[int, str]:
    """Blocks whose part exists (block -> file name)."""
    try:
        files = storage.list_files(plan.parts_uri)
    except NotFoundError:
        return {}
    done = {}
    suffix = f"-{plan.token}.parquet"
    for f in files:
        name = storage.basename(f.uri)
        if name.startswith("part-") and name.endswith(suffix):
            done[int(name[len("part-") : -len(suffix)])] = name
    return done


def plan_night(
    identity: dict[str, Any],
    input_uri: str,
    split: str,
    final: str,
    block_size: int,
    allow_outside: bool = False,
) -> tuple[NightPlan, bool]:
    """The staged night for ``final`` if it is the same night, else a new plan.

    Returns (plan, resumed). ``identity`` holds what must match for a night to be
    resumed (model run, settings that change the rows); the input's is added here. A
    staged plan whose blocks are gone (the ``_tmp/`` lifecycle rule expired them while
    ``_night.json``, rewritten by each attempt, lived on) is made again.
    """
    root = night_root(final)
    night_uri = storage.join(root, NIGHT_FILE)
    identity = night_identity(identity, input_uri, split, block_size)
    old = storage.read_json(night_uri) if storage.exists(night_uri) else None
    if old and old.get("identity") == identity and old.get("planned"):
        staged = NightPlan.from_dict(old)
        if _plan_intact(staged):
            staged.attempt += 1
            storage.write_json(night_uri, staged.to_dict())
            return staged, True
        print(
            f"[xfer] warning: the night staged at {root} ({old.get('token')}) lost blocks of "
            "its plan (expired?): planning the night again",
            flush=True,
        )
    elif old:
        print(
            f"[xfer] discarding a night staged for other settings ({old.get('token')})", flush=True
        )
    if old:  # the night's folder holds its lock too: only the old token's files go
        storage.delete_prefix(storage.join(root, str(old.get("token"))))
    token = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    base = storage.join(root, token)
    plan = NightPlan(
        identity=identity,
        token=token,
        plan_uri=storage.join(base, "plan"),
        parts_uri=storage.join(base, "parts"),
        final=final,
    )
    _plan_input(plan, input_uri, split, block_size, allow_outside)
    storage.write_json(night_uri, plan.to_dict())  # "planned": written once it is
    return plan, False


def night_identity(
    identity: dict[str, Any], input_uri: str, split: str, block_size: int
) -> dict[str, Any]:
    """The model's and settings' ``identity`` with the input's: one night, one identity
    (kept in ``_night.json`` and in the committed ``_SUCCESS``)."""
    return {
        **identity,
        "input": input_uri,
        "input_version": _input_version(input_uri),
        "split": split,
        "block_size": block_size,
    }


def _input_version(input_uri: str) -> str | None:
    """What pins a resumed night to its input: a dataset's manifest checksum, a list's
    version. A prefix has none: the plan lists it once, and a resume keeps that list."""
    from xfer.data.manifest import MANIFEST, load_manifest

    uri = input_uri.rstrip("/")
    if inputs.is_inventory(uri):
        return f"inventory:{storage.stat(uri).version}"
    if uri.endswith(MANIFEST) or storage.exists(storage.join(uri, MANIFEST)):
        return f"dataset:{load_manifest(uri).checksum}"
    if inputs.is_list(uri):
        return f"list:{storage.stat(uri).version}"
    return None


def _plan_intact(plan: NightPlan) -> bool:
    """Every plan block the night lists is still there (datasets have none)."""
    if plan.kind != "objects":
        return True
    try:
        have = {storage.basename(f.uri) for f in storage.list_files(plan.plan_uri)}
    except NotFoundError:
        return False
    return all(f"block-{b:05d}.parquet" in have for b in range(plan.blocks))


def _plan_input(
    plan: NightPlan, input_uri: str, split: str, block_size: int, allow_outside: bool
) -> None:
    """Fill ``plan``'s blocks: a dataset's row groups, or the listed objects' plan blocks."""
    from xfer.data.manifest import MANIFEST

    uri = input_uri.rstrip("/")
    inventory = inputs.is_inventory(uri)  # an S3 Inventory's manifest.json is a list
    if not inventory and (uri.endswith(MANIFEST) or storage.exists(storage.join(uri, MANIFEST))):
        _plan_dataset(plan, uri, split, block_size)
        return
    listing = list_objects(uri, allow_outside, inventory)
    rows = count = 0
    with ThreadPoolExecutor(8) as pool:
        pending: list[Future[None]] = []
        for chunk in _chunks(listing, block_size):
            if len(pending) >= 16:  # bounded: the listing never runs far ahead of writes
                pending.pop(0).result()
            pending.append(pool.submit(_write_plan_block, plan.plan_uri, count, chunk))
            rows += len(chunk)
            count += 1
        for f in pending:
            f.result()
    if rows == 0 and not inputs.is_list(uri) and not inventory and _prefix_missing(uri):
        warn(f"--input {uri}: no such folder (nothing under it): committing an empty night")
    plan.kind, plan.blocks, plan.rows, plan.has_labels = "objects", count, rows, False


def _plan_dataset(plan: NightPlan, uri: str, split: str, block_size: int) -> None:
    """A dataset's blocks: runs of whole row groups of a shard, about ``block_size`` rows."""
    from xfer.data.manifest import load_manifest

    manifest = load_manifest(uri)
    splits = list(manifest.splits) if split == "all" else [split]
    shards: list[str] = []
    blocks: list[list[int]] = []  # [shard, first row group, end row group, rows]
    for name in splits:
        info = manifest.split(name)
        for shard, uri_ in zip(info.shards, manifest.shard_uris(name), strict=True):
            shards.append(uri_)
            groups = shard.row_groups or [shard.rows]
            first, rows = 0, 0
            for g, n in enumerate(groups):
                if rows and rows + n > block_size:
                    blocks.append([len(shards) - 1, first, g, rows])
                    first, rows = g, 0
                rows += n
            if rows:
                blocks.append([len(shards) - 1, first, len(groups), rows])
    total = sum(b[3] for b in blocks)
    if total == 0:
        raise DataError(f"--input {uri}: split {split!r} is empty; nothing to score")
    plan.kind, plan.shards, plan.units = "dataset", shards, blocks
    plan.blocks, plan.rows = len(blocks), total
    plan.has_labels, plan.label_classes = True, list(manifest.classes)


def _prefix_missing(uri: str) -> bool:
    """Nothing at all under ``uri`` (an empty folder still holds its marker or junk)."""
    return next(iter(storage.iter_files(uri)), None) is None


def warn(message: str) -> None:
    print(f"[xfer] warning: {message}", file=sys.stderr, flush=True)


def _chunks(rows: Any, size: int) -> Any:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_plan_block(plan_uri: str, block: int, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa

    table = pa.table(
        {
            "key": pa.array([r["key"] for r in rows], pa.string()),
            "source_uri": pa.array([r["source_uri"] for r in rows], pa.string()),
            "size": pa.array([r["size"] for r in rows], pa.int64()),  # null: not listed
        }
    )
    storage.write_parquet(table, storage.join(plan_uri, f"block-{block:05d}.parquet"))


def list_objects(uri: str, allow_outside: bool = False, inventory: bool | None = None) -> Any:
    """key/source_uri/size of each image under a prefix, in a CSV/Parquet list or an S3
    Inventory report (streamed); ``inventory``: whether the caller already knows it is one."""
    if inputs.is_list(uri):
        try:
            found: Any = inputs.read_list(uri, labelled=False, allow_outside=allow_outside)
        except DataError as exc:
            raise DataError(f"--input: {exc}") from None
    elif inventory or (inventory is None and inputs.is_inventory(uri)):
        found = inputs.from_inventory(uri)
    else:
        found = inputs.under_prefix(uri)
    for item in found:
        yield {"key": item.key, "source_uri": item.uri, "size": item.size}


def block_items(plan: NightPlan, block: int, exclude: Collection[str] = ()) -> list[dict[str, Any]]:
    """The rows of one block: key, source_uri and (datasets) image bytes and label;
    a dataset's rows whose key is in ``exclude`` are left out."""
    if plan.kind == "objects":
        table = storage.read_parquet(storage.join(plan.plan_uri, f"block-{block:05d}.parquet"))
        return table.to_pylist()
    from xfer.data.rowgroups import read_row_groups

    shard, first, end, _ = plan.units[block]
    table = read_row_groups(plan.shards[shard], list(range(first, end)), IMAGE_COLUMNS)
    if exclude:  # a training run's data.exclude: those rows are not scored
        import pyarrow as pa
        import pyarrow.compute as pc

        left_out = pa.array(list(exclude), pa.string())
        table = table.filter(pc.invert(pc.is_in(table.column(KEY), value_set=left_out)))
    return table.to_pylist()


# ---------------------------------------------------------------- the commit


def commit_night(
    plan: NightPlan,
    summaries: dict[int, dict[str, Any]],
    marker: dict[str, Any],
    single_file: str | None = None,
) -> dict[str, Any]:
    """Publish the night's parts as the partition, ``_SUCCESS`` last; then clean up."""
    missing = [b for b in range(plan.blocks) if b not in summaries]
    if missing:
        raise XferError(f"internal: blocks {missing[:5]} were not scored; nothing committed")
    files = [summaries[b]["file"] for b in range(plan.blocks)]
    parts = plan.parts_uri
    if single_file:
        import pyarrow as pa

        tables = [storage.read_parquet(storage.join(parts, f)) for f in files]
        storage.delete_prefix(parts)
        storage.write_parquet(pa.concat_tables(tables), storage.join(parts, single_file))
        files = [single_file]
    marker = {
        **marker,
        "rows": sum(s["rows"] for s in summaries.values()),
        "errors": sum(s["errors"] for s in summaries.values()),
        "files": files,
        "blocks": plan.blocks,
        "attempts": plan.attempt,
        "night": plan.identity,
    }
    body = json.dumps(marker, indent=2).encode()
    commit.commit_partition(
        parts,
        plan.final,
        marker=commit.SUCCESS,
        marker_body=body,
        keep=files,
        before_delete=lambda _: write_table_manifest(plan.final, files),
    )
    try:  # committed: a staging left behind is expired by the lifecycle rule
        storage.delete_prefix(night_root(plan.final))
    except StorageError as exc:
        warn(f"the night is committed; its staging was not removed: {exc}")
    return marker


def finish_commit(final: str, marker: dict[str, Any]) -> None:
    """Steps 3 to 5 of a committed night again, from its ``_SUCCESS`` (a re-run after a
    crash or a failed report): the table manifest, then what the marker does not list,
    then the night's staging if it is this night's. All idempotent; nothing is scored."""
    write_table_manifest(final, marker["files"])
    keep = {storage.join(final, name) for name in [*marker["files"], commit.SUCCESS]}
    storage.delete_prefix(final, keep=keep)
    night_uri = storage.join(night_root(final), NIGHT_FILE)
    if (
        storage.exists(night_uri)
        and storage.read_json(night_uri).get("identity") == marker["night"]
    ):
        storage.delete_prefix(night_root(final))


TABLE_MANIFESTS = "_symlink_format_manifest"


def table_manifest_uri(final: str) -> str:
    """``<output>/_symlink_format_manifest/dt=<date>/manifest``."""
    return storage.join(storage.parent(final), TABLE_MANIFESTS, storage.basename(final), "manifest")


def write_table_manifest(final: str, files: list[str]) -> None:
    """The partition's files, one URI a line, for tables with ``SymlinkTextInputFormat``.

    Athena, Trino and Presto read a partition through this one object (written in one
    PUT after ``_SUCCESS``, before any old part is deleted), so a query sees the old
    night or the new one, never both: the prefix itself briefly holds both.
    """
    if not storage.basename(final).startswith("dt="):
        return  # a run's own predictions/ is no table partition
    body = "".join(f"{storage.join(final, name)}\n" for name in files)
    storage.write_bytes(table_manifest_uri(final), body.encode(), "text/plain")
