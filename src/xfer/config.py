"""One typed config, one override order, strict keys.

Defaults in code -> YAML file -> ``key=value`` overrides -> validate -> frozen.

    cfg = load_config("jobs/configs/local.yaml", ["train.head.epochs=3", "model.base=vgg16"])

A misspelt or unknown key, a wrong type or an impossible value raises
:class:`~xfer.errors.ConfigError` naming the key and where it came from (the file or
the override). Config files never read environment variables: credentials come from
the normal AWS chain, never from here, and :func:`resolved_dict` masks anything that
looks like a secret before the config is written next to a run's outputs.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from xfer.configbase import (
    Strict,
    flatten_keys,
    format_errors,
    merge,
    parse_overrides,
    redact,
)
from xfer.configsections import ScoreConfig, ShardConfig
from xfer.errors import ConfigError, NotFoundError
from xfer.models.bases import REGISTRY

# ---------------------------------------------------------------- sections


class StorageConfig(Strict):
    """Where the object-storage layout lives; credentials are not configured here."""

    root: str = Field("s3://xfer", description="root of datasets/, runs/, models/, predictions/")
    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint; default: AWS_ENDPOINT_URL_S3 or AWS"
    )
    region: str | None = None
    outage_seconds: float = Field(
        180,
        ge=0,
        description="how long every command (train, shard, score) rides out a store that "
        "is away before exit 75",
    )

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        v = v.rstrip("/")
        if v.startswith("s3://") and len(v[5:].split("/", 1)[0]) < 3:
            raise ValueError("bucket name needs at least 3 characters")
        if "://" in v and not v.startswith(("s3://", "file://")):
            raise ValueError("must be an s3:// URI or a local path")
        return v


class AugmentConfig(Strict):
    flip: bool = True
    rotation: float = Field(0.05, ge=0.0, le=0.5, description="max rotation, fraction of a turn")
    zoom: float = Field(0.1, ge=0.0, le=0.5, description="max zoom in/out fraction")


class DataConfig(Strict):
    dataset: str = Field("synth", description="dataset name under <root>/datasets/, or a URI")
    classes: list[str] | None = Field(
        None, description="expected classes; checked against the manifest"
    )
    image_size: int = Field(224, ge=16, le=1024)
    augment: AugmentConfig = AugmentConfig()
    shuffle_buffer: int = Field(1024, ge=0)
    parallel_reads: int = Field(4, ge=1, le=64, description="shards read concurrently")
    exclude: str | None = Field(
        None,
        description="URI of a list of keys to leave out of every split (CSV/Parquet with a "
        "key column, e.g. a filtered `xfer audit` issues list, or one key per line)",
    )


class DenseLayer(Strict):
    units: int = Field(gt=0)
    activation: Literal["relu", "gelu", "swish", "tanh", "linear"] = "relu"


class HeadConfig(Strict):
    pooling: Literal["avg", "max", "flatten"] = "avg"
    dense: list[DenseLayer] = Field(default_factory=list)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    features: Literal["online", "cached"] = Field(
        "online",
        description="cached: base features computed once and reused (no head-phase augmentation)",
    )


class ModelConfig(Strict):
    base: str = "mobilenet_v2"
    alpha: float = Field(1.0, description="width multiplier (mobilenet_v2 only)")
    weights: str = Field("imagenet", description="imagenet | none | path or s3:// URI of .h5")
    head: HeadConfig = HeadConfig()

    @field_validator("base")
    @classmethod
    def _base(cls, v: str) -> str:
        if v not in REGISTRY:
            hint = difflib.get_close_matches(v, list(REGISTRY), n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown base {v!r}{extra}; choose one of {', '.join(REGISTRY)}")
        return v

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, v: float) -> float:
        if v not in (0.35, 0.5, 0.75, 1.0, 1.3, 1.4):
            raise ValueError("mobilenet_v2 alpha must be one of 0.35, 0.5, 0.75, 1.0, 1.3, 1.4")
        return v


Optimizer = Literal["adam", "sgd", "rmsprop"]


class Phase(Strict):
    epochs: int = Field(5, ge=0)
    optimizer: Optimizer = "adam"
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning rate over the phase: constant, or cosine decay to 0"
    )
    warmup_epochs: float = Field(
        0.0, ge=0.0, description="linear warm-up from 0 to learning_rate over these epochs"
    )
    ema: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="exponential moving average of the trained weights, its momentum per step "
        "(0: off); validation, the phase's result and the saved model use the average",
    )


class HeadPhase(Phase):
    pass


class FineTunePhase(Phase):
    learning_rate: float = Field(1e-5, gt=0.0, le=10.0)
    unfreeze_from: str | int | None = Field(
        None, description="layer name or index of the base: it and every layer above train"
    )
    unfreeze_top: int | None = Field(None, ge=1, description="or: the top N layers of the base")

    @model_validator(mode="after")
    def _one_way(self) -> FineTunePhase:
        if self.unfreeze_from is not None and self.unfreeze_top is not None:
            raise ValueError("set unfreeze_from or unfreeze_top, not both")
        return self


class TrainConfig(Strict):
    batch_size: int = Field(32, ge=1, description="per replica; global = this x replicas")
    head: HeadPhase = HeadPhase()
    fine_tune: FineTunePhase = FineTunePhase()
    scale_lr: bool = Field(False, description="multiply learning rates by the replica count")
    mixed_precision: bool = False
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="training loss only; reported losses stay plain"
    )
    jit_compile: bool = Field(False, description="XLA-compile the train step (GPUs)")
    seed: int = 0
    max_steps_per_epoch: int | None = Field(None, ge=1, description="cap (quick runs only)")
    verbose: int = Field(2, ge=0, le=2, description="Keras verbosity on rank 0")

    def phase(self, name: str) -> Phase:
        """A training phase's settings by its name: ``head`` or ``fine_tune``."""
        return {"head": self.head, "fine_tune": self.fine_tune}[name]


