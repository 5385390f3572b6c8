"""`xfer score`: Ray Data batch scoring into idempotent Parquet partitions."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image

from xfer.data.synth import synthesize
from xfer.errors import XferError
from xfer.registry.layout import resolve_model
from xfer.scoring.score import score
from xfer.store import storage

from .conftest import IMAGE_SIZE, config_for


def make_inputs(prefix: str) -> dict[str, str]:
    """Eight good images and three bad ones; returns bad key -> expected reason."""
    synthesize(prefix, ["ring", "star"], per_class=4, size=60, seed=99)
    storage.write_bytes(f"{prefix}/bad/empty.jpg", b"")
    storage.write_bytes(f"{prefix}/bad/notes.txt", b"not an image")
    buf = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buf, format="JPEG")
    storage.write_bytes(f"{prefix}/bad/truncated.jpg", buf.getvalue()[: len(buf.getvalue()) // 2])
    return {
        "bad/empty.jpg": "empty file",
        "bad/notes.txt": "not an image",
        "bad/truncated.jpg": "cannot decode",
    }


def local_predictions(run_uri: str, blobs: dict[str, bytes]) -> dict[str, float]:
    """P(star) from plain tf_keras model.predict on the same prepared images.

    The images are 60 px and the model records a 48 px pre-resize (and JPEG quality
    90): prepared as their shards would be, then decoded and resized as in training.
    """
    import tempfile

    import tf_keras

    from xfer.scoring.scorer import image_pixels

    path = os.path.join(tempfile.mkdtemp(), "model.keras")
    storage.download_file(f"{run_uri}/model/model.keras", path)
    model = tf_keras.models.load_model(path, compile=False)
    keys = sorted(blobs)
    x = np.stack(
        [image_pixels(blobs[k], IMAGE_SIZE, max_side=IMAGE_SIZE, jpeg_quality=90) for k in keys]
    )
    return dict(zip(keys, model.predict(x, verbose=0).reshape(-1).tolist(), strict=True))


def calibrated(p_star: Any, run_uri: str) -> Any:
    """The model's own P(star) with the run's temperature applied, as scoring applies it."""
    from xfer.models.calibration import apply_temperature
    from xfer.registry.layout import resolve_model

    t = resolve_model(run_uri).temperature
    if isinstance(p_star, dict):
        keys = list(p_star)
        return dict(
            zip(keys, calibrated(np.array([p_star[k] for k in keys]), run_uri), strict=True)
        )
    p = np.asarray(p_star, dtype=np.float64).reshape(-1)
    return p if t is None else apply_temperature(np.stack([1 - p, p], axis=1), t)[:, 1]


def test_scores_every_input_with_error_rows_and_exact_predictions(
    trained_run, session_root, bucket
):
    inputs = f"{bucket}/incoming"
    bad = make_inputs(inputs)
    cfg = config_for(session_root, "score.batch_size=4")
    result = score(
        cfg,
        model=f"{session_root}/models/shapes",
        input_uri=inputs,
        output=f"{bucket}/preds",
        date="2026-03-04",
    )
    part = f"{bucket}/preds/dt=2026-03-04"
    assert result.output == part and result.rows == 11 and result.errors == 3
    marker = storage.read_json(f"{part}/_SUCCESS")
    table = storage.read_parquet(f"{part}/{marker['files'][0]}")
    assert table.num_rows == 11 == marker["rows"]
    for col in (
        "key",
        "source_uri",
        "predicted_label",
        "predicted_index",
        "probability",
        "prob_ring",
        "prob_star",
        "model_name",
        "run_id",
        "scored_at",
        "error",
    ):
        assert col in table.column_names
    rows = {r["key"]: r for r in table.to_pylist()}
    assert set(rows) == {f.uri[len(inputs) + 1 :] for f in storage.list_files(inputs)}
    for key, reason in bad.items():
        assert reason in rows[key]["error"] and rows[key]["predicted_label"] is None
    good = {k: storage.read_bytes(f"{inputs}/{k}") for k in rows if k not in bad}
    expected = calibrated(local_predictions(trained_run.run_uri, good), trained_run.run_uri)
    for key, p_star in expected.items():
        r = rows[key]
        assert (
            r["error"] is None and r["run_id"] == trained_run.run_id and r["model_name"] == "shapes"
        )
        assert r["prob_star"] == pytest.approx(p_star, abs=1e-5)
        assert r["predicted_label"] == ("star" if p_star >= 0.5 else "ring")
        assert r["probability"] == pytest.approx(max(p_star, 1 - p_star), abs=1e-5)
    # The trained model is good: most clean images are classified as their folder.
    correct = sum(rows[k]["predicted_label"] == k.split("/")[0] for k in good)
    assert correct >= 6


def test_rerun_of_a_date_leaves_exactly_one_complete_partition(trained_run, session_root, bucket):
    inputs = f"{bucket}/incoming"
    make_inputs(inputs)
    cfg = config_for(session_root)
    out = f"{bucket}/preds"
    first = score(cfg, model=trained_run.run_uri, input_uri=inputs, output=out, date="2026-03-05")
    marker1 = storage.read_json(f"{first.output}/_SUCCESS")
    second = score(cfg, model=trained_run.run_uri, input_uri=inputs, output=out, date="2026-03-05")
    marker2 = storage.read_json(f"{second.output}/_SUCCESS")
    names = sorted(storage.basename(f.uri) for f in storage.list_files(second.output))
    expected = [*marker2["files"], "_SUCCESS", "_summary.json", "_report.html"]
    assert names == sorted(expected), "files of the first run are left behind"
    assert set(marker1["files"]).isdisjoint(marker2["files"])
    total = sum(storage.read_parquet(f"{second.output}/{f}").num_rows for f in marker2["files"])
    assert total == 11
    # Only this date's partition exists; nothing staged is left over.
    assert {storage.basename(storage.parent(f.uri)) for f in storage.list_files(out)} == {
        "dt=2026-03-05"
    }
    assert not [f for f in storage.list_files(bucket) if "/_tmp/" in f.uri]


def test_dataset_and_list_inputs(trained_run, session_root, target_dataset, tmp_path):
    from xfer.data.manifest import load_manifest

    cfg = config_for(session_root, "score.split=test")
    out = str(tmp_path / "preds")
    result = score(
        cfg, model=trained_run.run_uri, input_uri=target_dataset, output=out, date="2026-03-06"
    )
    assert result.rows == load_manifest(target_dataset).split("test").rows
    marker = storage.read_json(f"{out}/dt=2026-03-06/_SUCCESS")
    table = storage.read_parquet(f"{out}/dt=2026-03-06/{marker['files'][0]}")
    assert {"true_label", "true_index"} <= set(table.column_names)

    images = tmp_path / "imgs"
    synthesize(str(images), ["ring", "star"], per_class=2, size=40, seed=5)
    listing = tmp_path / "list.csv"
    listing.write_text(
        "uri\n"
        + "\n".join(str(p.relative_to(tmp_path)) for p in sorted(images.rglob("*.jpg")))
        + "\n"
    )
    result = score(
        cfg, model=trained_run.run_uri, input_uri=str(listing), output=out, date="2026-03-07"
    )
    assert result.rows == 4 and result.errors == 0


def test_missing_model_and_uncommitted_run_fail_clearly(trained_run, session_root, bucket):
    cfg = config_for(session_root)
    inputs = f"{bucket}/incoming"
    make_inputs(inputs)
    out = f"{bucket}/preds"
    with pytest.raises(XferError, match="no committed run or published model"):
        score(cfg, model=f"{session_root}/models/no-such-model", input_uri=inputs, output=out)
    # A run without _SUCCESS (crashed, or still running) is refused.
    fake = f"{bucket}/runs/unfinished"
    for f in storage.list_files(f"{trained_run.run_uri}/model"):
        storage.copy(f.uri, f"{fake}/model/{storage.basename(f.uri)}")
    with pytest.raises(XferError, match="not committed"):
        score(cfg, model=fake, input_uri=inputs, output=out)
    with pytest.raises(XferError, match="not a date"):
        score(cfg, model=trained_run.run_uri, input_uri=inputs, output=out, date="yesterday")
    assert storage.list_files(out) == []
    # The same through the CLI: one line, exit status 2, no traceback.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xfer",
            "score",
            "--model",
            fake,
            "--input",
            inputs,
            "--output",
            out,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        proc.returncode == 2 and "not committed" in proc.stderr and "Traceback" not in proc.stderr
    )


def test_resolve_model_follows_latest(trained_run, session_root):
    ref = resolve_model(f"{session_root}/models/shapes")
    assert (
        ref.run_id == trained_run.run_id
        and ref.classes == ["ring", "star"]
        and ref.image_size == IMAGE_SIZE
    )


def test_a_scoring_config_this_machine_cannot_run_fails_at_once(trained_run, bucket):
    """The shipped nightly config (4 GPU actors) run locally: on main it waited forever
    on resources it could never get; now it stops before any work, naming the keys."""
    inputs, out = f"{bucket}/incoming", f"{bucket}/preds"
    make_inputs(inputs)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xfer",
            "score",
            "--config",
            "jobs/configs/nightly_score.yaml",
            "--model",
            trained_run.run_uri,
            "--input",
            inputs,
            "--output",
            out,
            "cluster.local_num_cpus=2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RAY_ADDRESS": ""},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "this machine cannot run the job: it needs 16 CPUs" in proc.stderr
    assert "score.num_actors" in proc.stderr and "Traceback" not in proc.stderr
    assert storage.list_files(out) == []


# Measured on the session's model: EXIF-rotated and RGBA copies score exactly like
# their plain copies (the pixels are identical after normalisation); 5x upscaled
# copies, pre-resized back to the model's recorded 48 px, differ by up to ~0.06 (the
# antialiased pre-resize is not the inverse of the upscale). Raw and sharded copies
# of the same image score the same, to float precision.
UPSCALED_TOLERANCE = 0.1
SHARD_TOLERANCE = 1e-6


def _png(img: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def photo_like_inputs(prefix: str) -> None:
    """Plain images and, of each, an EXIF-rotated, an RGBA and 5x upscaled copies."""
    from xfer.data.synth import render

    for i in range(6):
        shape = ["ring", "star"][i % 2]
        plain = render(shape, IMAGE_SIZE, np.random.default_rng([7, i])).convert("RGB")
        # RGBA: a transparent corner (black under it) whose composite on white is the plain.
        rgba = plain.convert("RGBA")
        corner = Image.new("RGBA", (12, 12), (0, 0, 0, 0))
        rgba.paste(corner, (0, 0))
        plain.paste((255, 255, 255), (0, 0, 12, 12))
        storage.write_bytes(f"{prefix}/plain/{shape}{i}.png", _png(plain))
        storage.write_bytes(f"{prefix}/rgba/{shape}{i}.png", _png(rgba))
        # Stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view").
        exif = Image.Exif()
        exif[0x0112] = 6
        sideways = plain.transpose(Image.Transpose.ROTATE_90)
        storage.write_bytes(f"{prefix}/exif/{shape}{i}.png", _png(sideways, exif=exif))
        big = plain.resize((IMAGE_SIZE * 5, IMAGE_SIZE * 5), Image.Resampling.BICUBIC)
        storage.write_bytes(f"{prefix}/big/{shape}{i}.png", _png(big))
        # A camera-like copy: a large JPEG, re-encoded as JPEG in its shard.
        buf = io.BytesIO()
        big.save(buf, format="JPEG", quality=95)
        storage.write_bytes(f"{prefix}/bigjpeg/{shape}{i}.jpg", buf.getvalue())


def test_raw_images_score_like_their_plain_and_sharded_copies(trained_run, session_root, bucket):
    """One normalisation for shard, train and score: EXIF orientation, alpha, the
    model's recorded pre-resize. On main the sideways copies scored sideways and the
    RGBA copies lost their alpha (transparent black instead of white)."""
    from xfer.config import ShardConfig
    from xfer.data.shard import shard_dataset

    inputs = f"{bucket}/photos"
    photo_like_inputs(inputs)
    cfg = config_for(session_root, "score.split=all")
    raw = score(cfg, trained_run.run_uri, inputs, f"{bucket}/raw", date="2026-04-01")
    assert raw.rows == 30 and raw.errors == 0
    assert resolve_model(trained_run.run_uri).max_side == IMAGE_SIZE  # recorded by training
    table = storage.read_parquet(
        f"{raw.output}/{storage.read_json(raw.output + '/_SUCCESS')['files'][0]}"
    )
    p = {r["key"]: r["prob_star"] for r in table.to_pylist()}
    stems = sorted(k.split("/")[1] for k in p if k.startswith("plain/"))
    for stem in stems:
        assert p[f"exif/{stem}"] == pytest.approx(p[f"plain/{stem}"], abs=1e-6), stem
        assert p[f"rgba/{stem}"] == pytest.approx(p[f"plain/{stem}"], abs=1e-6), stem
    upscaled = {s: round(abs(p[f"big/{s}"] - p[f"plain/{s}"]), 4) for s in stems}
    assert max(upscaled.values()) <= UPSCALED_TOLERANCE, upscaled
    # Without the normalisation the copies would not agree: the test can tell.
    sideways_differs = any(abs(p[f"plain/{s}"] - p[f"exif/{s}"]) > 1e-6 for s in stems)
    assert not sideways_differs

    # The same images through `xfer shard` (the model's 48 px pre-resize) and scored
    # from the dataset agree with the raw scores.
    shard_dataset(
        inputs, f"{bucket}/ds", ShardConfig(max_side=IMAGE_SIZE, split_fractions=(0.4, 0.3, 0.3))
    )
    sharded = score(
        cfg, trained_run.run_uri, f"{bucket}/ds", f"{bucket}/sharded", date="2026-04-01"
    )
    marker = storage.read_json(sharded.output + "/_SUCCESS")
    rows = [
        r
        for f in marker["files"]
        for r in storage.read_parquet(f"{sharded.output}/{f}").to_pylist()
    ]
    by_source = {r["source_uri"]: r["prob_star"] for r in rows}
    raw_by_source = {r["source_uri"]: r["prob_star"] for r in table.to_pylist()}
    assert set(by_source) == set(raw_by_source) and len(by_source) == 30
    diffs = {u: abs(by_source[u] - raw_by_source[u]) for u in by_source}
    # Kept bytes, lossless re-encodings and JPEG re-encodings alike: scoring a raw
    # image gives the pixels of its sharded copy, so the scores are the same.
    assert max(diffs.values()) <= SHARD_TOLERANCE, diffs


def test_nightly_inputs_by_date_and_typed_columns(trained_run, session_root, bucket):
    """`--input` takes a {date} template; scored_at is a timestamp; the class order is
    in the file's metadata; classes that would share a column are refused."""
    import pyarrow as pa

    from xfer.scoring.predictions import class_columns

    synthesize(f"{bucket}/incoming/2026-05-02", ["ring", "star"], per_class=2, size=48, seed=3)
    synthesize(f"{bucket}/incoming/2026-05-03", ["ring", "star"], per_class=3, size=48, seed=4)
    cfg = config_for(session_root)
    template = f"{bucket}/incoming/{{date}}/"
    result = score(cfg, trained_run.run_uri, template, f"{bucket}/preds", date="2026-05-03")
    assert result.rows == 6
    marker = storage.read_json(f"{result.output}/_SUCCESS")
    assert marker["input"] == f"{bucket}/incoming/2026-05-03/"
    table = storage.read_parquet(f"{result.output}/{marker['files'][0]}")
    assert table.schema.field("scored_at").type == pa.timestamp("ms", tz="UTC")
    assert table.schema.metadata[b"xfer.classes"] == b'["ring", "star"]'
    with pytest.raises(XferError, match=r"only template field is \{date\}"):
        score(cfg, trained_run.run_uri, f"{bucket}/in/{{day}}/", f"{bucket}/preds")
    with pytest.raises(
        XferError, match="'a-b' and 'a_b' would both be written as column 'prob_a_b'"
    ):
        class_columns(["a-b", "a_b"])


