"""Storage by URI, on the real embedded S3 server and on local paths."""

from __future__ import annotations

import json
import os
import threading

import pyarrow as pa
import pytest

from xfer.errors import NotFoundError, StorageError
from xfer.store import commit, s3, storage


def test_round_trips(root):
    storage.write_bytes(f"{root}/a/blob.bin", b"\x00\x01payload")
    assert storage.read_bytes(f"{root}/a/blob.bin") == b"\x00\x01payload"
    storage.write_json(f"{root}/a/doc.json", {"k": [1, 2], "s": "x"})
    assert storage.read_json(f"{root}/a/doc.json") == {"k": [1, 2], "s": "x"}
    storage.write_yaml(f"{root}/b/c.yaml", {"train": {"epochs": 3}})
    assert storage.read_yaml(f"{root}/b/c.yaml") == {"train": {"epochs": 3}}
    table = pa.table({"key": ["a", "b"], "image": [b"\xff\xd8", b"\x89P"], "label": [0, 1]})
    storage.write_parquet(table, f"{root}/d/part-00000.parquet")
    assert storage.read_parquet(f"{root}/d/part-00000.parquet").equals(table)
    assert storage.open_parquet(f"{root}/d/part-00000.parquet").read().equals(table)

    uris = [f.uri for f in storage.list_files(root)]
    assert uris == sorted(
        [
            f"{root}/a/blob.bin",
            f"{root}/a/doc.json",
            f"{root}/b/c.yaml",
            f"{root}/d/part-00000.parquet",
        ]
    )
    assert storage.exists(f"{root}/a/doc.json")
    assert not storage.exists(f"{root}/a/missing.json")

    storage.copy(f"{root}/a/doc.json", f"{root}/copied/doc.json")
    assert storage.read_json(f"{root}/copied/doc.json") == {"k": [1, 2], "s": "x"}
    assert storage.delete_prefix(f"{root}/a") == 2
    assert not storage.exists(f"{root}/a/doc.json")
    with pytest.raises(NotFoundError, match="missing"):
        storage.read_bytes(f"{root}/a/missing")


def test_listing_does_not_match_sibling_prefixes(root):
    storage.write_bytes(f"{root}/run1/x", b"1")
    storage.write_bytes(f"{root}/run10/x", b"2")
    assert [f.uri for f in storage.list_files(f"{root}/run1")] == [f"{root}/run1/x"]


