"""End-to-end training with 2 Ray workers under MWMS, on the embedded S3 server."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pyarrow.compute as pc
import pytest

from xfer.data.manifest import load_manifest
from xfer.store import s3, storage

# Chance is 50% (two balanced classes). The frozen base was pretrained on these
# shapes, so a working pipeline reaches well over 90%; a broken one (labels shuffled
# across workers, half the data silently dropped, BatchNorm in training mode on a
# frozen base) sits near chance. 80% leaves room for the run-to-run noise of a
# 28-image test split while still failing every one of those.
MIN_TEST_ACCURACY = 0.80


def test_both_phases_run_and_all_outputs_exist(trained_run, target_dataset):
    r = trained_run
    train_rows = load_manifest(target_dataset).split("train").rows
    m = r.metrics
    assert [len(m["history"]["head"]), len(m["history"]["fine_tune"])] == [4, 1]
    assert m["workers"] == 2 and m["replicas"] == 2
    assert m["test"]["accuracy"] >= MIN_TEST_ACCURACY, m["test"]
    for phase in ("head", "fine_tune"):
        info = m["phases"][phase]
        assert info["seconds"] > 0 and info["images_per_s"] > 0
        assert info["val_accuracy"] is not None
        for row in m["history"][phase]:
            # The epoch's img/s counts training time only, not validation.
            assert 0 < row["train_seconds"] < row["seconds"], row
            assert row["images_per_s"] * row["train_seconds"] == pytest.approx(train_rows)
    per_class = m["test"]["per_class"]
    assert set(per_class) == {"ring", "star"}
    assert all(0 <= v["precision"] <= 1 and 0 <= v["recall"] <= 1 for v in per_class.values())

    names = {storage.basename(f.uri) for f in storage.list_files(r.run_uri)}
    for expected in (
        "config.yaml",
        "metrics.json",
        "lineage.json",
        "report.html",
        "_SUCCESS",
        "model.keras",
        "xfer_model.json",
        "test.parquet",
    ):
        assert expected in names, f"{expected} missing from the run"
    tb = [f.uri for f in storage.list_files(f"{r.run_uri}/tensorboard")]
    assert any("/head/" in u for u in tb) and any("/fine_tune/" in u for u in tb)
    lineage = storage.read_json(f"{r.run_uri}/lineage.json")
    manifest = load_manifest(m["dataset"])
    assert lineage["dataset"]["manifest_checksum"] == manifest.checksum
    assert (
        lineage["weights"]["source"].endswith("tiny_source.h5")
        and len(lineage["weights"]["sha256"]) == 64
    )
    assert lineage["packages"]["tensorflow"].startswith("2.21")
    html = storage.read_text(f"{r.run_uri}/report.html")
    assert html.count("data:image/png;base64,") >= 2  # learning curves + confusion matrix
    config_text = storage.read_text(f"{r.run_uri}/config.yaml")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in config_text
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in json.dumps(m)


def test_success_marker_is_written_last(trained_run):
    """_SUCCESS is newer than every output of the run (S3 LastModified).

    Bookkeeping is not an output: Ray Train's checkpoints and snapshot file, and the
    journal, whose last note records the commit itself. The console log is an output.
    S3 keeps LastModified to the second, so this catches a late write only when it
    crosses a second boundary: CI saw console.log one second after _SUCCESS.
    """
    bucket, key = s3.split_s3(trained_run.run_uri)
    objects = s3.s3_client().list_objects_v2(Bucket=bucket, Prefix=key + "/")["Contents"]
    times = {
        o["Key"][len(key) + 1 :]: o["LastModified"]
        for o in objects
        if not o["Key"][len(key) + 1 :].startswith(("checkpoint", ".", "_journal/"))
    }
    success = times.pop("_SUCCESS")
    late = {k: str(t) for k, t in times.items() if t > success}
    assert not late, (str(success), late)


def test_latest_points_at_the_run(trained_run, session_root):
    latest = storage.read_json(f"{session_root}/models/shapes/latest.json")
    assert latest["run_id"] == trained_run.run_id
    assert latest["run_uri"] == trained_run.run_uri
    assert trained_run.published


def test_saved_model_loads_with_tf_keras_alone_and_reproduces_predictions(
    trained_run, target_dataset
):
    """Load model.keras in a fresh interpreter that never imports xfer."""
    import subprocess
    import sys

    local = tempfile.mkdtemp()
    storage.download_file(f"{trained_run.run_uri}/model/model.keras", f"{local}/model.keras")
    preds = storage.read_parquet(f"{trained_run.run_uri}/predictions/test.parquet")
    preds = preds.filter(pc.is_null(preds.column("error")))
    manifest = load_manifest(target_dataset)
    test = storage.read_parquet(manifest.shard_uris("test")[0])
    # Decode exactly as xfer does, save the pixels, predict in a clean process.
    import tensorflow as tf

    from xfer.data.preprocess import decode_and_resize
    from xfer.models.calibration import apply_temperature
    from xfer.registry.layout import resolve_model

    keys = test.column("key").to_pylist()
    pixels = np.stack(
        [decode_and_resize(tf.constant(b), 48).numpy() for b in test.column("image").to_pylist()]
    )
    np.save(f"{local}/pixels.npy", pixels)
    code = (
        "import os, sys, numpy as np\n"
        "os.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
        "import tf_keras\n"
        "assert 'xfer' not in sys.modules\n"
        f"m = tf_keras.models.load_model('{local}/model.keras', compile=False)\n"
        f"np.save('{local}/out.npy', m.predict(np.load('{local}/pixels.npy'), verbose=0))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-I", "-c", code], check=True, env=env, cwd=local)
    out = np.load(f"{local}/out.npy").reshape(-1)
    t = resolve_model(trained_run.run_uri).temperature
    if t is not None:  # the predictions file holds the calibrated probabilities
        out = apply_temperature(np.stack([1 - out, out], axis=1), t)[:, 1]
    by_key = dict(
        zip(preds.column("key").to_pylist(), preds.column("prob_star").to_pylist(), strict=True)
    )
    for key, p in zip(keys, out, strict=True):
        assert abs(by_key[key] - float(p)) < 1e-4


def test_a_killed_worker_resumes_from_its_checkpoint(
    session_root, pretrained_weights, target_dataset
):
    """Rank 1 really exits (os._exit) at the start of head epoch 3; the run recovers."""
    from xfer.config import load_config
    from xfer.train.driver import train

    from .conftest import train_overrides

    cfg = load_config(
        None,
        train_overrides(
            session_root,
            pretrained_weights,
            **{
                "cluster.max_failures": 1,
                "fault.rank": 1,
                "fault.phase": "head",
                "fault.epoch": 2,
                "output.model_name": "shapes-fault",
                "output.predictions": "false",
                "output.report": "false",
            },
        ),
    )
    result = train(cfg)
    m = result.metrics
    assert storage.exists(f"{result.run_uri}/_fault_injected"), "the fault never fired"
    # One failure, recorded: rank 1 in head epoch 3, resumed from a checkpoint after
    # at least one epoch, not from zero. (Epoch 2's report may or may not have reached
    # Ray Train's controller before the worker died; the record says which.)
    [failure] = m["failures"]
    assert (failure["stage"], failure["phase"], failure["epoch"]) == ("train", "head", 3)
    assert failure["rank"] == 1 and failure["resumed_by"] == "ray_train_restart"
    assert failure["resumed_from"]["phase"] == "head"
    assert failure["epochs_redone"] == 2 - failure["resumed_from"]["epoch"] <= 1
    assert "failure (attempt 1)" in result.describe()  # also: no test examples counted
    # ... so each epoch ran once: no repeated epochs in the history.
    assert [r["epoch"] for r in m["history"]["head"]] == [1, 2, 3, 4]
    assert [r["epoch"] for r in m["history"]["fine_tune"]] == [1]
    assert m["test"]["accuracy"] >= MIN_TEST_ACCURACY


@pytest.mark.slow
def test_a_failed_run_is_resumed_deliberately_by_id(
    session_root, pretrained_weights, target_dataset
):
    from xfer.config import load_config
    from xfer.errors import ConfigError, XferError
    from xfer.train.driver import train

    from .conftest import train_overrides

    overrides = train_overrides(
        session_root,
        pretrained_weights,
        **{
            "cluster.max_failures": 0,
            "fault.rank": 0,
            "fault.phase": "fine_tune",
            "fault.epoch": 0,
            "output.model_name": "shapes-resume",
            "output.predictions": "false",
        },
    )
    with pytest.raises(XferError, match=r"resume with: .*output\.run_id=") as err:
        train(load_config(None, overrides))
    run_id = str(err.value).rsplit("output.run_id=", 1)[1].split()[0]
    resume = [*overrides, f"output.run_id={run_id}"]
    # A setting the checkpoints were not made with is refused, naming it.
    with pytest.raises(ConfigError, match=r"train\.fine_tune\.learning_rate: 0\.0003 in the run"):
        train(load_config(None, [*resume, "train.fine_tune.learning_rate=0.01"]))
    # More epochs of the unfinished phase are safe: applied, and said so.
    result = train(load_config(None, [*resume, "train.fine_tune.epochs=2"]))
    assert result.run_id == run_id
    m = result.metrics
    assert m["resume_changes"] == [
        "train.fine_tune.epochs: 1 -> 2 (more epochs continue the phase)"
    ]
    assert storage.read_yaml(f"{result.run_uri}/config.yaml")["train"]["fine_tune"]["epochs"] == 2
    # The failure of the first attempt, recorded: rank 0 at the start of fine-tuning,
    # resumed by id from head epoch 4 (or 3, if that last report had not reached Ray
    # Train's controller yet) with a new optimizer at the fine-tuning rate.
    [failure] = m["failures"]
    assert failure["resumed_by"] == "run_id" and failure["error"]
    assert (failure["phase"], failure["epoch"], failure["rank"]) == ("fine_tune", 1, 0)
    assert failure["resumed_from"]["phase"] == "head"
    assert failure["epochs_redone"] == 4 - failure["resumed_from"]["epoch"] <= 1
    assert [r["epoch"] for r in m["history"]["head"]] == [1, 2, 3, 4]
    assert [r["epoch"] for r in m["history"]["fine_tune"]] == [1, 2]
    assert all(r["learning_rate"] == pytest.approx(0.0003) for r in m["history"]["fine_tune"])
    with pytest.raises(XferError, match="already complete"):
        train(load_config(None, resume))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.base=vgg61", "unknown base 'vgg61'"),
        ("data.classes=[cat,dog]", "does not match the dataset's classes ['ring', 'star']"),
        (
            "data.dataset=no-such-dataset",
            "no dataset at s3://xfer-session/xfer/datasets/no-such-dataset",
        ),
        ("model.weights=s3://xfer-session/xfer/weights/missing.h5", "model.weights: no file at"),
        (
            "train.fine_tune.unfreeze_from=block9_conv train.fine_tune.unfreeze_top=null",
            "no such layer in tiny_cnn",
        ),
        ("cluster.num_workers=64", "this machine cannot run the job: it needs 64 CPUs"),
    ],
)
def test_bad_config_fails_before_any_worker_starts(
    session_root, pretrained_weights, target_dataset, override, message
):
    """`xfer train` exits 2 with one line naming the problem; no run is written."""
    from .conftest import run_xfer, train_overrides

    before = {f.uri for f in storage.list_files(f"{session_root}/runs")}
    args = [*train_overrides(session_root, pretrained_weights), *override.split()]
    proc = run_xfer("train", *args, env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "RayTrainWorker" not in proc.stderr + proc.stdout
    after = {f.uri for f in storage.list_files(f"{session_root}/runs")}
    assert not {u for u in after - before if not u.endswith("config.yaml")}


def _mean_bce(table, temperature: float | None = None) -> float:
    """Mean binary cross-entropy over rows, from the stored probability of class 1
    (with ``temperature``: the calibration that file applied, undone first)."""
    from xfer.models.calibration import apply_temperature

    p = np.array(table.column("prob_star").to_pylist(), dtype="float64")
    if temperature is not None:
        p = apply_temperature(np.stack([1 - p, p], axis=1), 1 / temperature)[:, 1]
    p = np.clip(p, 1e-7, 1 - 1e-7)
    y = np.array(table.column("true_index").to_pylist(), dtype="float64")
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def test_reported_losses_are_true_means_over_real_examples(trained_run, target_dataset):
    """val_loss and the test loss in metrics.json equal the mean cross-entropy computed
    from the model's own predictions on the same images. Both splits have 14 images,
    so their one step of 16 carries 2 padding rows (weight 0): a loss divided by the
    padded batch reads 12.5% low."""
    from xfer.config import ScoreConfig
    from xfer.registry.layout import resolve_model
    from xfer.scoring.score import write_predictions

    m = trained_run.metrics
    test = storage.read_parquet(f"{trained_run.run_uri}/predictions/test.parquet")
    test = test.filter(pc.is_null(test.column("error")))
    ref = resolve_model(trained_run.run_uri)
    # The file holds calibrated probabilities; the loss is the network's own.
    assert m["test"]["loss"] == pytest.approx(_mean_bce(test, ref.temperature), abs=2e-4)

    out = f"{trained_run.run_uri}-val-check"
    own = ScoreConfig(calibrated=False)
    write_predictions(ref, target_dataset, own, out, single_file="val.parquet", split="val")
    val = storage.read_parquet(f"{out}/val.parquet")
    assert val.num_rows == load_manifest(target_dataset).split("val").rows
    last = m["history"]["fine_tune"][-1]  # measured after the last epoch: the saved model
    assert last["val_loss"] == pytest.approx(_mean_bce(val), abs=2e-4)


def test_a_retried_submission_finds_its_run_instead_of_starting_another(
    trained_run, session_root, pretrained_weights, monkeypatch, capsys
):
    """Under `ray job submit` the run id comes from the submission id, which a retried
    submitter (KubeRay re-running with the RayJob's jobId) reuses: the same run again
    is found complete, and nothing is trained."""
    import json

    from xfer.config import load_config
    from xfer.train.driver import submission_run_id, train

    from .conftest import train_overrides

    metadata = {"metadata": {"job_submission_id": trained_run.run_id}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(metadata))
    assert submission_run_id() == trained_run.run_id
    before = storage.read_bytes(f"{trained_run.run_uri}/metrics.json")
    again = train(load_config(None, train_overrides(session_root, pretrained_weights)))
    assert again.run_id == trained_run.run_id
    assert "already complete" in capsys.readouterr().out
    assert storage.read_bytes(f"{trained_run.run_uri}/metrics.json") == before


@pytest.mark.slow
def test_warmup_cosine_and_label_smoothing_on_two_workers(
    session_root, pretrained_weights, target_dataset
):
    """The learning rate follows the phase's schedule epoch by epoch on two workers
    (recorded as the rate of each epoch's first step), and a smoothed loss trains."""
    from xfer.config import load_config
    from xfer.models.model import phase_learning_rate
    from xfer.train.driver import train

    from .conftest import train_overrides

    extra = {
        "train.head.schedule": "cosine",
        "train.head.epochs": 6,  # the first at a rate of 0: 4 left too few to learn reliably
        "train.head.learning_rate": 0.01,  # a cosine's mean rate is half its peak
        "train.fine_tune.epochs": 0,
        "train.head.warmup_epochs": 1,
        "train.label_smoothing": 0.1,
        "output.model_name": "shapes-schedule",
        "output.publish": "false",
    }
    result = train(load_config(None, train_overrides(session_root, pretrained_weights, **extra)))
    m = result.metrics
    rates = [row["learning_rate"] for row in m["history"]["head"]]
    steps = m["steps_per_epoch"]
    curve = phase_learning_rate(0.01, "cosine", 6, 1.0, steps)
    assert rates == pytest.approx([float(curve(e * steps)) for e in range(6)], rel=1e-4)
    assert rates[0] == 0.0 and rates[1] == pytest.approx(0.01)
    assert rates[5] < rates[4] < rates[3] < rates[2] < rates[1]
    # It learns (a warm-up epoch and smoothing in 6 short epochs: not the fixture's bar).
    assert m["test"]["accuracy"] >= 0.65, m["test"]