def test_on_a_cluster_resources_that_never_come_fail_after_the_wait(ray_local, capsys):
    """On a cluster an autoscaler may add nodes: the job waits (saying so), then
    fails naming the keys, instead of pending forever as on main."""
    from xfer.errors import ConfigError
    from xfer.raycluster import check_capacity

    with pytest.raises(ConfigError, match=r"within 2s: the job needs 64 CPUs.*score\.num_actors"):
        check_capacity(
            64, 0, "score.num_actors x score.cpus_per_actor", local=False, wait_seconds=2
        )
    assert "waiting up to 2s more for resources" in capsys.readouterr().out
    check_capacity(1, 0, "score.num_actors", local=False, wait_seconds=2)  # fits: no wait


def test_test_time_augmentation_averages_the_image_and_its_mirror(
    trained_run, session_root, bucket
):
    import tempfile

    import tf_keras

    from xfer.scoring.scorer import image_pixels

    synthesize(f"{bucket}/tta", ["ring", "star"], per_class=3, size=48, seed=11)
    cfg = config_for(session_root, "score.tta=true")
    result = score(cfg, trained_run.run_uri, f"{bucket}/tta", f"{bucket}/tta-preds", "2026-05-04")
    marker = storage.read_json(f"{result.output}/_SUCCESS")
    rows = storage.read_parquet(f"{result.output}/{marker['files'][0]}").to_pylist()
    path = os.path.join(tempfile.mkdtemp(), "model.keras")
    storage.download_file(f"{trained_run.run_uri}/model/model.keras", path)
    model = tf_keras.models.load_model(path, compile=False)
    x = np.stack(
        [
            image_pixels(
                storage.read_bytes(r["source_uri"]), IMAGE_SIZE, IMAGE_SIZE, jpeg_quality=90
            )
            for r in rows
        ]
    )
    plain = model.predict(x, verbose=0).reshape(-1)
    mirrored = model.predict(x[:, :, ::-1, :], verbose=0).reshape(-1)
    by_hand = calibrated((plain + mirrored) / 2, trained_run.run_uri)
    got = np.array([r["prob_star"] for r in rows])
    assert np.allclose(got, by_hand, atol=1e-5)
    assert not np.allclose(got, plain, atol=1e-5), "the mirror must change something"


