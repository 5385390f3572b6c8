"""What the scoring driver hands its actors: the night's plan and the scoring job.

:class:`NightPlan` is what :func:`xfer.scoring.scoreplan.plan_night` makes (or resumes): the
night's identity, its token and attempt, where its plan and parts are staged, and
its blocks. It is kept in the night's ``_night.json`` (:meth:`NightPlan.to_dict`,
:meth:`NightPlan.from_dict`).

:class:`ScoringJob` is how the night is scored: the model (a :class:`ModelRef` whose
``temperature`` is the one applied, None when ``score.calibrated`` is off), batch
size, threads, test-time augmentation, limits, the keys left out, when it was scored,
whether the actors' lines go to the console, and the store-outage budget the actors
ride through (:func:`xfer.store.retry.budget`).

Both are plain dataclasses of builtins: Ray pickles them for the actors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from xfer import console
from xfer.data.images import MAX_PIXELS
from xfer.registry.layout import ModelRef


@dataclass
class NightPlan:
    """A night's plan of blocks (``_night.json``)."""

    identity: dict[str, Any]  # what must match for a staged night to be resumed
    token: str
    plan_uri: str
    parts_uri: str
    final: str  # the partition it commits
    kind: str = "objects"  # "objects": plan blocks of keys; "dataset": shards' row groups
    blocks: int = 0
    rows: int = 0
    attempt: int = 1
    has_labels: bool = False
    label_classes: list[str] = field(default_factory=list)  # a dataset's classes
    shards: list[str] = field(default_factory=list)  # a dataset's shard URIs
    units: list[list[int]] = field(default_factory=list)  # [shard, first, end, rows]

    def to_dict(self) -> dict[str, Any]:
        """The ``_night.json`` form (a dataset's fields only for datasets, as before)."""
        out = dataclasses.asdict(self)
        out["planned"] = True
        if self.kind != "dataset":
            for name in ("label_classes", "shards", "units"):
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NightPlan:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class ScoringJob:
    """How a night is scored; each actor gets one."""

    model: ModelRef  # its temperature: the one applied (None: uncalibrated)
    scored_at: str  # ISO time, the same in every row of the night
    batch_size: int = 64
    threads: int = 1  # decode threads (and the model's compute threads)
    read_threads: int = 1  # reads in flight
    tta: bool = False  # test-time augmentation: the mean of the image's and its mirror's
    quiet: bool = False  # the actors' lines go to the log file only
    max_pixels: int = MAX_PIXELS
    max_object_mb: float = 100.0
    exclude: tuple[str, ...] = ()  # keys not scored
    outage_seconds: float = 0.0  # store outages the actors ride through (xfer.store.retry)

    @property
    def temperature(self) -> float | None:
        return self.model.temperature

    @property
    def tag(self) -> str:
        """The prefix of progress lines: ``[xfer]`` reaches the console, the other the log."""
        return console.tag(shown=not self.quiet)
