"""`xfer synth` and `xfer shard` on the real embedded S3 server and local paths."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from xfer.config import ShardConfig
from xfer.data.manifest import SHARD_COLUMNS, load_manifest
from xfer.data.shard import shard_dataset
from xfer.data.synth import synthesize
from xfer.errors import DataError
from xfer.store import storage

from .conftest import run_xfer


def jpeg(arr: np.ndarray, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG claiming ``width`` x ``height`` pixels with almost no data: a bomb header."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        body = tag + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def all_rows(dataset: str, split: str) -> pa.Table:
    m = load_manifest(dataset)
    return pa.concat_tables([storage.read_parquet(u) for u in m.shard_uris(split)])


def test_synth_shard_roundtrip_on_s3(bucket, ray_local):
    raw, ds = f"{bucket}/raw", f"{bucket}/datasets/shapes"
    assert synthesize(raw, ["circle", "square", "triangle"], per_class=30, size=32) == 90
    summary = shard_dataset(raw, ds, ShardConfig(target_shard_mb=0.02, row_group_rows=8))
    m = load_manifest(ds)
    assert m.classes == ["circle", "square", "triangle"]
    assert sum(s.rows for s in m.splits.values()) == 90
    assert summary.rows == {s: v.rows for s, v in m.splits.items()}
    train = m.split("train")
    assert len(train.shards) >= 2
    counts = [sh.rows for sh in train.shards]
    assert max(counts) - min(counts) <= 1, "shards are not balanced"
    for shard in train.shards:
        assert sum(shard.row_groups) == shard.rows
    # Every row's label is the folder it came from, and columns are as documented.
    for split in m.splits:
        table = all_rows(ds, split)
        assert tuple(table.column_names) == SHARD_COLUMNS
        for key, label in zip(
            table.column("key").to_pylist(), table.column("label").to_pylist(), strict=True
        ):
            assert m.classes[label] == key.split("/")[0]
        assert sum(m.split(split).class_counts.values()) == table.num_rows
    # Shard checksums match the bytes.
    import hashlib

    first = train.shards[0]
    assert hashlib.sha256(storage.read_bytes(f"{ds}/{first.path}")).hexdigest() == first.sha256
    # Nothing staged is left behind.
    assert not [f for f in storage.list_files(bucket) if "/_tmp/" in f.uri]


def test_resharding_is_deterministic(tmp_path, ray_local):
    raw = str(tmp_path / "raw")
    synthesize(raw, ["a", "b"], per_class=25, size=24, seed=3)
    settings = ShardConfig(target_shard_mb=0.01, row_group_rows=4, files_per_task=7)
    shard_dataset(raw, str(tmp_path / "ds1"), settings)
    # Different parallelism, same output.
    shard_dataset(
        raw,
        str(tmp_path / "ds2"),
        ShardConfig(target_shard_mb=0.01, row_group_rows=4, files_per_task=50),
    )
    m1, m2 = load_manifest(str(tmp_path / "ds1")), load_manifest(str(tmp_path / "ds2"))
    assert m1.body() | {"name": ""} == m2.body() | {"name": ""}
    assert {s: [sh.sha256 for sh in v.shards] for s, v in m1.splits.items()} == {
        s: [sh.sha256 for sh in v.shards] for s, v in m2.splits.items()
    }
    # Same input, same place: the manifest is byte-identical.
    before = storage.read_bytes(str(tmp_path / "ds1" / "manifest.json"))
    shard_dataset(raw, str(tmp_path / "ds1"), settings)
    assert storage.read_bytes(str(tmp_path / "ds1" / "manifest.json")) == before


def make_messy_tree(root: str) -> dict[str, str]:
    """A tree with every kind of bad input; returns key -> expected reason fragment."""
    rng = np.random.default_rng(0)
    good = lambda: rng.integers(0, 255, size=(40, 40, 3), dtype=np.uint8)  # noqa: E731
    for cls in ("cat", "dog"):
        for i in range(12):
            storage.write_bytes(f"{root}/{cls}/ok_{i}.jpg", jpeg(good()))
    truncated = jpeg(good())
    storage.write_bytes(f"{root}/cat/truncated.jpg", truncated[: len(truncated) // 2])
    storage.write_bytes(f"{root}/cat/empty.jpg", b"")
    storage.write_bytes(f"{root}/dog/notes.txt", b"these are not pixels\n")
    storage.write_bytes(f"{root}/dog/bomb.png", png_header_only(40_000, 40_000))
    storage.write_bytes(f"{root}/dog/gray.jpg", jpeg(good(), mode="L"))
    storage.write_bytes(f"{root}/cat/cmyk.jpg", jpeg(good(), mode="CMYK"))
    storage.write_bytes(f"{root}/cat/alpha.png", jpeg(good(), mode="RGBA", fmt="PNG"))
    twin = jpeg(good())
    storage.write_bytes(f"{root}/cat/twin.jpg", twin)
    storage.write_bytes(f"{root}/dog/twin.jpg", twin)
    dup = jpeg(good())
    storage.write_bytes(f"{root}/dog/dup_a.jpg", dup)
    storage.write_bytes(f"{root}/dog/dup_b.jpg", dup)
    storage.write_bytes(f"{root}/stray.jpg", jpeg(good()))
    return {
        "cat/truncated.jpg": "truncated or corrupt",
        "cat/empty.jpg": "empty file",
        "dog/notes.txt": "not an image",
        "dog/bomb.png": "image too large",
        "cat/twin.jpg": "same content under different labels",
        "dog/twin.jpg": "same content under different labels",
        "dog/dup_b.jpg": "duplicate of dog/dup_a.jpg",
        "stray.jpg": "not inside a class folder",
    }


def test_bad_inputs_are_rejected_with_reasons_never_fatal(bucket, ray_local):
    raw, ds = f"{bucket}/messy", f"{bucket}/datasets/messy"
    expected = make_messy_tree(raw)
    summary = shard_dataset(raw, ds, ShardConfig(max_rejected_fraction=0.5))
    listed = load_manifest(ds).rejected["list"]
    rejects = storage.read_parquet(f"{ds}/{listed}").to_pylist()
    got = {r["key"]: r["reason"] for r in rejects}
    assert set(got) == set(expected)
    for key, fragment in expected.items():
        assert fragment in got[key], (key, got[key])
    m = load_manifest(ds)
    assert m.rejected["count"] == len(expected) == sum(summary.rejected.values())
    assert m.rejected["converted_to_rgb"] == 3  # gray, cmyk, alpha kept as RGB
    keys = set()
    for split in m.splits:
        table = all_rows(ds, split)
        keys |= set(table.column("key").to_pylist())
        for img in table.column("image").to_pylist():
            assert Image.open(io.BytesIO(img)).mode == "RGB"
    assert {"dog/gray.jpg", "cat/cmyk.jpg", "cat/alpha.png", "dog/dup_a.jpg"} <= keys
    assert not keys & set(expected)
    assert len(keys) == 24 + 4


def test_too_many_rejects_fails_and_commits_nothing(bucket, ray_local):
    raw, ds = f"{bucket}/messy", f"{bucket}/datasets/messy"
    make_messy_tree(raw)
    with pytest.raises(DataError) as err:
        shard_dataset(raw, ds, ShardConfig(max_rejected_fraction=0.05))
    msg = str(err.value)
    assert "8 of 36 inputs rejected" in msg and "nothing was written" in msg
    assert "empty file" in msg
    assert storage.list_files(ds) == []
    assert not [f for f in storage.list_files(bucket) if "/_tmp/" in f.uri]


def test_sharding_into_the_folder_of_all_datasets_is_refused(bucket, ray_local):
    """On main `xfer shard SRC s3://b/datasets` deleted datasets/<name>/manifest.json."""
    raw = f"{bucket}/raw"
    synthesize(raw, ["a", "b"], per_class=6, size=32, seed=1)
    shard_dataset(raw, f"{bucket}/datasets/pets", ShardConfig())
    before = storage.list_files(f"{bucket}/datasets")
    with pytest.raises(DataError, match="not a dataset"):
        shard_dataset(raw, f"{bucket}/datasets", ShardConfig())
    assert storage.list_files(f"{bucket}/datasets") == before
    # Re-sharding a dataset in place replaces it: one version, the old one gone.
    shard_dataset(raw, f"{bucket}/datasets/pets", ShardConfig(max_side=16))
    manifest = load_manifest(f"{bucket}/datasets/pets")
    versions = {f.uri.split("/pets/")[1].split("/")[0] for f in storage.list_files(manifest.uri)}
    assert versions == {"manifest.json", manifest.split("train").shards[0].path.split("/")[0]}


def test_list_input_and_pre_resize(tmp_path, ray_local):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(16):
        name = f"img{i}.png"
        storage.write_bytes(
            str(tmp_path / "imgs" / name),
            jpeg(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8), fmt="PNG"),
        )
        rows.append(f"imgs/{name},{'odd' if i % 2 else 'even'}")
    (tmp_path / "list.csv").write_text("uri,label\n" + "\n".join(rows) + "\n")
    shard_dataset(
        str(tmp_path / "list.csv"),
        str(tmp_path / "ds"),
        ShardConfig(max_side=64, jpeg_quality=80),
    )
    m = load_manifest(str(tmp_path / "ds"))
    assert m.classes == ["even", "odd"]
    assert m.settings["max_side"] == 64
    for split in m.splits:
        table = all_rows(str(tmp_path / "ds"), split)
        assert max(table.column("height").to_pylist()) == 64
        assert max(table.column("width").to_pylist()) <= 64
        for img in table.column("image").to_pylist():
            # Resized PNGs stay lossless (scoring the raw PNG gives the same pixels).
            assert Image.open(io.BytesIO(img)).format == "PNG"


def test_missing_source_and_single_class(tmp_path, ray_local):
    with pytest.raises(DataError, match=r"source not found|no images found"):
        shard_dataset(str(tmp_path / "nope"), str(tmp_path / "ds"))
    synthesize(str(tmp_path / "one"), ["a", "b"], per_class=2, size=16)
    storage.delete_prefix(str(tmp_path / "one" / "b"))
    with pytest.raises(DataError, match="need at least 2"):
        shard_dataset(str(tmp_path / "one"), str(tmp_path / "ds"))


def test_progress_in_job_logs_is_periodic_lines(capsys):
    """Not a terminal (a pod's log): no bar, a line per interval with the rate and time left."""
    from xfer.console import Progress

    with Progress("shard: write shards", 4, unit="task", every_s=0.0) as bar:
        for _ in range(4):
            bar.update()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "[xfer] shard: write shards: 1/4 tasks",
        "[xfer] shard: write shards: 2/4 tasks",
        "[xfer] shard: write shards: 3/4 tasks",
    ]
    assert all("/s, about " in line and line.endswith("s left") for line in lines)
    with Progress("quiet", 3, every_s=3600) as bar:  # the default interval: 30 s
        bar.update(3)
    assert capsys.readouterr().out == ""


