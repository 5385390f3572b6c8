"""The predictions files' schema: one place for the column names writers and readers use.

Every predictions file (a night's parts, a run's ``predictions/<split>.parquet``) has
these columns, in this order::

    key, source_uri, predicted_label, predicted_index, probability,
    prob_<class> (one per class, :func:`class_columns`),
    true_index, true_label (inputs with labels: a dataset's split),
    model_name, run_id, scored_at, error

``probability`` is the predicted class's; a row whose image could not be scored has
an ``error`` and nulls for every prediction. The schema metadata names the classes
(:data:`META_CLASSES`), the run (:data:`META_RUN_ID`) and what the probabilities are
(:func:`xfer.models.calibration.file_metadata`). :func:`predictions_table` builds a block's
table from the scorer's probabilities.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import TYPE_CHECKING, Any

from xfer.errors import XferError

if TYPE_CHECKING:
    from xfer.scoring.scorejob import ScoringJob

KEY = "key"
SOURCE_URI = "source_uri"
PREDICTED_LABEL = "predicted_label"
PREDICTED_INDEX = "predicted_index"
PROBABILITY = "probability"  # the predicted class's
TRUE_INDEX = "true_index"  # the model's index of the row's label
TRUE_LABEL = "true_label"
MODEL_NAME = "model_name"
RUN_ID = "run_id"
SCORED_AT = "scored_at"
ERROR = "error"  # why the row has no prediction (null: it has one)
CLASS_PREFIX = "prob_"

META_CLASSES = "xfer.classes"  # JSON list of the model's classes, in column order
META_RUN_ID = "xfer.run_id"


def class_column(name: str) -> str:
    return CLASS_PREFIX + re.sub(r"[^0-9A-Za-z_]", "_", name)


def class_columns(classes: list[str]) -> list[str]:
    """``prob_<class>`` for each class; classes that would share a column fail here."""
    seen: dict[str, str] = {}
    for name in classes:
        col = class_column(name)
        if col in seen:
            raise XferError(
                f"classes {seen[col]!r} and {name!r} would both be written as column {col!r}: "
                "rename one of them (class names map to columns by replacing characters "
                "other than letters, digits and '_' with '_')"
            )
        seen[col] = name
    return list(seen)


def classes_of(metadata: dict[bytes, bytes]) -> list[str]:
    """The classes a predictions file's schema metadata names."""
    return list(json.loads(metadata[META_CLASSES.encode()]))


def schema(classes: list[str], labelled: bool) -> Any:
    """The Arrow schema of a predictions file (without its metadata)."""
    import pyarrow as pa

    fields = [
        (KEY, pa.string()),
        (SOURCE_URI, pa.string()),
        (PREDICTED_LABEL, pa.string()),
        (PREDICTED_INDEX, pa.int32()),
        (PROBABILITY, pa.float64()),
        *((col, pa.float64()) for col in class_columns(classes)),
        *([(TRUE_INDEX, pa.int32()), (TRUE_LABEL, pa.string())] if labelled else []),
        (MODEL_NAME, pa.string()),
        (RUN_ID, pa.string()),
        (SCORED_AT, pa.timestamp("ms", tz="UTC")),
        (ERROR, pa.string()),
    ]
    return pa.schema(fields)


def predictions_table(
    job: ScoringJob,
    items: list[dict[str, Any]],
    probs: Any,
    errors: list[str | None],
    label_classes: list[str] | None = None,
) -> Any:
    """The rows of one block: ``probs`` [n, classes] (NaN where ``errors`` has a reason).

    ``label_classes``: the dataset's classes the items' ``label`` indexes (None: no labels).
    """
    import numpy as np
    import pyarrow as pa

    from xfer.models.calibration import file_metadata

    classes, n = job.model.classes, len(items)
    ok = np.array([e is None for e in errors], dtype=bool)
    index = np.where(ok, np.nan_to_num(probs, nan=-1.0).argmax(axis=1) if n else 0, -1)
    rows = range(n)
    cols: dict[str, list[Any]] = {
        KEY: [str(it["key"]) for it in items],
        SOURCE_URI: [str(it["source_uri"]) for it in items],
        PREDICTED_LABEL: [classes[index[r]] if ok[r] else None for r in rows],
        PREDICTED_INDEX: [int(index[r]) if ok[r] else None for r in rows],
        PROBABILITY: [float(probs[r, index[r]]) if ok[r] else None for r in rows],
    }
    for c, col in enumerate(class_columns(classes)):
        cols[col] = [float(probs[r, c]) if ok[r] else None for r in rows]
    if label_classes is not None:
        # Labels index the dataset's classes; true_index is the model's index of that class.
        names = [label_classes[it["label"]] for it in items]
        position = {c: i for i, c in enumerate(classes)}
        cols[TRUE_INDEX] = [position.get(c) for c in names]
        cols[TRUE_LABEL] = names
    cols[MODEL_NAME] = [job.model.model_name] * n
    cols[RUN_ID] = [job.model.run_id] * n
    cols[SCORED_AT] = [dt.datetime.fromisoformat(job.scored_at)] * n
    cols[ERROR] = list(errors)
    metadata = {
        META_CLASSES: json.dumps(classes),
        META_RUN_ID: job.model.run_id,
        **file_metadata(job.temperature),
    }
    return pa.table(
        cols, schema=schema(classes, label_classes is not None)
    ).replace_schema_metadata(metadata)
