"""Listing at scale: parallel listing over sub-prefixes, and an S3 Inventory as --input.

Against the real embedded S3 server. The page size is lowered (``listing.PAGE_KEYS``)
so that a few dozen keys make the trees a hundred million would.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote_plus

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xfer.data import inputs
from xfer.data.synth import synthesize
from xfer.errors import DataError
from xfer.scoring.score import score
from xfer.store import listing, retry, s3, storage

from .conftest import config_for
from .faultproxy import FaultProxy

# An awkward tree: keys at the top, names sharing a start (a.jpg / a-b/ / a/: key order
# is not a directory walk's), a folder with several pages, empty folders (a marker only),
# deep nesting, folder markers, non-ASCII. (SeaweedFS, a file system, cannot hold both
# a key "a" and keys under "a/", nor "a//b": real S3 can; this tree has neither.)
TREE = [
    "tree/0top.jpg",
    "tree/a-b.jpg",
    "tree/a-b/x.jpg",
    "tree/a.jpg",
    *[f"tree/a/{i:02d}.jpg" for i in range(11)],
    "tree/a/",
    "tree/a/sub/",
    "tree/a/sub/deeper/z.jpg",
    "tree/b c/é.jpg",
    "tree/deep/1/2/3/4/5/6/k.jpg",
    "tree/deep/1/2/3/4/5/6/l.jpg",
    "tree/empty/",
    "tree/empty2/",
    "tree/m/1.jpg",
    "tree/m/2.jpg",
    "tree/n/",
    "tree/n/1.jpg",
    "tree/z.jpg",
    "tree/zz/é/ü.jpg",
    "tree-other/x.jpg",  # beside the prefix: never listed
    "treex.jpg",
]
EXPECTED = sorted(k for k in TREE if k.startswith("tree/") and not k.endswith("/"))


def put_keys(bucket: str, keys: list[str]) -> None:
    name = s3.split_s3(bucket)[0]
    client = s3.s3_client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=name, Key=k, Body=b""), keys))


class ListCalls:
    """ListObjectsV2 calls as the client makes them (a botocore event hook): prefix and
    delimiter of each, and how many were in flight at once. ``meet``: the first two
    listings of sub-prefixes (no delimiter, below the root) wait for each other, so a
    sequential lister fails here instead of passing by luck of timing."""

    def __init__(self, root_key: str, meet: bool = False) -> None:
        self.root_key, self.calls, self.in_flight, self.most = root_key, [], 0, 0
        self.lock = threading.Lock()
        self.barrier = threading.Barrier(2, timeout=20) if meet else None
        self.met = 0

    def before(self, params: dict[str, Any], **_: Any) -> None:
        with self.lock:
            self.calls.append((params.get("Prefix", ""), params.get("Delimiter")))
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
            sub = params.get("Prefix") != self.root_key and not params.get("Delimiter")
            meet = self.barrier is not None and sub and self.met < 2
            self.met += meet
        if meet:
            assert self.barrier is not None
            self.barrier.wait()  # BrokenBarrierError: no second listing came meanwhile

    def after(self, **_: Any) -> None:
        with self.lock:
            self.in_flight -= 1


@pytest.fixture
def list_calls() -> Iterator[Any]:
    events = s3.s3_client().meta.events
    made: list[ListCalls] = []

    def watch(root_key: str, meet: bool = False) -> ListCalls:
        calls = ListCalls(root_key, meet)
        events.register("provide-client-params.s3.ListObjectsV2", calls.before)
        events.register("after-call.s3.ListObjectsV2", calls.after)
        events.register("after-call-error.s3.ListObjectsV2", calls.after)
        made.append(calls)
        return calls

    yield watch
    for calls in made:  # the client is cached for the session: leave it as it was
        events.unregister("provide-client-params.s3.ListObjectsV2", calls.before)
        events.unregister("after-call.s3.ListObjectsV2", calls.after)
        events.unregister("after-call-error.s3.ListObjectsV2", calls.after)


def test_parallel_listing_returns_each_key_once_in_key_order(bucket, monkeypatch, list_calls):
    monkeypatch.setattr(listing, "PAGE_KEYS", 3)  # tree/a/ is five pages
    monkeypatch.setattr(listing, "FEW_PREFIXES", 2)  # the root's folders are enough
    put_keys(bucket, TREE)
    calls = list_calls("tree/", meet=True)
    streamed = [f.uri for f in storage.iter_files(f"{bucket}/tree")]
    assert streamed == [f"{bucket}/{k}" for k in EXPECTED]  # each once, in key order
    # It fanned out: sub-prefixes were listed on their own, two of them at once.
    listed = {prefix for prefix, delimiter in calls.calls if not delimiter}
    assert {"tree/a/", "tree/a-b/", "tree/deep/", "tree/m/", "tree/zz/"} <= listed
    assert calls.most >= 2
    assert [f.uri for f in storage.list_files(f"{bucket}/tree/")] == streamed
    assert {f.size for f in storage.list_files(f"{bucket}/tree")} == {0}


def test_a_level_with_few_folders_is_opened_a_level_further(bucket, monkeypatch, list_calls):
    monkeypatch.setattr(listing, "PAGE_KEYS", 3)
    monkeypatch.setattr(listing, "LEVEL_KEYS", 3)
    keys = [f"few/p/{d}/{i}.jpg" for d in (1, 2) for i in range(5)]
    keys += [f"few/q/{i}.jpg" for i in range(7)]
    put_keys(bucket, keys)
    calls = list_calls("few/")
    assert [f.uri for f in storage.iter_files(f"{bucket}/few")] == [
        f"{bucket}/{k}" for k in sorted(keys)
    ]
    listed = [prefix for prefix, delimiter in calls.calls if not delimiter]
    # The root holds two folders: p/ is opened (its two folders are listed), q/ is flat.
    assert {"few/p/1/", "few/p/2/", "few/q/"} <= set(listed) and "few/p/" not in listed


def test_a_small_prefix_is_still_one_request_and_early_stops_leave_no_lister(
    bucket, monkeypatch, list_calls
):
    put_keys(bucket, TREE)
    calls = list_calls("tree/")
    listed = [f.uri for f in storage.iter_files(f"{bucket}/tree")]  # SeaweedFS's order
    assert sorted(listed) == [f"{bucket}/{k}" for k in EXPECTED]
    assert calls.calls == [("tree/", None)]  # fits one page: one request, as before
    monkeypatch.setattr(listing, "PAGE_KEYS", 2)
    monkeypatch.setattr(listing, "PAGES_AHEAD", 1)
    first = next(iter(storage.iter_files(f"{bucket}/tree")))  # the rest is never read
    assert first.uri == f"{bucket}/{EXPECTED[0]}"
    for thread in threading.enumerate():
        if thread.name.startswith("xfer-list"):
            thread.join(timeout=10)
            assert not thread.is_alive(), "a lister is left waiting for a reader"


def test_an_outage_on_one_sub_prefix_page_is_ridden_out(
    fault_proxy: FaultProxy, bucket, monkeypatch
):
    # Many folders, the root's level itself several pages (streamed, not opened).
    monkeypatch.setattr(listing, "PAGE_KEYS", 2)
    monkeypatch.setattr(listing, "LEVEL_KEYS", 4)
    keys = ["o/0top.jpg", *[f"o/{d:02d}/{i}.jpg" for d in range(12) for i in range(5)]]
    put_keys(bucket, keys)
    # The second page of o/03/ (after one good page) answers 503 three times: more
    # than the SDK's own attempts (2 in tests), so the listing's retry rides it out.
    rule = fault_proxy.add("LIST", r"prefix=o%2F03%2F(&|$)", "slowdown", skip=1, times=3)
    with retry.budget(60):
        listed = [f.uri for f in storage.iter_files(f"{bucket}/o")]
    assert rule.hits == 3
    assert not [k for k, n in Counter(listed).items() if n > 1]
    assert listed == [f"{bucket}/{k}" for k in sorted(keys)]


# ------------------------------------------------------------- S3 Inventory


def inventory_report(bucket: str, fmt: str, rows: list[dict[str, Any]], files: int = 2) -> str:
    """An S3 Inventory report in its real layout and format; returns its manifest.json.

    ``<dest>/inventory/<source>/<config>/<time>/manifest.json``, data files under
    ``.../data/`` (CSV: gzipped, no header, keys form-encoded; Parquet: lower-case
    columns), each described by key, size and MD5 in the manifest.
    """
    name = s3.split_s3(bucket)[0]
    base = f"inventory/{name}/nightly"
    entries = []
    for n in range(files):
        chunk = rows[n::files]
        if fmt == "CSV":
            text = io.StringIO()
            writer = csv.writer(text, quoting=csv.QUOTE_ALL)
            for r in chunk:
                writer.writerow(
                    [r["bucket"], quote_plus(r["key"], safe="/"), r["size"], r["latest"], r["dm"]]
                )
            data = gzip.compress(text.getvalue().encode())
            key = f"{base}/data/{n:04d}-6f1e.csv.gz"
        else:
            table = pa.table(
                {
                    "bucket": [r["bucket"] for r in chunk],
                    "key": [r["key"] for r in chunk],
                    "size": pa.array([r["size"] for r in chunk], pa.int64()),
                    "is_latest": [r["latest"] == "true" for r in chunk],
                    "is_delete_marker": [r["dm"] == "true" for r in chunk],
                }
            )
            out = io.BytesIO()
            pq.write_table(table, out, compression="snappy")
            data = out.getvalue()
            key = f"{base}/data/{n:04d}-6f1e.parquet"
        storage.write_bytes(f"{bucket}/{key}", data)
        entries.append(
            {"key": key, "size": len(data), "MD5checksum": hashlib.md5(data).hexdigest()}
        )
    schema = (
        "Bucket, Key, Size, IsLatest, IsDeleteMarker"
        if fmt == "CSV"
        else "message s3.inventory { required binary bucket (UTF8); required binary key (UTF8); "
        "optional int64 size; optional boolean is_latest; optional boolean is_delete_marker; }"
    )
    manifest = {
        "sourceBucket": name,
        "destinationBucket": f"arn:aws:s3:::{name}",
        "version": "2016-11-30",
        "creationTimestamp": "1772409600000",
        "fileFormat": fmt,
        "fileSchema": schema,
        "files": entries,
    }
    uri = f"{bucket}/{base}/2026-03-02T01-00Z/manifest.json"
    storage.write_json(uri, manifest)
    return uri


def inventory_night(bucket: str) -> tuple[list[dict[str, Any]], set[str]]:
    """Images in ``photos/``, some of them listed by an inventory; returns its rows and
    the keys it lists as objects to score."""
    synthesize(f"{bucket}/photos", ["ring", "star"], per_class=3, size=60, seed=7)
    blob = storage.read_bytes(storage.list_files(f"{bucket}/photos/ring")[0].uri)
    odd = ["photos/odd/a cat+dog.jpg", "photos/odd/été à Zürich.jpg"]
    for key in odd:
        storage.write_bytes(f"{bucket}/{key}", blob)
    plain = [f.uri.split("/", 3)[3] for f in storage.list_files(f"{bucket}/photos")]
    plain = [k for k in plain if k not in odd]
    scored = set(plain[:3] + odd)  # the rest of photos/ is not in the inventory
    name = s3.split_s3(bucket)[0]

    def row(key: str, latest: str = "true", dm: str = "false") -> dict[str, Any]:
        return {"bucket": name, "key": key, "size": len(blob), "latest": latest, "dm": dm}

    rows = [row(k) for k in sorted(scored)]
    rows += [
        row(plain[3], latest="false"),  # an older version: not scored
        row("photos/gone.jpg", dm="true"),  # a delete marker
        row("photos/odd/"),  # a folder marker
        row("photos/_SUCCESS"),  # another job's marker
    ]
    return rows, scored


@pytest.mark.parametrize("fmt", ["CSV", "Parquet"])
def test_an_inventory_manifest_as_input_scores_exactly_the_objects_it_lists(
    trained_run, session_root, bucket, fmt
):
    rows, scored = inventory_night(bucket)
    manifest = inventory_report(bucket, fmt, rows)
    assert {i.key for i in inputs.from_inventory(manifest)} == scored
    cfg = config_for(session_root, "score.block_size=3")
    result = score(
        cfg,
        model=trained_run.run_uri,
        input_uri=manifest,
        output=f"{bucket}/preds",
        date="2026-03-02",
    )
    marker = storage.read_json(f"{result.output}/_SUCCESS")
    table = pa.concat_tables(storage.read_parquet(f"{result.output}/{f}") for f in marker["files"])
    got = dict(zip(table.column("key").to_pylist(), table.column("error").to_pylist(), strict=True))
    assert set(got) == scored and table.num_rows == len(scored)
    assert all(error is None for error in got.values()), got  # every object was found and read
    assert set(table.column("source_uri").to_pylist()) == {f"{bucket}/{k}" for k in scored}
    assert marker["night"]["input_version"].startswith("inventory:")


def test_an_inventory_data_file_that_does_not_match_its_md5_is_refused(bucket):
    rows, _ = inventory_night(bucket)
    manifest = inventory_report(bucket, "CSV", rows, files=1)
    body = storage.read_json(manifest)
    data_uri = f"{bucket}/{body['files'][0]['key']}"
    good = storage.read_bytes(data_uri)
    storage.write_bytes(data_uri, good[:-2] + bytes([good[-2] ^ 1]) + good[-1:])  # same size
    with pytest.raises(DataError, match=r"MD5 .* the manifest says"):
        list(inputs.from_inventory(manifest))


def test_an_orc_inventory_or_a_foreign_row_is_a_clear_error(bucket):
    rows, _ = inventory_night(bucket)
    manifest = inventory_report(bucket, "CSV", rows, files=1)
    body = storage.read_json(manifest)
    storage.write_json(manifest, {**body, "fileFormat": "ORC"})
    with pytest.raises(DataError, match=r"fileFormat 'ORC' is not supported"):
        list(inputs.from_inventory(manifest))
    foreign = inventory_report(bucket, "CSV", [{**rows[0], "bucket": "someone-else"}], files=1)
    with pytest.raises(DataError, match=r"outside the inventory's source bucket"):
        list(inputs.from_inventory(foreign))
    assert inputs.is_inventory(foreign) and not inputs.is_inventory(f"{bucket}/photos")
    assert json.loads(storage.read_text(foreign))["fileFormat"] == "CSV"
