"""The SavedModel export: served without xfer, it scores as `xfer score` does.

The exported directory is loaded with ``tf.saved_model.load`` in a fresh Python
process in which importing ``xfer`` (or ``tf_keras``) raises, as TF Serving, which runs
no Python at all, would load it. One export, one ``xfer score`` and one such process
serve every test here.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from xfer.data.synth import render
from xfer.models.export import SAVED_MODEL_DIR, export_on_ray, export_saved_model
from xfer.registry.layout import MODEL_FILE, MODEL_INFO, write_success
from xfer.scoring.score import score
from xfer.store import storage

from .conftest import IMAGE_SIZE, config_for

# Images prepared by the same decode and resize in both: float32 rounding only.
EXACT = 1e-4
# Images above max_side (and GIF, WebP): the pre-resize in TensorFlow ops, within one
# level of PIL's pixels, then for JPEGs the shard copy's re-encoding, which spreads
# those differences. Measured on this model: JPEGs 3.3e-3 at most, PNGs 8.6e-5.
PRE_RESIZED_JPEG = 0.01
PRE_RESIZED_LOSSLESS = 1e-3
TEMPERATURE = 2.0

SERVE = r"""
import json, sys

class NoXfer:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("xfer", "tf_keras"):
            raise ImportError(f"the exported model must load without {name}")
        return None

sys.meta_path.insert(0, NoXfer())
import base64
import tensorflow as tf

job = json.load(open(sys.argv[1]))
files = {k: base64.b64decode(v) for k, v in job["files"].items()}
out = {}
for name, path in job["models"].items():
    serve = tf.saved_model.load(path).signatures["serving_default"]
    rows = {}
    for key, data in files.items():
        try:
            got = serve(image_bytes=tf.constant([data]))
        except tf.errors.InvalidArgumentError as exc:
            rows[key] = {"error": exc.message}
            continue
        rows[key] = {
            "probabilities": got["probabilities"].numpy()[0].tolist(),
            "label": got["label"].numpy()[0].decode(),
            "index": int(got["index"].numpy()[0]),
        }
    good = sorted(k for k in rows if "error" not in rows[k])
    batch = serve(image_bytes=tf.constant([files[k] for k in good]))
    out[name] = {"rows": rows, "batch": dict(zip(good, batch["probabilities"].numpy().tolist()))}
