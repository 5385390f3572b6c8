"""Shared set-up for the benchmarks: one embedded S3 server, one local Ray, results.

Every benchmark measures its figures side by side in the same run and records them
with :func:`record`, which merges them into ``benchmarks/results/results.json`` and
re-renders ``benchmarks/results/README.md``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xfer  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)

RESULTS = Path(__file__).parent / "results"
SERVER: dict[str, Any] = {}  # the running environment's S3 server ("pid")
BUCKET = "bench"
ROOT = f"s3://{BUCKET}/xfer"


def photo_overrides(weights_uri: str, dataset: str, image_size: int) -> dict[str, object]:
    """The settings the photo benchmarks share: MobileNetV2 with the real ImageNet
    weights, a plain pooled head, the default learning rates; no gate, no publishing."""
    return {
        "storage.root": ROOT,
        "data.dataset": dataset,
        "data.image_size": image_size,
        "model.base": "mobilenet_v2",
        "model.alpha": 1.0,
        "model.weights": weights_uri,
        "model.head.pooling": "avg",
        "model.head.dense": "[]",
        "model.head.dropout": 0.2,
        "train.batch_size": 32,
        "train.head.learning_rate": 0.001,
        "output.model_name": dataset,
        "output.predictions": "false",
        "output.gate.min_test_accuracy": 0.0,
    }


@contextmanager
def environment(workdir: str | None = None) -> Iterator[str]:
    """Embedded S3 (bucket ``bench``) + a local Ray with this machine's CPUs."""
    import ray

    from xfer.raycluster import ensure_ray
    from xfer.store.s3server import EmbeddedS3

    work = workdir or tempfile.mkdtemp(prefix="xfer-bench-")
    with EmbeddedS3(os.path.join(work, "s3"), buckets=(BUCKET,)) as server:
        SERVER["pid"] = server.pid
        os.environ.update(server.env())
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ensure_ray(num_cpus=os.cpu_count() or 2)
        try:
            yield work
        finally:
            ray.shutdown()


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    out: dict[str, float] = {}
    start = time.perf_counter()
    yield out
    out["seconds"] = time.perf_counter() - start


def machine() -> dict[str, Any]:
    import importlib.metadata as md

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": md.version("tensorflow"),
        "ray": md.version("ray"),
        "gpu": False,
    }


def record(
    name: str,
    figures: dict[str, Any],
    notes: str = "",
    markdown: str = "",
    measured_at: str | None = None,
) -> None:
    """Merge one benchmark's figures into the committed results.

    ``markdown``: the section's body in README.md instead of the figure table (figures
    that are tables of their own); ``measured_at``: when, if not now (figures measured
    in a copy of the tree, recorded here)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = {
        "measured_at": measured_at
        or dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": figures,
        "notes": notes,
    }
    if markdown:
        data[name]["markdown"] = markdown
    path.write_text(json.dumps(data, indent=2) + "\n")  # figures keep their order
    render_markdown(data)
    print(f"\n[{name}]")
    if markdown:
        print(markdown)
        return
    for key, value in figures.items():
        print(f"  {key}: {value}")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def render_markdown(data: dict[str, Any]) -> None:
    lines = [
        "# Benchmark results",
        "",
        "Written by `make bench` (`benchmarks/run_all.py`); each section's figures were",
        "measured side by side in one run on the machine it names. Do not edit by hand.",
        "",
    ]
    for name in sorted(data):
        entry = data[name]
        m = entry["machine"]
        lines += [
            f"## {name}",
            "",
            f"{entry['measured_at']} · {m['cpus']} CPUs, no GPU · TensorFlow {m['tensorflow']}, Ray {m['ray']}",
            "",
        ]
        if entry.get("markdown"):
            lines.append(entry["markdown"])
        else:
            lines += ["| figure | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in entry["figures"].items()]
        if entry.get("notes"):
            lines += ["", entry["notes"]]
        lines.append("")
    (RESULTS / "README.md").write_text("\n".join(lines))
