"""A moving average of the weights (train.<phase>.ema): what fine-tuning validates and saves."""

from __future__ import annotations

import glob
import os
import tempfile

import numpy as np
import pytest

from xfer.config import load_config
from xfer.data.manifest import load_manifest
from xfer.store import storage
from xfer.train.checkpoint import TF_PREFIX
from xfer.train.driver import train

from .conftest import IMAGE_SIZE, train_overrides


@pytest.mark.slow
def test_two_workers_validate_and_save_the_moving_average(
    session_root, pretrained_weights, target_dataset
):
    """SGD with an EMA of 0.9 over 2 fine-tune epochs on 2 workers: the saved model's
    trainable weights are the optimizer's averages (not the last step's weights), and
    the last epoch's reported validation loss is the saved model's."""
    import tensorflow as tf
    import tf_keras

    from xfer.data.preprocess import decode_and_resize

    quick = {
        "train.fine_tune.epochs": 2,
        "train.fine_tune.optimizer": "sgd",
        "train.fine_tune.learning_rate": 0.01,
        "train.fine_tune.ema": 0.9,
        "output.model_name": "shapes-ema",
        "output.publish": "false",
        "output.predictions": "false",
        "output.report": "false",
    }
    result = train(load_config(None, train_overrides(session_root, pretrained_weights, **quick)))
    local = tempfile.mkdtemp()
    storage.download_dir(result.run_uri, local)
    model = tf_keras.models.load_model(f"{local}/model/model.keras", compile=False)

    # Ray keeps two checkpoints: the last epoch's (the weights as trained) and the
    # final report's (the weights the run ends with), each with the optimizer's state.
    last_epoch, final = (
        tf.train.load_checkpoint(os.path.join(c, TF_PREFIX))
        for c in sorted(glob.glob(f"{local}/**/checkpoint_*/", recursive=True))[-2:]
    )
    slots = [
        final.get_tensor(n)
        for n in final.get_variable_to_shape_map()
        if n.startswith("optimizer/_variables/")
    ]
    saved = [np.asarray(w) for w in model.weights]
    # SGD's slots: one momentum and one average per trained variable; each average is
    # a weight of the saved model, and differs from that weight as last trained.
    averages = [s for s in slots if any(np.array_equal(s, w) for w in saved)]
    assert len(averages) == len(slots) // 2 > 0
    trained = [f"weights/{i:05d}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(len(saved))]
    assert any(not np.array_equal(last_epoch.get_tensor(n), final.get_tensor(n)) for n in trained)

    manifest = load_manifest(target_dataset)
    rows = [storage.read_parquet(u) for u in manifest.shard_uris("val")]
    images = [b for t in rows for b in t.column("image").to_pylist()]
    labels = np.array([c for t in rows for c in t.column("label").to_pylist()], "float32")
    pixels = np.stack([decode_and_resize(tf.constant(b), IMAGE_SIZE).numpy() for b in images])
    probs = model.predict(pixels, verbose=0).reshape(-1)
    val_loss = float(
        tf_keras.losses.binary_crossentropy(labels[:, None], probs[:, None]).numpy().mean()
    )
    assert result.metrics["phases"]["fine_tune"]["val_loss"] == pytest.approx(val_loss, abs=1e-4)