assert "xfer" not in sys.modules and "tf_keras" not in sys.modules
json.dump(out, open(sys.argv[2], "w"))
"""


def encoded(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def make_inputs(session_root: str) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """(files ``xfer score`` reads as they are, files it pre-resizes), by key."""
    raw = [f.uri for f in storage.list_files(f"{session_root}/raw/shapes")]
    picked = [u for u in raw if "/ring/" in u][:6] + [u for u in raw if "/star/" in u][:6]
    exact = {"raw/" + u.split("/raw/shapes/")[1]: storage.read_bytes(u) for u in picked}
    for key in list(exact)[::4]:  # lossless copies of some
        png = encoded(Image.open(io.BytesIO(exact[key])).convert("RGB"), "PNG")
        exact[key.replace("raw/", "png/").replace(".jpg", ".png")] = png
    rng = np.random.default_rng(25)
    larger = {}
    for i, shape in enumerate(["ring", "star"] * 2):
        img = render(shape, 97 + 40 * i, rng)
        larger[f"big/{shape}{i}.jpg"] = encoded(img, "JPEG", quality=95)
        larger[f"big/{shape}{i}.png"] = encoded(img, "PNG")
    # Within max_side, but converted (as JPEG) by sharding and scoring.
    larger["gif/star.gif"] = encoded(render("star", IMAGE_SIZE, rng), "GIF")
    larger["webp/ring.webp"] = encoded(render("ring", 40, rng), "WEBP", quality=90)
    return exact, larger


def xfer_scores(session_root: str, inputs: str, run_uri: str, out: str) -> dict[str, Any]:
    cfg = config_for(session_root, "score.batch_size=8")
    result = score(cfg, run_uri, inputs, out, date="2026-11-30")
    marker = storage.read_json(f"{result.output}/_SUCCESS")
    rows = [
        r for f in marker["files"] for r in storage.read_parquet(f"{result.output}/{f}").to_pylist()
    ]
    assert result.errors == 0
    return {r["key"]: r for r in rows}


@pytest.fixture(scope="module")
def served(trained_run, session_root, bucket_module, tmp_path_factory):
    """The export (and a calibrated copy), ``xfer score`` and the served outputs."""
    run = trained_run.run_uri
    # Two copies of the trained model: uncalibrated, and with a temperature in its record.
    info = storage.read_json(f"{run}/model/{MODEL_INFO}")
    plain_info = {k: v for k, v in info.items() if k != "calibration"}
    plain, calibrated = f"{bucket_module}/runs/plain", f"{bucket_module}/runs/calibrated"
    copies = {
        plain: plain_info,
        calibrated: {
            **plain_info,
            "calibration": {
                "calibrated": True,
                "temperature": TEMPERATURE,
                "method": "temperature",
            },
        },
    }
    for uri, record in copies.items():
        storage.copy(f"{run}/model/{MODEL_FILE}", f"{uri}/model/{MODEL_FILE}")
        storage.write_json(f"{uri}/model/{MODEL_INFO}", record)
        write_success(uri, storage.basename(uri))
    summary = export_on_ray(plain)
    calibrated_summary = export_saved_model(calibrated)

    exact, larger = make_inputs(session_root)
    files = {**exact, **larger}
    for key, data in files.items():
        storage.write_bytes(f"{bucket_module}/inputs/{key}", data)
    # The network's own probabilities: the uncalibrated copy scored.
    scored = xfer_scores(session_root, f"{bucket_module}/inputs", plain, f"{bucket_module}/preds")

    local = tmp_path_factory.mktemp("served")
    models = {}
    for name, uri in (("plain", plain), ("calibrated", calibrated), ("run", run)):
        storage.download_dir(f"{uri}/model/{SAVED_MODEL_DIR}", str(local / name))
        models[name] = str(local / name)
    bad = {
        "bad/notes.txt": b"not an image",
        "bad/empty.jpg": b"",
        "bad/truncated.jpg": exact[next(iter(exact))][:300],
    }
    out = serve_without_xfer(models, {**files, **bad}, local)
    return {
        "summary": summary,
        "calibrated_summary": calibrated_summary,
        "run": trained_run,
        "exact": exact,
        "larger": larger,
        "scored": scored,
        "out": out,
    }


def serve_without_xfer(models: dict[str, str], files: dict[str, bytes], local: Path) -> Any:
    """Each SavedModel's outputs for each file, from a process that cannot import xfer."""
    job = {"models": models, "files": {k: base64.b64encode(v).decode() for k, v in files.items()}}
    (local / "job.json").write_text(json.dumps(job))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, str(local / "job.json"), str(local / "out.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=str(local),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((local / "out.json").read_text())


@pytest.fixture(scope="module")
def bucket_module(s3_server):
    import uuid

    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return f"s3://{name}"


def xfer_probabilities(row: dict[str, Any]) -> list[float]:
    return [row["prob_ring"], row["prob_star"]]


@pytest.mark.slow
def test_served_without_xfer_scores_like_xfer_score(served):
    summary, out, scored = served["summary"], served["out"]["plain"], served["scored"]
    assert summary["signature"] == "serving_default" and summary["temperature"] == 1.0
    assert summary["path"].endswith("/model/saved_model") and summary["classes"] == ["ring", "star"]
    diffs = []
    for key in served["exact"]:
        got, want = out["rows"][key], scored[key]
        assert got["label"] == want["predicted_label"] and got["index"] == want["predicted_index"]
        diffs.append(np.abs(np.array(got["probabilities"]) - xfer_probabilities(want)).max())
        # A batch gives what single images give.
        assert np.allclose(out["batch"][key], got["probabilities"], atol=1e-6)
    print(f"max difference from xfer score: {max(diffs):.2e} over {len(diffs)} images")
    assert max(diffs) <= EXACT
    # Both classes are predicted: the comparison is not of one constant answer.
    assert {out["rows"][k]["label"] for k in served["exact"]} == {"ring", "star"}


@pytest.mark.slow
def test_calibrated_export_applies_the_records_temperature(served):
    assert served["calibrated_summary"]["temperature"] == TEMPERATURE
    out, scored = served["out"]["calibrated"], served["scored"]
    moved = 0.0
    for key in served["exact"]:
        p = np.clip(np.array(xfer_probabilities(scored[key]), dtype=np.float64), 1e-7, 1.0)
        logits = np.log(p) / TEMPERATURE
        want = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        got = np.array(out["rows"][key]["probabilities"])
        assert np.abs(got - want).max() <= EXACT, key
        assert out["rows"][key]["label"] == scored[key]["predicted_label"]
        moved = max(moved, float(np.abs(got - xfer_probabilities(scored[key])).max()))
    assert moved > 0.01  # the temperature changed the probabilities


@pytest.mark.slow
def test_every_run_exports_itself_with_its_own_temperature(served):
    """finish_run's export: ``model/saved_model/`` of the run, calibrated as scoring is."""
    from xfer.models.calibration import apply_temperature

    run = served["run"]
    export = run.metrics["export"]
    t = run.metrics["calibration"]["temperature"]
    assert run.metrics["calibration"]["calibrated"] and export["temperature"] == t
    assert export["path"] == f"{run.run_uri}/model/{SAVED_MODEL_DIR}"
    out, scored = served["out"]["run"], served["scored"]
    for key in served["exact"]:
        want = apply_temperature(np.array([xfer_probabilities(scored[key])]), t)[0]
        assert np.abs(np.array(out["rows"][key]["probabilities"]) - want).max() <= EXACT, key


@pytest.mark.slow
def test_larger_images_png_and_bad_bytes(served):
    out, scored = served["out"]["plain"], served["scored"]
    diffs = {}
    for key in served["larger"]:
        got, want = out["rows"][key], scored[key]
        assert got["label"] == want["predicted_label"], key
        diffs[key] = float(np.abs(np.array(got["probabilities"]) - xfer_probabilities(want)).max())
    print(
        "pre-resized images, difference from xfer score:", {k: f"{v:.1e}" for k, v in diffs.items()}
    )
    for key, diff in diffs.items():
        assert diff <= (PRE_RESIZED_JPEG if key.endswith(".jpg") else PRE_RESIZED_LOSSLESS), diffs
    # Bad bytes: a clear error naming the problem, not a wrong answer.
    rows = out["rows"]
    assert "Unknown image file format" in rows["bad/notes.txt"]["error"]
    assert "Input is empty" in rows["bad/empty.jpg"]["error"]
    assert "Invalid JPEG data" in rows["bad/truncated.jpg"]["error"]


def test_pre_resize_is_within_one_level_of_pils():
    """The graph's pre-resize against :func:`xfer.data.images.normalise` (PIL), from just
    above max_side to PIL's block-averaging ``reduce`` (4x and more) and thin images."""
    import tensorflow as tf

    from xfer.data.images import normalise
    from xfer.models.export import pil_resize

    resize = tf.function(
        pil_resize,
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.uint8),
            tf.TensorSpec([], tf.int32),
            tf.TensorSpec([], tf.int32),
        ],
    )
    rng = np.random.default_rng(5)
    for width, height in [(49, 49), (97, 97), (217, 217), (333, 233), (1001, 600), (900, 90)]:
        img = render("star", max(width, height), rng).resize((width, height))
        want = np.asarray(normalise(img, IMAGE_SIZE), dtype=np.int32)
        got = resize(np.asarray(img), *want.shape[:2]).numpy().astype(np.int32)
        diff = np.abs(got - want)
        assert got.shape == want.shape and diff.max() <= 1, (width, height, diff.max())
        assert (diff > 0).mean() < 0.15, (width, height, (diff > 0).mean())
