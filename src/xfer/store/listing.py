"""Listing a prefix, by URI: in key order, and in parallel over sub-prefixes when it is large.

S3 answers a listing 1,000 keys a request, one request after the other (each needs the
previous one's continuation token): 100 million keys are 100,000 sequential requests.
Sub-prefixes are disjoint key ranges, so they can be listed at the same time:

1. The first page is listed as always; if it holds everything (not truncated) that is the
   whole listing: a small prefix costs one request, as it always did.
2. Otherwise the prefix is listed with ``Delimiter="/"``: the keys directly under it and
   its sub-prefixes ("folders"), in key order. A level with few sub-prefixes (fewer than
   :data:`FEW_PREFIXES`) is opened a level further, up to :data:`MAX_DEPTH` levels.
3. The sub-prefixes are listed page by page on :data:`LIST_WORKERS` threads (capped at the
   client's connection pool), at most :data:`PREFIXES_AHEAD` of them ahead of the one
   being read and at most :data:`PAGES_AHEAD` pages each: keys come out in key order and
   never all at once. Each page is retried through an outage (:mod:`xfer.store.retry`).

Keys directly at one level come from that level's own (sequential) listing: one flat
folder of millions of keys lists no faster than before. For that, give an S3 Inventory
report as the input (:mod:`xfer.store.inventory`). Keys ending in ``/`` ("folder" markers) are
never files.

Order: S3 lists in UTF-8 binary order, which is Python's string order; the keys and
sub-prefixes of a level's page are merged in that order (a direct key never falls inside
a sub-prefix's range). A store that lists a folder as a directory walk instead (SeaweedFS
puts ``a/`` before ``a-b``) gets each key once, in its own order across pages.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from xfer.store.retry import ride_through
from xfer.store.s3 import is_s3, local_path, s3_client, split_s3, translate_errors

PAGE_KEYS = 1000  # keys a ListObjectsV2 request asks for (S3's most)
LEVEL_KEYS = 1000  # keys and sub-prefixes a Delimiter="/" request asks for
LIST_WORKERS = 16  # threads listing sub-prefixes (fewer if the client's pool is smaller)
FEW_PREFIXES = 16  # a level with fewer sub-prefixes than this is opened a level further
MAX_DEPTH = 3  # levels opened at most
PREFIXES_AHEAD = 32  # sub-prefixes listed ahead of the one being read
PAGES_AHEAD = 4  # pages each of them may hold before its lister waits
KEYS_AHEAD = 2000  # direct keys held ahead before sub-prefixes wait to be read
_DONE = object()


@dataclass(frozen=True)
class FileInfo:
    uri: str
    size: int
    version: str | None = None  # changes whenever the content may have: ETag, or mtime locally


def list_files(prefix: str) -> list[FileInfo]:
    """All objects under ``prefix`` (recursive), sorted by URI."""
    if is_s3(prefix):  # in parallel when large, each page retried through an outage
        return sorted(iter_files(prefix), key=lambda f: f.uri)
    with translate_errors(prefix):
        root = local_path(prefix)
        scheme = prefix[: len(prefix) - len(root)]  # "file://" stays on what it lists
        if os.path.isfile(root):
            return [FileInfo(prefix, os.path.getsize(root))]
        out = []
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                out.append(FileInfo(scheme + path, os.path.getsize(path)))
        return sorted(out, key=lambda f: f.uri)


def iter_files(prefix: str) -> Iterator[FileInfo]:
    """Objects under ``prefix`` in key order, a page at a time (S3: retried; in parallel
    over sub-prefixes once the first page shows the prefix is large)."""
    if not is_s3(prefix):
        yield from list_files(prefix)
        return
    bucket, key = split_s3(prefix)
    root = f"s3://{bucket}/{key.rstrip('/') + '/' if key else ''}"
    infos, token = _list_page(root, None)
    if not token:
        yield from infos
        return
    yield from _in_parallel(root)


@ride_through("listing")
def _list_page(prefix: str, token: str | None) -> tuple[list[FileInfo], str | None]:
    """One page of the keys under ``prefix`` (exactly this key prefix), no delimiter."""
    with translate_errors(prefix):
        bucket, key = split_s3(prefix)
        extra = {"ContinuationToken": token} if token else {}
        page = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=PAGE_KEYS, **extra)
        infos = [
            FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]
        return infos, page.get("NextContinuationToken") if page.get("IsTruncated") else None


@ride_through("listing")
def _level_page(prefix: str, token: str | None) -> tuple[list[FileInfo | str], str | None]:
    """One page of a level: its direct keys (FileInfo) and sub-prefixes (URIs), in key order.

    A key directly at the level never lies inside a sub-prefix's key range, so sorting
    the two by their strings is key order.
    """
    with translate_errors(prefix):
        bucket, key = split_s3(prefix)
        extra = {"ContinuationToken": token} if token else {}
        page = s3_client().list_objects_v2(
            Bucket=bucket, Prefix=key, Delimiter="/", MaxKeys=LEVEL_KEYS, **extra
        )
        units: list[FileInfo | str] = [
            FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]))
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        ]
        units += [f"s3://{bucket}/{p['Prefix']}" for p in page.get("CommonPrefixes", [])]
        units.sort(key=lambda u: u if isinstance(u, str) else u.uri)
        return units, page.get("NextContinuationToken") if page.get("IsTruncated") else None


def _units(root: str, pool: ThreadPoolExecutor) -> Iterator[FileInfo | str]:
    """Keys and sub-prefixes covering ``root`` once each, in key order, streamed."""
    units, token = _level_page(root, None)
    if token:  # a large level: its own sub-prefixes are many enough, or it is flat
        yield from units
        while token:
            units, token = _level_page(root, token)
            yield from units
        return
    yield from _opened(units, pool)


def _opened(units: list[FileInfo | str], pool: ThreadPoolExecutor) -> list[FileInfo | str]:
    """``units`` with each sub-prefix opened a level further while there are few of them.

    A sub-prefix whose level does not fit one page stays whole (it is listed flat)."""
    for _ in range(MAX_DEPTH - 1):
        prefixes = [u for u in units if isinstance(u, str)]
        if not prefixes or len(prefixes) >= FEW_PREFIXES:
            break
        levels = dict(zip(prefixes, pool.map(_first_level_page, prefixes), strict=True))
        opened: list[FileInfo | str] = []
        for unit in units:
            level = levels.get(unit) if isinstance(unit, str) else None
            opened += level[0] if level and level[1] is None else [unit]
        if opened == units:
            break
        units = opened
    return units


def _first_level_page(prefix: str) -> tuple[list[FileInfo | str], str | None]:
    return _level_page(prefix, None)


def _in_parallel(root: str) -> Iterator[FileInfo]:
    """Every key under ``root`` in key order, sub-prefixes listed on a bounded pool."""
    workers = min(LIST_WORKERS, int(s3_client().meta.config.max_pool_connections or 10))
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="xfer-list")
    stop = threading.Event()
    ahead: deque[FileInfo | queue.Queue[Any]] = deque()
    listing = 0  # sub-prefixes in ``ahead``
    try:
        for unit in _units(root, pool):
            ahead.append(_start(pool, unit, stop) if isinstance(unit, str) else unit)
            listing += isinstance(unit, str)
            while listing > PREFIXES_AHEAD or len(ahead) > KEYS_AHEAD:
                head = ahead.popleft()
                listing -= isinstance(head, queue.Queue)
                yield from _drain(head)
        while ahead:
            yield from _drain(ahead.popleft())
    finally:
        stop.set()  # a caller that stops early leaves no lister waiting
        pool.shutdown(wait=False, cancel_futures=True)


def _start(pool: ThreadPoolExecutor, prefix: str, stop: threading.Event) -> queue.Queue[Any]:
    pages: queue.Queue[Any] = queue.Queue(maxsize=PAGES_AHEAD)
    pool.submit(_list_into, prefix, pages, stop)
    return pages


def _list_into(prefix: str, pages: queue.Queue[Any], stop: threading.Event) -> None:
    """List ``prefix`` page by page into ``pages``; then _DONE, or the error."""
    token: str | None = None
    try:
        while not stop.is_set():
            infos, token = _list_page(prefix, token)
            _put(pages, infos, stop)
            if not token:
                break
        _put(pages, _DONE, stop)
    except BaseException as exc:  # handed to the reader, who raises it
        _put(pages, exc, stop)


def _put(pages: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            pages.put(item, timeout=0.5)
            return
        except queue.Full:
            continue


def _drain(item: FileInfo | queue.Queue[Any]) -> Iterator[FileInfo]:
    if isinstance(item, FileInfo):
        yield item
        return
    while True:
        page = item.get()
        if page is _DONE:
            return
        if isinstance(page, BaseException):
            raise page
        yield from page


@ride_through("listing")
def list_dirs(prefix: str) -> list[str]:
    """The names of the "folders" directly under ``prefix`` (S3: common prefixes)."""
    with translate_errors(prefix):
        if not is_s3(prefix):
            root = local_path(prefix)
            if not os.path.isdir(root):
                return []
            return sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)))
        bucket, key = split_s3(prefix)
        key = key.rstrip("/") + "/" if key else ""
        names: list[str] = []
        for page in (
            s3_client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=bucket, Prefix=key, Delimiter="/")
        ):
            names += [p["Prefix"][len(key) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return sorted(names)