def test_shard_command_takes_a_config_file_flags_and_overrides(tmp_path, ray_local):
    """Defaults < the config's shard: section < flags < key=value overrides."""
    from xfer.cli import main

    raw = str(tmp_path / "raw")
    synthesize(raw, ["a", "b"], per_class=12, size=48)
    config = tmp_path / "shard.yaml"
    config.write_text(
        "# xfer shard RAW DS --config shard.yaml\n"
        "output: {model_name: shapes}\n"
        "shard: {max_side: 24, jpeg_quality: 70, split_fractions: [0.5, 0.5, 0.0], name: from-file}\n"
    )
    ds = str(tmp_path / "ds")
    args = ["shard", raw, ds, "--config", str(config), "--quality", "80", "shard.name=over"]
    assert main(args) == 0
    m = load_manifest(ds)
    assert m.settings["max_side"] == 24  # the file
    assert m.settings["jpeg_quality"] == 80  # the flag over the file
    assert m.name == "over"  # the override over the file
    assert m.settings["split_fractions"] == [0.5, 0.5, 0.0]
    assert "test" not in m.splits or m.splits["test"].rows == 0
    # Errors, as a user sees them: the real command, one line naming the key.
    for argv, says in (
        (["shard.max_sid=32"], "unknown key 'shard.max_sid' in command-line override"),
        (["--split", "0.5,0.2,0.2"], "shard.split_fractions: needs three fractions"),
        (["--config", str(config), "shard.max_sid=32"], "did you mean 'shard.max_side'"),
    ):
        proc = run_xfer("shard", raw, ds, *argv, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert says in proc.stderr and "Traceback" not in proc.stderr


def test_num_tasks_bounds_the_tasks_running_at_once(ray_local, tmp_path):
    """run_tasks with max_in_flight never has more than that many tasks started and unfinished."""
    from xfer.raycluster import run_tasks

    log = tmp_path / "events"
    log.mkdir()

    def task(i: int, folder: str) -> int:
        import os
        import time

        open(os.path.join(folder, f"start-{i}-{time.monotonic_ns()}"), "w").close()
        time.sleep(0.3)
        open(os.path.join(folder, f"end-{i}-{time.monotonic_ns()}"), "w").close()
        return i * i

    assert run_tasks(task, [(i, str(log)) for i in range(6)], "t", max_in_flight=1) == [
        i * i for i in range(6)
    ]
    events = sorted(
        (int(name.rsplit("-", 1)[1]), name.split("-")[0])
        for name in (p.name for p in log.iterdir())
    )
    running = peak = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 1


def test_shard_and_score_list_the_same_inputs(tmp_path):
    """One listing module: a prefix and a uri list give both jobs the same keys and URIs."""
    from xfer.data import inputs
    from xfer.scoring.scoreplan import list_objects

    raw = tmp_path / "raw"
    synthesize(str(raw), ["a", "b"], per_class=3, size=16)
    (raw / "a" / ".DS_Store").write_bytes(b"x")
    (raw / "a" / "Thumbs.db").write_bytes(b"x")
    tree = inputs.class_tree(str(raw))
    scored = list(list_objects(str(raw)))
    assert [(i.key, i.uri) for i in tree] == [(r["key"], r["source_uri"]) for r in scored]
    assert len(tree) == 6 and {i.label for i in tree} == {"a", "b"}
    listing = tmp_path / "list.csv"
    rows = [f"raw/{i.key},{i.label}" for i in tree]
    listing.write_text("uri,label\n" + "\n".join(rows) + "\n,\n")
    labelled = inputs.read_list(str(listing), labelled=True)
    assert [i.uri for i in labelled] == [i.uri for i in tree]  # relative to the list's folder
    assert [i.label for i in labelled] == [i.label for i in tree]
    scored_list = list(list_objects(str(listing)))
    assert [r["source_uri"] for r in scored_list] == [i.uri for i in tree]
    (tmp_path / "bad.csv").write_text("path\nx.jpg\n")
    with pytest.raises(DataError, match=r"needs uri,label \(missing: label, uri\)"):
        inputs.read_list(str(tmp_path / "bad.csv"), labelled=True)
    with pytest.raises(DataError, match=r"--input: .* needs a uri column"):
        list(list_objects(str(tmp_path / "bad.csv")))