def test_dir_upload_download(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("b")
    storage.upload_dir(str(src), f"{root}/tree")
    out = tmp_path / "out"
    storage.download_dir(f"{root}/tree", str(out))
    assert (out / "a.txt").read_text() == "a"
    assert (out / "sub" / "b.txt").read_text() == "b"


def test_commit_prefix_replaces_whole_and_marks_last(root):
    final = f"{root}/part"
    storage.write_bytes(f"{final}/old-0.parquet", b"old")
    storage.write_bytes(f"{final}/_SUCCESS", b"")
    staging = commit.staging_prefix(final)
    for i in range(3):
        storage.write_bytes(f"{staging}/new-{i}.parquet", b"new")
    # Nothing staged is visible at the destination before the commit.
    assert not storage.exists(f"{final}/new-0.parquet")
    commit.commit_prefix(staging, final, marker="_SUCCESS", marker_body=b"3 files")
    names = sorted(storage.basename(f.uri) for f in storage.list_files(final))
    assert names == ["_SUCCESS", "new-0.parquet", "new-1.parquet", "new-2.parquet"]
    assert storage.read_bytes(f"{final}/_SUCCESS") == b"3 files"
    assert not storage.list_files(staging) if s3.is_s3(staging) else not os.path.exists(staging)


def test_delete_prefix_can_keep_some_objects(root):
    for name in ("a", "b", "sub/c"):
        storage.write_bytes(f"{root}/p/{name}", b"x")
    assert storage.delete_prefix(f"{root}/p", keep={f"{root}/p/b"}) == 2
    assert [f.uri for f in storage.list_files(f"{root}/p")] == [f"{root}/p/b"]


def test_commit_partition_leaves_only_what_the_new_marker_lists(root):
    final = f"{root}/dt=2026-11-28"
    for run in ("r1", "r2"):
        staging = commit.staging_prefix(final)
        files = [f"part-{run}-{i}.parquet" for i in range(2)]
        for name in files:
            storage.write_bytes(f"{staging}/{name}", run.encode())
        body = json.dumps({"files": files}).encode()
        commit.commit_partition(staging, final, "_SUCCESS", body, keep=files)
    names = sorted(storage.basename(f.uri) for f in storage.list_files(final))
    assert names == ["_SUCCESS", "part-r2-0.parquet", "part-r2-1.parquet"]
    assert storage.read_json(f"{final}/_SUCCESS")["files"] == names[1:]


def test_concurrent_reader_never_sees_a_partial_object(root):
    """A reader polling while a large object is rewritten sees only whole versions."""
    uri = f"{root}/big.bin"
    versions = [bytes([i]) * (6 * 1024 * 1024) for i in range(4)]
    storage.write_bytes(uri, versions[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.append(storage.read_bytes(uri))
            except NotFoundError:
                seen.append(b"")

    t = threading.Thread(target=reader)
    t.start()
    for data in versions[1:]:
        storage.write_bytes(uri, data)
    stop.set()
    t.join()
    assert seen, "the reader never ran"
    assert all(s in versions for s in seen), "a reader saw a partial or mixed object"
    assert storage.read_bytes(uri) == versions[-1]


def test_failed_parquet_write_leaves_nothing(root):
    uri = f"{root}/t/part.parquet"
    table = pa.table({"a": [1, 2, 3]})
    with pytest.raises(Exception, match="compression"):
        storage.write_parquet(table, uri, compression="no-such-codec")
    assert not storage.exists(uri)


def test_missing_bucket_is_one_clear_error(s3_env):
    with pytest.raises(NotFoundError) as err:
        storage.read_bytes("s3://no-such-bucket-xyz/k")
    assert "bucket 'no-such-bucket-xyz' does not exist" in str(err.value)
    with pytest.raises(NotFoundError, match="bucket 'no-such-bucket-xyz' does not exist"):
        storage.open_parquet("s3://no-such-bucket-xyz/k.parquet")
    with pytest.raises(NotFoundError, match="bucket 'no-such-bucket-xyz' does not exist"):
        storage.exists("s3://no-such-bucket-xyz/k")


@pytest.mark.parametrize("variable", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_wrong_credentials_are_one_clear_error_without_the_secret(bucket, monkeypatch, variable):
    storage.write_bytes(f"{bucket}/k", b"x")
    wrong = "WRONGwrongWRONG1234567890"
    monkeypatch.setenv(variable, wrong)
    real_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for op in (
        lambda: storage.read_bytes(f"{bucket}/k"),
        lambda: storage.write_bytes(f"{bucket}/k2", b"x"),
        lambda: storage.list_files(bucket),
        lambda: storage.open_parquet(f"{bucket}/k"),
    ):
        with pytest.raises(StorageError) as err:
            op()
        msg = str(err.value)
        assert "credentials" in msg
        assert bucket in msg
        assert wrong not in msg and real_secret not in msg


def test_unreachable_endpoint(monkeypatch, s3_env):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: closed
    monkeypatch.setenv("XFER_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(
        StorageError, match=r"cannot reach S3 endpoint http://127.0.0.1:9 for s3://xfer/k"
    ):
        storage.read_bytes("s3://xfer/k")
    with pytest.raises(StorageError, match=r"cannot reach S3 endpoint"):
        storage.open_parquet("s3://xfer/k.parquet")


def test_local_errors_name_the_path(tmp_path):
    with pytest.raises(NotFoundError, match=str(tmp_path / "nope")):
        storage.read_bytes(str(tmp_path / "nope"))


def test_file_uris_list_as_file_uris_so_keep_keeps_them(tmp_path):
    """On main a ``file://`` root listed bare paths: keep={file://...} kept nothing."""
    root = f"file://{tmp_path}/p"
    for name in ("a", "b", "sub/c"):
        storage.write_bytes(f"{root}/{name}", b"x")
    assert [f.uri for f in storage.list_files(root)] == [f"{root}/a", f"{root}/b", f"{root}/sub/c"]
    assert storage.delete_prefix(root, keep={f"{root}/b"}) == 2
    assert [f.uri for f in storage.list_files(root)] == [f"{root}/b"]
    assert not (tmp_path / "p" / "sub").exists(), "emptied folders go too"


def test_a_commit_that_fails_keeps_the_old_set_whole_and_its_staging(root, monkeypatch):
    """The marker is written before anything is deleted; a failed commit keeps its staging."""
    final = f"{root}/ds"
    commit.commit_prefix(_stage(final, "v-old", 2), final, "manifest.json", b"old")
    staging = _stage(final, "v-new", 2)

    def refuse(uri, *args, **kwargs):
        raise StorageError(f"refused: {uri}")

    monkeypatch.setattr(commit, "write_bytes", refuse)  # the marker write fails
    with pytest.raises(StorageError):
        commit.commit_prefix(staging, final, "manifest.json", b"new")
    assert storage.read_bytes(f"{final}/manifest.json") == b"old"
    assert storage.read_bytes(f"{final}/v-old/part-0") == b"v-old"
    for i in range(2):  # the new set is not lost: still staged (S3) or moved in (local)
        assert storage.exists(f"{staging}/v-new/part-{i}") or storage.exists(
            f"{final}/v-new/part-{i}"
        )


def _stage(final: str, version: str, n: int) -> str:
    staging = commit.staging_prefix(final)
    for i in range(n):
        storage.write_bytes(f"{staging}/{version}/part-{i}", version.encode())
    return staging
