"""The ``score:`` and ``shard:`` sections of the config (:mod:`xfer.config` holds the rest).

Both are re-exported by :mod:`xfer.config`: ``from xfer.config import ScoreConfig``.
A deployment's scoring config carries what a night scores (``score.model``,
``score.input``, ``score.output``; ``{root}`` in them is ``storage.root``), so that its
command line is the config file and the bucket: :meth:`ScoreConfig.target`.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from xfer.configbase import Strict
from xfer.data.images import MAX_PIXELS
from xfer.errors import ConfigError

# Reads in flight per scoring actor by default. At S3's ~30 ms a GET, n reads feed
# ~n / 0.03 images/s: 96 keep an L4 at its MobileNetV2 rate (~2,800 img/s,
# docs/capacity.md), 32 keep a few CPU cores decoding. Within the client's connection
# pool (xfer.store.s3.MAX_POOL_CONNECTIONS).
AUTO_READ_THREADS_GPU = 96
AUTO_READ_THREADS_CPU = 32

if TYPE_CHECKING:
    from xfer.data.images import ImageSettings


@dataclass(frozen=True)
class ScoreTarget:
    """What ``xfer score`` scores and where it writes: each a flag or its ``score.`` key."""

    model: str
    input: str
    output: str
    date: str | None  # None: the job's UTC date plus score.date_offset_days


class ScoreConfig(Strict):
    model: str | None = Field(
        None,
        description="the model to score (--model): .../runs/<run_id> or .../models/<name>; "
        "{root} is storage.root",
    )
    input: str | None = Field(
        None,
        description="what to score (--input): a dataset, an image prefix, a CSV/Parquet list or "
        "an S3 Inventory manifest.json; {date} is the night, {root} storage.root",
    )
    output: str | None = Field(
        None, description="predictions prefix (--output; dt=<date>/ is added); {root} as above"
    )
    date: str | None = Field(
        None,
        description="the night (--date): YYYY-MM-DD or YYYYMMDD; default: the UTC date the job "
        "starts plus date_offset_days",
    )
    batch_size: int | Literal["auto"] = Field(
        "auto", description="images per model call; auto: 256 on a GPU, 64 on CPUs"
    )
    num_actors: int | Literal["auto"] = Field(
        "auto", description="scoring actors; auto: as many as the cluster's CPUs/GPUs fit"
    )
    use_gpu: bool = False
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(1.0, ge=0)
    decode_threads: int | Literal["auto"] = Field(
        "auto", description="threads decoding images in each actor; auto: its CPUs"
    )
    read_threads: int | Literal["auto"] = Field(
        "auto",
        description="image reads in flight in each actor, ahead of its decode threads; auto: "
        f"{AUTO_READ_THREADS_GPU} with a GPU, {AUTO_READ_THREADS_CPU} on CPUs (a GET takes "
        "~30 ms on S3: a GPU needs that many in flight to stay fed)",
    )
    block_size: int = Field(
        2048, ge=1, description="images per block: the unit of work, of resuming and of a part file"
    )
    tta: bool = Field(
        False, description="test-time augmentation: average the image's and its mirror's outputs"
    )
    calibrated: bool = Field(
        True,
        description="apply the model's temperature scaling (fitted on its validation split) to "
        "the probabilities; false: the network's own. Each file's metadata says which",
    )
    date_offset_days: int = Field(
        0,
        description="the night {date} names without --date: the UTC date the job starts "
        "plus this many days (-1: the day before, the night just ended at 02:00 UTC)",
    )
    resource_wait_seconds: float = Field(
        600.0, ge=0, description="on a cluster: how long to wait for the actors' resources"
    )
    split: str = Field(
        "test", description="split to score when the input is a dataset ('all': every split)"
    )
    max_error_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="fail before the commit, keeping the previous partition, above this share "
        "of error rows",
    )
    max_object_mb: float = Field(
        100.0, gt=0, description="larger inputs become error rows; never read past this"
    )
    max_actor_restarts: int = Field(
        3, ge=0, description="times a killed scoring actor is restarted (and a block retried)"
    )
    allow_outside_inputs: bool = Field(
        False, description="let a list name objects outside its own folder (../, /abs, s3://other)"
    )
    lock_stale_minutes: float = Field(
        10.0, gt=0, description="a night's lock whose holder is silent this long is taken over"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data: Any) -> Any:
        if isinstance(data, dict) and "store_outage_seconds" in data:
            raise ValueError(
                "store_outage_seconds is now storage.outage_seconds (one store-outage "
                "budget for every command)"
            )
        return data

    @field_validator("date", mode="before")
    @classmethod
    def _date_text(cls, v: Any) -> Any:
        # YAML reads 2026-01-05 as a date and 20260105 as a number: both mean the text.
        return v.isoformat() if isinstance(v, dt.date) else str(v) if isinstance(v, int) else v

    def target(
        self,
        root: str,
        model: str | None = None,
        input_uri: str | None = None,
        output: str | None = None,
        date: str | None = None,
    ) -> ScoreTarget:
        """The night to score: each flag given wins over its key; ``{root}`` is ``root``.

        A location given by neither is a ConfigError naming the flag and the key.
        """
        given = {"model": model or self.model, "input": input_uri or self.input}
        given["output"] = output or self.output
        for key, value in given.items():
            if not value:
                raise ConfigError(
                    f"xfer score needs the {key}: give --{key} or set score.{key} in the config"
                )
        where = {k: str(v).replace("{root}", root) for k, v in given.items()}
        return ScoreTarget(where["model"], where["input"], where["output"], date or self.date)

    @field_validator("batch_size", "num_actors", "decode_threads", "read_threads")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (or auto)")
        return v

    def actors(self, cpus: float, gpus: float) -> int:
        """``num_actors``, with auto resolved against the cluster's resources."""
        if self.num_actors != "auto":
            return int(self.num_actors)
        if self.use_gpu:
            return max(1, int(gpus // max(self.gpus_per_actor, 1e-9)))
        return max(1, int(cpus // self.cpus_per_actor))

    def batch(self) -> int:
        if self.batch_size != "auto":
            return int(self.batch_size)
        return 256 if self.use_gpu else 64

    def threads(self) -> int:
        if self.decode_threads != "auto":
            return int(self.decode_threads)
        return max(1, math.ceil(self.cpus_per_actor))

    def reads(self) -> int:
        if self.read_threads != "auto":
            return int(self.read_threads)
        return AUTO_READ_THREADS_GPU if self.use_gpu else AUTO_READ_THREADS_CPU


class ShardConfig(Strict):
    """`xfer shard`: how images become a dataset (recorded in its manifest)."""

    split_fractions: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train, val, test fractions, by a hash of each key"
    )
    target_shard_mb: float = Field(96.0, gt=0, description="target size of a shard")
    max_side: int | None = Field(None, ge=16, description="pre-resize: longest side in pixels")
    jpeg_quality: int = Field(90, ge=1, le=100, description="JPEG quality when re-encoding")
    max_pixels: int = Field(MAX_PIXELS, ge=1, description="larger images are rejected")
    max_rejected_fraction: float = Field(
        0.05, ge=0, le=1, description="fail, committing nothing, above this share of rejects"
    )
    num_tasks: int | None = Field(None, ge=1, description="parallel Ray tasks (default: CPUs)")
    files_per_task: int = Field(256, ge=1, description="images per Ray task")
    row_group_rows: int = Field(64, ge=1, description="rows per Parquet row group")
    name: str | None = Field(None, description="dataset name in the manifest (default: DEST's)")
    allow_outside_inputs: bool = Field(
        False, description="let a list name objects outside its own folder (../, /abs, s3://other)"
    )

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, f: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(x < 0 for x in f) or not math.isclose(sum(f), 1.0, abs_tol=1e-6):
            raise ValueError(f"needs three fractions train,val,test summing to 1 (got {list(f)})")
        if f[0] <= 0:
            raise ValueError("the train fraction must be above 0")
        return f

    def image_settings(self) -> ImageSettings:
        from xfer.data.images import ImageSettings

        return ImageSettings(self.max_pixels, self.max_side, self.jpeg_quality)

    def recorded(self) -> dict[str, Any]:
        """What determines the output (recorded in the manifest)."""
        keys = {"split_fractions", "target_shard_mb", "max_side", "jpeg_quality", "max_pixels"}
        return self.model_dump(mode="json", include=keys)
