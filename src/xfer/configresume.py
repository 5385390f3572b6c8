"""The config of a resumed training run: the stored run's settings, this command's others.

A run resumed by id (``output.run_id=<id>``, or a retried ``ray job submit``) keeps
the data, model and train settings its checkpoints were made with: they are read
back from ``<run>/config.yaml``. The other sections (cluster, output, storage,
fault, score) say how and where to run now and come from the new command.

A data/model/train setting given now (in the file or as an override) that differs
from the stored run is applied when it is safe (:data:`RESUME_SAFE`: more epochs of
an unfinished phase, verbosity, read concurrency) and said so, and the run's
``config.yaml`` is rewritten with it; any other difference is a
:class:`~xfer.errors.ConfigError` naming the keys.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from xfer.config import XferConfig, build_config, resolved_dict
from xfer.configbase import merge
from xfer.errors import ConfigError, NotFoundError, XferError
from xfer.registry.layout import CONFIG
from xfer.store import storage

# Sections a resumed run takes from the new command line; the others (data, model,
# train) define what is being trained and come from the stored run.
RESUME_FREE = ("cluster", "output", "storage", "fault", "score")
# Settings of data/model/train that a resume may change, and why that is safe.
RESUME_SAFE = {
    "train.verbose": "console output only",
    "data.parallel_reads": "read concurrency only",
    "train.fine_tune.epochs": "more epochs continue the phase",
    "train.head.epochs": "more epochs continue the head phase, while it is not finished",
}


def resume_config(
    cfg: XferConfig, run_uri: str, epochs_done: Callable[[], int]
) -> tuple[XferConfig, list[str]]:
    """The stored run's data/model/train settings with this command's other sections.

    ``epochs_done()`` says how far the run got (epochs across phases, from its
    journal; asked only when the head phase's epochs change): more head epochs are
    refused once the head phase is over. Returns the config and what changed, one
    note per applied setting.
    """
    config_uri = storage.join(run_uri, CONFIG)
    try:
        stored = storage.read_yaml(config_uri)
    except NotFoundError:
        raise XferError(f"output.run_id: no run at {run_uri} to resume") from None
    changed = {
        key: (_lookup(stored, key), value)
        for key, value in explicit_settings(cfg).items()
        if key.split(".")[0] not in RESUME_FREE and _lookup(stored, key) != value
    }
    _refuse_unsafe(changed, _lookup(stored, "train.head.epochs") or 0, epochs_done, run_uri)
    now = cfg.model_dump(mode="json")
    merged = merge(stored, {k: now[k] for k in RESUME_FREE})
    notes = []
    for key, (before, after) in sorted(changed.items()):
        _assign(merged, key, after)
        notes.append(f"{key}: {before!r} -> {after!r} ({RESUME_SAFE[key]})")
    resumed = build_config(merged, config_uri)
    if notes:
        print("[xfer] applying to the resumed run: " + "; ".join(notes), flush=True)
        storage.write_yaml(config_uri, resolved_dict(resumed))
    return resumed, notes


def _refuse_unsafe(
    changed: dict[str, tuple[Any, Any]],
    head_epochs: int,
    epochs_done: Callable[[], int],
    run_uri: str,
) -> None:
    """A ConfigError naming every change a resume may not make: one not in
    :data:`RESUME_SAFE`, fewer epochs, or more head epochs after the head phase."""
    refused = [k for k in changed if k not in RESUME_SAFE]
    for key in ("train.head.epochs", "train.fine_tune.epochs"):
        if key in changed and (changed[key][1] or 0) < (changed[key][0] or 0):
            refused.append(key)
    if "train.head.epochs" in changed and epochs_done() >= head_epochs:
        refused.append("train.head.epochs")
    if not refused:
        return
    details = "; ".join(
        f"{k}: {changed[k][0]!r} in the run, {changed[k][1]!r} now" for k in sorted(set(refused))
    )
    raise ConfigError(
        f"output.run_id={storage.basename(run_uri)}: settings differ from the run's own "
        f"({storage.join(run_uri, CONFIG)}): {details}. A resumed run keeps the settings it was "
        "started with (only more epochs of an unfinished phase, train.verbose and "
        "data.parallel_reads may change): drop these overrides, or start a new run"
    )


def explicit_settings(model: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The settings given explicitly (file or overrides), not defaults, as JSON values."""
    out: dict[str, Any] = {}
    dumped = model.model_dump(mode="json")
    for name in model.model_fields_set:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out.update(explicit_settings(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = dumped[name]
    return out


def _lookup(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def _assign(d: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value