class ClusterConfig(Strict):
    address: str | None = Field(None, description="Ray address; default RAY_ADDRESS or local")
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    memory_per_worker_gb: float | None = Field(None, gt=0)
    max_failures: int | None = Field(
        None,
        ge=-1,
        description="worker failures a training run recovers from; -1 = any; default 3 with a "
        "cluster address (cluster.address or RAY_ADDRESS), 0 locally",
    )
    local_num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance")


class GateConfig(Strict):
    RETIRED: ClassVar[dict[str, str]] = {
        "margin": "retired: a margin on accuracy let noise decide; the comparison is now a "
        "paired test, set output.gate.mode (better | not_worse) and output.gate.alpha",
    }
    min_test_accuracy: float = Field(0.0, ge=0.0, le=1.0)
    min_class_recall: float = Field(
        0.0, ge=0.0, le=1.0, description="every class's test recall must reach this (0: no floor)"
    )
    vs_published: bool = Field(
        False,
        description="also compare with the published model on this run's test split, image by "
        "image (both scored here): McNemar's exact test and a bootstrap interval",
    )
    mode: Literal["better", "not_worse"] = Field(
        "better",
        description="vs_published: better = publish only if better beyond noise; not_worse = "
        "publish unless worse beyond noise (a retrain on fresh data)",
    )
    alpha: float = Field(
        0.05, gt=0.0, lt=0.5, description="vs_published: the significance level of the paired test"
    )


class OutputConfig(Strict):
    model_name: str = Field("classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    run_id: str | None = Field(None, description="resume this run instead of starting a new one")
    gate: GateConfig = GateConfig()
    publish: bool = Field(True, description="move models/<name>/latest.json when the gate passes")
    predictions: bool = Field(True, description="score the test split into predictions/")
    export: bool = Field(
        True,
        description="write model/saved_model/: a SavedModel taking encoded image bytes "
        "(TF Serving, SageMaker, Vertex)",
    )
    calibrate: bool = Field(
        True,
        description="fit temperature scaling on the validation split after training; scoring "
        "and the SavedModel export apply it",
    )
    report: bool = True


class FaultConfig(Strict):
    """Fault injection for the recovery tests: one rank fails once per run, at one point.

    ``action: exit`` ends the process there; ``action: hang`` writes its pid to
    ``<run>/_fault_injected`` and waits, so that a test can kill it from outside
    (SIGKILL by pid), as a cluster would.
    """

    rank: int | None = Field(None, ge=0)
    point: Literal["epoch", "batch", "feature_cache", "test_evaluation", "model_save"] = "epoch"
    phase: Literal["head", "fine_tune"] = "head"
    epoch: int = Field(1, ge=0, description="0-based epoch of the phase (points epoch, batch)")
    batch: int = Field(1, ge=0, description="batch of that epoch (point batch)")
    action: Literal["exit", "hang"] = "exit"


class XferConfig(Strict):
    storage: StorageConfig = StorageConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    output: OutputConfig = OutputConfig()
    fault: FaultConfig = FaultConfig()
    score: ScoreConfig = ScoreConfig()
    shard: ShardConfig = ShardConfig()

    @model_validator(mode="after")
    def _consistent(self) -> XferConfig:
        if self.train.head.epochs == 0 and self.train.fine_tune.epochs == 0:
            raise ValueError(
                "train.head.epochs and train.fine_tune.epochs are both 0: nothing to train"
            )
        return self

    # ------------------------------------ thin calls: many callers take a config

    def dataset_uri(self) -> str:
        """:func:`xfer.registry.layout.dataset_location` of ``data.dataset``."""
        from xfer.registry import layout

        return layout.dataset_location(self.storage.root, self.data.dataset)

    def run_uri(self, run_id: str) -> str:
        from xfer.registry import layout

        return layout.run_uri(self.storage.root, run_id)

    def model_uri(self) -> str:
        from xfer.registry import layout

        return layout.model_uri(self.storage.root, self.output.model_name)

    def apply_storage_env(self) -> None:
        """:func:`xfer.store.s3.use_endpoint` with ``storage.endpoint_url`` and ``region``."""
        from xfer.store.s3 import use_endpoint

        use_endpoint(self.storage.endpoint_url, self.storage.region)


# ------------------------------------------------------------------ loading


def build_config(
    data: dict[str, Any], source: str = "config", override_keys: set[str] | None = None
) -> XferConfig:
    try:
        return XferConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, source, override_keys or set(), XferConfig)) from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> XferConfig:
    """Defaults -> YAML file (local path or URI) -> overrides -> validated config."""
    from xfer.store import storage

    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = path
        try:
            loaded = yaml.safe_load(storage.read_bytes(path))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        except NotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = loaded
    extra = parse_overrides(overrides or [])
    return build_config(merge(data, extra), source, flatten_keys(extra))


# --------------------------------------------------------- writing it out


def resolved_dict(cfg: XferConfig) -> dict[str, Any]:
    """The full resolved config as plain data, safe to write next to outputs."""
    return redact(cfg.model_dump(mode="json"))


def with_overrides(cfg: XferConfig, overrides: dict[str, Any]) -> XferConfig:
    """A validated copy of ``cfg`` with nested ``overrides`` applied."""
    return build_config(merge(cfg.model_dump(mode="json"), overrides), "derived config")