def test_a_quiet_run_keeps_the_scorers_identity_off_the_console(
    trained_run, session_root, bucket, capfd
):
    """A step of a larger job (a training run's test predictions, calibration's val
    scoring) scores quietly: the actors' identity lines go to the log file only. On
    main ``quiet`` went into the night's identity and the actors looked for it where it
    was not, so they printed "[xfer] scorer on node ..." to the console anyway."""
    import time
    from pathlib import Path

    from xfer import console
    from xfer.scoring.score import write_predictions

    synthesize(f"{bucket}/quiet", ["ring", "star"], per_class=2, size=48, seed=8)
    cfg = config_for(session_root, "score.num_actors=1")
    log = console.log_path()
    seen = os.path.getsize(log)
    capfd.readouterr()  # what earlier tests printed
    ref = resolve_model(trained_run.run_uri)
    result = write_predictions(
        ref, f"{bucket}/quiet", cfg.score, f"{bucket}/quiet-preds", quiet=True
    )
    assert result.rows == 4
    deadline = time.monotonic() + 60  # Ray forwards the actors' output a little later
    while "scorer on node" not in (text := Path(log).read_bytes()[seen:].decode()):
        assert time.monotonic() < deadline, "the actor's identity line never reached the log"
        time.sleep(0.5)
    with console._lock:  # the handler writes the file, then the console, under it
        out = capfd.readouterr().out
    assert "scorer on node" not in out, out
    assert "[xfer-detail] scorer on node" in text


def test_reads_run_ahead_of_the_decode_threads(trained_run, session_root, bucket, fault_proxy):
    """Every GET of an image waits 0.3 s at the store (S3's latency, exaggerated). With
    one decode thread, reads still go out several at a time (score.read_threads): on
    main each decode thread did its own GET first, so one thread meant one read in flight
    and a GPU actor on S3 waited on the network (docs/capacity.md)."""
    synthesize(f"{bucket}/slow", ["ring", "star"], per_class=8, size=IMAGE_SIZE, seed=5)
    fault_proxy.add("GET", r"/slow/.+\.(png|jpg)", "delay", pause=0.3, times=10**6)
    cfg = config_for(
        session_root,
        "score.num_actors=1",
        "score.decode_threads=1",
        "score.read_threads=8",
        "score.batch_size=8",
    )
    result = score(cfg, trained_run.run_uri, f"{bucket}/slow", f"{bucket}/preds-slow")
    assert result.rows == 16 and result.errors == 0
    assert len(fault_proxy.requests("GET", r"/slow/")) >= 16, "the reads missed the proxy"
    assert fault_proxy.max_in_flight["GET"] >= 4
