"""How each stage's cost grows with its size: 10k, 30k and 100k items (1,000 runs).

    python benchmarks/bench_scale.py [--sizes 10000,30000,100000] [--runs 100,300,1000]

Tiny generated images (16x16 PNGs, each one different, so that sharding keeps them
all) are uploaded once, in nested folders (``raw/s`` holds all of them, ``raw/s/m``
the first 30k, ``raw/s/m/m`` the first 10k: see :func:`raw_prefixes`) on the embedded
S3 server, and every stage is measured at every size, each measurement in a fresh
driver process of its own (attached to the benchmark's local Ray):

- ``shard``: `xfer shard` (``xfer.data.shard.shard_dataset``) of the N images;
- ``reader_plan``: the training reader's plan over the shards sharding wrote (the
  manifest, the row groups, the epoch's order and both pipelines' segments);
- ``reader_epoch``: one training epoch of ``xfer.data.reader.make_dataset`` (decoded);
- ``cache_plan``: the feature cache's plan (``features.plan_cache``, a miss) and each
  of two ranks' pieces (``featurebuild.rank_pieces``);
- ``night_plan``: a night's plan (``scoreplan.plan_night``) over the N objects;
- ``score``: `xfer score` (``xfer.scoring.score.score``) of the N objects with a tiny model,
  ``score.block_size`` small enough for thousands of parts, commit and report included;
- ``nightly_report``: ``nightly.write_nightly_report`` over that night (N rows);
- ``runs_list``: `xfer runs list` (``xfer.cli.main``) over 100, 300, 1,000 runs: copies
  of a real run's folder (one trained here), one in ten left running (no ``_SUCCESS``).

For each: wall time; the driver's peak RSS (``VmHWM``, reset after the stage's imports)
and that peak above the process's RSS after those imports (its baseline); store requests per item counted at the
client (a botocore ``before-call.s3`` hook on ``xfer.store.s3.s3_client()``, per operation,
plus Parquet files opened through pyarrow's S3 filesystem, whose own ranged reads
are not counted). Requests and memory are the driver's only: Ray workers and actors
(shard, score) are not counted. Per stage: the growth exponent (least-squares slope of
log time over log size) and the memory ratio largest / smallest, against the goals
exponent <= 1.1 and ratio <= 1.3; a log-log plot goes to ``results/scale.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import math
import os
import pstats
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common import RESULTS, ROOT, environment, record

DATE = "2026-01-01"
CLASSES = ["circle", "square"]
IMAGE_PX = 16
MODEL_PX = 32
SHARD_MB = 0.1  # ~120 tiny images a shard: shards grow in number with the input
BLOCK_SIZE = 64  # score.block_size: 1,563 parts at 100k
SIZES = (10_000, 30_000, 100_000)
RUNS = (100, 300, 1_000)
EXPONENT_GOAL = 1.1
MEMORY_GOAL = 1.3
TAG = "XFER_BENCH_RESULT "
CHILD_TIMEOUT_S = 1800
START = time.perf_counter()
ORDER = (  # the costly score last: a run cut short has recorded the others
    "shard",
    "reader_plan",
    "reader_epoch",
    "cache_plan",
    "night_plan",
    "runs_list",
    "score",
    "nightly_report",
)
RAY_STAGES = ("shard", "score")
NEEDS = {
    "reader_plan": "shard",
    "reader_epoch": "shard",
    "cache_plan": "shard",
    "nightly_report": "score",
}


def step(message: str) -> None:
    print(f"[bench_scale {time.perf_counter() - START:6.1f}s] {message}", flush=True)


# ------------------------------------------------------------ inputs


def tiny_pngs(count: int) -> list[bytes]:
    """``count`` different 16x16 PNGs (the index in the first pixels)."""
    import numpy as np
    from PIL import Image

    base = np.random.default_rng(0).integers(0, 255, (IMAGE_PX, IMAGE_PX, 3), dtype=np.uint8)
    out = []
    for i in range(count):
        pixels = base.copy()
        pixels[0, :4, 0] = np.frombuffer(i.to_bytes(4, "little"), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def raw_prefixes(sizes: list[int]) -> dict[int, str]:
    """Nested folders, one per size, the smaller inside the larger: ``raw/s`` holds the
    largest size, ``raw/s/m`` the next, ... (each image is uploaded once). The smallest
    holds class folders; a larger one holds the smaller one's folder ``m`` and its own
    extra images in ``x``: for sharding these are its two classes."""
    ordered = sorted(sizes)
    return {n: f"{ROOT}/raw/s" + "/m" * (len(ordered) - 1 - k) for k, n in enumerate(ordered)}


def upload(images: list[bytes], sizes: list[int], threads: int = 32) -> None:
    """Each image once, under the smallest size's folder that holds it."""
    from xfer.store import s3

    client = s3.s3_client()
    prefixes = raw_prefixes(sizes)
    ordered = sorted(sizes)

    def put(i: int) -> None:
        k = next(k for k, n in enumerate(ordered) if i < n)
        where = f"{CLASSES[i % len(CLASSES)]}" if k == 0 else "x"
        bucket, key = s3.split_s3(f"{prefixes[ordered[k]]}/{where}/{i:07d}.png")
        client.put_object(Bucket=bucket, Key=key, Body=images[i], ContentType="image/png")

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, range(max(sizes))))


def train_model() -> str:
    """A real tiny run (tiny_cnn, one head epoch) on generated shapes, published."""
    from xfer.config import ShardConfig, load_config
    from xfer.data.shard import shard_dataset
    from xfer.data.synth import synthesize
    from xfer.train.driver import train

    synthesize(f"{ROOT}/raw/model", CLASSES, per_class=40, size=MODEL_PX, seed=5)
    shard_dataset(f"{ROOT}/raw/model", f"{ROOT}/datasets/model", ShardConfig(target_shard_mb=0.05))
    overrides = {
        "storage.root": ROOT,
        "data.dataset": "model",
        "data.image_size": MODEL_PX,
        "model.base": "tiny_cnn",
        "model.weights": "none",
        "model.head.pooling": "max",
        "model.head.dense": "[]",
        "model.head.dropout": 0.0,
        "train.batch_size": 8,
        "train.head.epochs": 1,
        "train.fine_tune.epochs": 0,
        "train.verbose": 0,
        "cluster.num_workers": 1,
        "output.model_name": "scale",
        "output.gate.min_test_accuracy": 0.0,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    with contextlib.redirect_stdout(io.StringIO()):
        return str(train(cfg).run_uri)


def runs_root(count: int) -> str:
    return f"s3://bench/runs-{count}/xfer"


def make_runs(run_uri: str, count: int, threads: int = 32) -> None:
    """``count`` copies of the run's folder (and its model pointer) under a root of their
    own, ids ``YYYYmmdd-HHMMSS-NNNNN`` and driver start records a minute apart, one in ten
    without ``_SUCCESS`` (running); each indexed as its driver would (:func:`index_runs`)."""
    from xfer.store import s3, storage

    client = s3.s3_client()
    src_bucket, src_key = s3.split_s3(run_uri)
    run_id = src_key.rsplit("/", 1)[1]
    files = [s3.split_s3(f.uri)[1] for f in storage.list_files(run_uri)]
    models = s3.split_s3(f"{ROOT}/models")[1]
    pointers = [s3.split_s3(f.uri)[1] for f in storage.list_files(f"{ROOT}/models")]
    dest_bucket, dest_root = s3.split_s3(runs_root(count))
    jobs = [(p, f"{dest_root}/models{p[len(models) :]}") for p in pointers]
    runs: list[tuple[str, bool]] = []
    for i in range(count):
        start = 1_767_225_600 + 60 * i  # 2026-01-01, a minute apart
        new_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(start))}-{i:05d}"
        complete = i % 10 != 9
        runs.append((new_id, complete))
        for f in files:
            if f.endswith("/_SUCCESS") and not complete:
                continue
            rel = re.sub(r"start-\d+-driver", f"start-{start * 1000}-driver", f[len(src_key) + 1 :])
            jobs.append((f, f"{dest_root}/runs/{new_id}/{rel}".replace(run_id, new_id)))

    def copy(job: tuple[str, str]) -> None:
        client.copy_object(
            Bucket=dest_bucket, Key=job[1], CopySource={"Bucket": src_bucket, "Key": job[0]}
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy, jobs))
    index_runs(runs_root(count), run_uri, runs, threads)


def index_runs(root: str, run_uri: str, runs: list[tuple[str, bool]], threads: int) -> None:
    """The run index's entries (``xfer.registry.runindex.IndexWriter``, where it exists): started,
    then committed for a complete run, as the training driver writes them."""
    try:
        from xfer.registry.runindex import IndexWriter
    except ImportError:  # no index in this version: runs list reads the run folders
        return
    from xfer.config import load_config
    from xfer.registry.layout import CONFIG, METRICS
    from xfer.store import storage

    cfg = load_config(storage.join(run_uri, CONFIG), [f"storage.root={root}"])
    metrics = storage.read_json(storage.join(run_uri, METRICS))

    def write(run: tuple[str, bool]) -> None:
        writer = IndexWriter(cfg, run[0], f"{root}/runs/{run[0]}")
        writer.started()
        if run[1]:
            writer.committed({**metrics, "run_id": run[0]})

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, runs))


# ------------------------------------------------------------ child: the stages


def dataset_uri(n: int) -> str:
    return f"{ROOT}/datasets/scale-n{n}"


def stage_shard(a: dict[str, Any]) -> dict[str, Any]:
    from xfer.config import ShardConfig
    from xfer.data.shard import shard_dataset

    with contextlib.redirect_stdout(io.StringIO()):
        s = shard_dataset(a["src"], dataset_uri(a["n"]), ShardConfig(target_shard_mb=SHARD_MB))
    return {"items": s.inputs, "rows": sum(s.rows.values()), "shards": sum(s.shards.values())}


def _spec(manifest: Any, decode: bool = False) -> Any:
    from xfer.data.reader import ReaderSpec

    return ReaderSpec(manifest, "train", MODEL_PX, 64, training=True, decode=decode)


def stage_reader_plan(a: dict[str, Any]) -> dict[str, Any]:
    from xfer.data.manifest import load_manifest
    from xfer.data.reader import epoch_order, pipeline_segments

    manifest = load_manifest(dataset_uri(a["n"]))
    spec = _spec(manifest)
    units = spec.units()
    order = epoch_order(units, spec.seed, 0, shuffle=True)
    slots = spec.steps_per_epoch(2) * spec.per_replica_batch * 2
    segments = [pipeline_segments(order, slots, p, 2) for p in range(2)]
    return {
        "items": manifest.split("train").rows,
        "units": len(units),
        "segments": sum(map(len, segments)),
    }


def stage_reader_epoch(a: dict[str, Any]) -> dict[str, Any]:
    from xfer.data.manifest import load_manifest
    from xfer.data.reader import make_dataset

    spec = _spec(load_manifest(dataset_uri(a["n"])), decode=True)
    rows = 0
    for _, _, weights in make_dataset(spec, epochs=1):
        rows += int((weights.numpy() > 0).sum())
    return {"items": rows, "shards": len(spec.manifest.split("train").shards)}


def stage_cache_plan(a: dict[str, Any]) -> dict[str, Any]:
    from xfer.config import load_config
    from xfer.data.featurebuild import rank_pieces
    from xfer.data.features import SPLITS, plan_cache
    from xfer.data.manifest import load_manifest
    from xfer.models.weights import fetch_weights

    cfg = load_config(
        None,
        [
            f"storage.root={ROOT}",
            f"data.dataset=scale-n{a['n']}",
            f"data.image_size={MODEL_PX}",
            "model.base=tiny_cnn",
            "model.weights=none",
            "model.head.features=cached",
        ],
    )
    manifest = load_manifest(dataset_uri(a["n"]))
    plan = plan_cache(cfg, manifest, fetch_weights("none"), build_id="bench")
    pieces = [rank_pieces(manifest, list(SPLITS), r, 2) for r in range(2)]
    items = sum(manifest.split(s).rows for s in SPLITS if s in manifest.splits)
    return {"items": items, "build": plan.build, "pieces": sum(map(len, pieces))}


def stage_night_plan(a: dict[str, Any]) -> dict[str, Any]:
    from xfer.scoring.scoreplan import plan_night

    final = f"{ROOT}/plans/n{a['n']}/dt={DATE}"
    night, _ = plan_night({"bench": "scale"}, a["src"], "all", final, BLOCK_SIZE)
    return {"items": night.rows, "blocks": night.blocks}


def stage_score(a: dict[str, Any]) -> dict[str, Any]:
    from xfer.config import load_config
    from xfer.scoring.score import score

    cfg = load_config(None, [f"storage.root={ROOT}", f"score.block_size={BLOCK_SIZE}"])
    with contextlib.redirect_stdout(io.StringIO()):
        r = score(cfg, a["model"], a["src"], f"{ROOT}/predictions/n{a['n']}", DATE)
    return {"items": int(r.rows), "errors": int(r.errors), "output": str(r.output)}


def stage_nightly_report(a: dict[str, Any]) -> dict[str, Any]:
    from xfer.registry.layout import resolve_model
    from xfer.reports.nightly import write_nightly_report

    ref = resolve_model(a["model"])
    partition = f"{ROOT}/predictions/n{a['n']}/dt={DATE}"
    with contextlib.redirect_stdout(io.StringIO()):
        summary = write_nightly_report(partition, list(ref.classes), ref.run_uri)
    return {"items": int(summary.get("rows", a["n"]))}


def stage_runs_list(a: dict[str, Any]) -> dict[str, Any]:
    from xfer import cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["runs", "list", f"storage.root={runs_root(a['n'])}"])
    if status != 0:
        raise RuntimeError(f"xfer runs list exited {status}")
    return {"items": a["n"], "lines": len(out.getvalue().splitlines())}


STAGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "shard": stage_shard,
    "reader_plan": stage_reader_plan,
    "reader_epoch": stage_reader_epoch,
    "cache_plan": stage_cache_plan,
    "night_plan": stage_night_plan,
    "score": stage_score,
    "nightly_report": stage_nightly_report,
    "runs_list": stage_runs_list,
}
IMPORTS = {  # imported before the baseline is read: the stage's code, not its work
    "shard": ["xfer.data.shard", "ray"],
    "reader_plan": ["xfer.data.reader", "xfer.data.manifest"],
    "reader_epoch": ["xfer.data.reader", "xfer.data.manifest", "tensorflow"],
    "cache_plan": [
        "xfer.data.features",
        "xfer.data.featurebuild",
        "xfer.models.weights",
        "xfer.config",
    ],
    "night_plan": ["xfer.scoring.scoreplan"],
    "score": ["xfer.scoring.score", "ray", "ray.data"],
    "nightly_report": ["xfer.reports.nightly", "xfer.registry.layout"],
    "runs_list": ["xfer.cli", "xfer.registry.runs"],
}


def _status_mb(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` (peak) of this process, in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> float:
    """This process's RSS now, with its peak reset to it (Linux ``clear_refs`` 5), so
    that the peak read later is the stage's. ``ru_maxrss`` would not do: Linux carries
    the forking parent's peak across ``execve`` (every child would show the benchmark's
    own 800 MB)."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_mb("VmRSS")


def count_requests() -> Counter[str]:
    """Store requests made by this process: boto3 calls by operation, and Parquet files
    opened through pyarrow's filesystem (``arrow:open_input_file``)."""
    from xfer.store import s3, storage

    counts: Counter[str] = Counter()

    def hook(model: Any, **_: Any) -> None:
        counts[model.name] += 1

    s3.s3_client().meta.events.register("before-call.s3", hook)
    real = storage.arrow_filesystem

    class Counting:
        def __init__(self, fs: Any):
            self._fs = fs

        def open_input_file(self, path: str) -> Any:
            counts["arrow:open_input_file"] += 1
            return self._fs.open_input_file(path)

        def __getattr__(self, name: str) -> Any:
            counts[f"arrow:{name}"] += 1
            return getattr(self._fs, name)

    def counting(uri: str) -> tuple[Any, str]:
        fs, path = real(uri)
        return Counting(fs), path

    storage.arrow_filesystem = counting  # type: ignore[assignment]
    return counts


def profile_lines(profiler: cProfile.Profile, top: int = 12) -> list[str]:
    """The functions with the most time of their own, then the most time below them."""
    lines = []
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(top)
        body = text.getvalue().split("filename:lineno(function)", 1)[-1]
        for line in body.splitlines():
            if line.strip():
                line = re.sub(r"\S*/(site-packages|src)/", "", " ".join(line.split()))
                lines.append(f"[{key}] {line}")
    return lines


class PeakSnapshots:
    """tracemalloc, and a thread that snapshots the traced heap each time it grows by a
    fifth: the largest snapshot's top allocation sites say what the driver held at its
    peak (not what it still holds at the end, which is usually nothing)."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.best, self.size = every_s, None, 0
        self.stop = threading.Event()
        tracemalloc.start(4)
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(self.every_s):
            current, _ = tracemalloc.get_traced_memory()
            if current > 1.2 * max(self.size, 1 << 20):
                self.best, self.size = tracemalloc.take_snapshot(), current

    def top(self, n: int = 10) -> list[str]:
        self.stop.set()
        self.thread.join()
        tracemalloc.stop()
        if self.best is None:
            return []
        stats = self.best.statistics("traceback")[:n]
        out = [f"traced heap at its largest snapshot: {self.size / 2**20:.1f} MB"]
        for stat in stats:
            where = " <- ".join(
                re.sub(r"\S*/(site-packages|src|benchmarks)/", "", f"{f.filename}:{f.lineno}")
                for f in stat.traceback
            )
            out.append(f"{stat.size / 2**20:.1f} MB in {stat.count} blocks: {where}")
        return out


def child(stage: str, a: dict[str, Any]) -> None:
    import importlib

    for module in ["pyarrow", "pyarrow.parquet", "xfer.store.storage", *IMPORTS[stage]]:
        importlib.import_module(module)
    counts = count_requests()
    profiler = cProfile.Profile() if a.get("profile") else None
    heap = PeakSnapshots() if a.get("trace_memory") else None
    baseline = reset_peak()
    t0 = time.perf_counter()
    out = profiler.runcall(STAGES[stage], a) if profiler else STAGES[stage](a)
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    out.update(
        seconds=seconds,
        peak_rss_mb=peak,
        baseline_rss_mb=baseline,
        peak_above_baseline_mb=peak - baseline,
        requests=dict(counts),
    )
    if profiler:
        out["profile"] = profile_lines(profiler)
    if heap:
        out["memory_top"] = heap.top()
    print(TAG + json.dumps(out), flush=True)


# ------------------------------------------------------------ the parent


def child_env() -> dict[str, str]:
    import ray

    import xfer

    env = dict(os.environ)
    src = os.path.dirname(os.path.dirname(os.path.abspath(xfer.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if ray.is_initialized():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    return env


def run_child(stage: str, args: dict[str, Any], log_dir: str, env: dict[str, str]) -> dict:
    log = os.path.join(log_dir, f"{stage}-{args['n']}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "_child", stage, json.dumps(args)]
    with open(log, "wb") as out:
        code = subprocess.run(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S
        ).returncode
    with open(log, errors="replace") as f:
        text = f.read()
    found = [line[len(TAG) :] for line in text.splitlines() if line.startswith(TAG)]
    if code != 0 or not found:
        tail = "\n".join(text.splitlines()[-30:])
        raise RuntimeError(f"{stage} at {args['n']} failed (exit {code}, log {log}):\n{tail}")
    return json.loads(found[-1])


def exponent(sizes: list[float], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) over log(size)."""
    xs = [math.log(s) for s in sizes]
    ys = [math.log(max(t, 1e-6)) for t in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def per_item(requests: dict[str, int], items: int) -> dict[str, float]:
    return {op: float(f"{n / max(items, 1):.3g}") for op, n in sorted(requests.items())}


def summarize(stage: str, points: list[dict[str, Any]]) -> dict[str, Any]:
    sizes = [p["n"] for p in points]
    seconds = [p["seconds"] for p in points]
    peaks = [p["peak_rss_mb"] for p in points]
    growth = exponent(sizes, seconds) if len(points) > 1 else None
    ratio = peaks[-1] / peaks[0]
    return {
        "sizes": sizes,
        "items": [p["items"] for p in points],
        "seconds": [round(s, 3) for s in seconds],
        "peak_rss_mb": [round(m, 1) for m in peaks],
        "baseline_rss_mb": [round(p["baseline_rss_mb"], 1) for p in points],
        "peak_above_baseline_mb": [round(p["peak_above_baseline_mb"], 1) for p in points],
        "requests_per_item": [per_item(p["requests"], p["items"]) for p in points],
        "requests": [p["requests"] for p in points],
        "exponent": None if growth is None else round(growth, 3),
        "memory_ratio": round(ratio, 3),
        "memory_above_baseline_ratio": round(
            max(points[-1]["peak_above_baseline_mb"], 1.0)
            / max(points[0]["peak_above_baseline_mb"], 1.0),
            3,
        ),
        "meets_exponent": growth is None or growth <= EXPONENT_GOAL,
        "meets_memory": bool(ratio <= MEMORY_GOAL),
        "driver_only": stage in RAY_STAGES,
        "detail": [{k: v for k, v in p.items() if k not in _POINT_KEYS} for p in points],
    }


_POINT_KEYS = {
    "n",
    "items",
    "seconds",
    "peak_rss_mb",
    "baseline_rss_mb",
    "peak_above_baseline_mb",
    "requests",
}


def plot(stages: dict[str, dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 5))
    for name, s in stages.items():
        ax_t.plot(s["sizes"], s["seconds"], "o-", label=f"{name} (k={s['exponent']})")
        above = [max(m, 0.1) for m in s["peak_above_baseline_mb"]]
        ax_m.plot(s["sizes"], above, "o-", label=f"{name} (x{s['memory_ratio']:.2f})")
    for ax, title, unit in (
        (ax_t, "wall time", "seconds"),
        (ax_m, "driver peak RSS above its baseline", "MB"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("items (runs for runs_list)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(stages: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| stage | sizes | seconds | exponent | driver peak RSS (MB) | above baseline (MB) "
        "| memory ratio (above baseline) | requests / item at the largest | goals |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in stages.items():
        reqs = s["requests_per_item"][-1]
        top = sorted(reqs.items(), key=lambda kv: -kv[1])[:4]
        goals = (
            ("ok" if s["meets_exponent"] else "**exponent**")
            + " / "
            + ("ok" if s["meets_memory"] else "**memory**")
        )
        lines.append(
            f"| {name}{' (driver only)' if s['driver_only'] else ''} "
            f"| {', '.join(f'{n:,}' for n in s['sizes'])} "
            f"| {', '.join(f'{t:.2f}' for t in s['seconds'])} | {s['exponent']} "
            f"| {', '.join(f'{m:.0f}' for m in s['peak_rss_mb'])} "
            f"| {', '.join(f'{m:.0f}' for m in s['peak_above_baseline_mb'])} "
            f"| {s['memory_ratio']:.2f} ({s['memory_above_baseline_ratio']:.2f}) "
            f"| {', '.join(f'{op} {v:.3g}' for op, v in top) or '-'} | {goals} |"
        )
    return "\n".join(lines)


def measure(
    sizes: list[int],
    runs: list[int],
    stages: list[str],
    work: str,
    env: dict[str, str],
    profile: bool = False,
    trace_memory: bool = False,
    done: Callable[[dict[str, list[dict[str, Any]]]], None] = lambda points: None,
) -> dict[str, list[dict[str, Any]]]:
    model = ""
    prefixes = raw_prefixes(sizes)
    if "score" in stages or "nightly_report" in stages or "runs_list" in stages:
        t0 = time.perf_counter()
        model = train_model()
        step(f"trained the tiny model {model} ({time.perf_counter() - t0:.0f}s)")
    if "runs_list" in stages:
        for count in runs:
            t0 = time.perf_counter()
            make_runs(model, count)
            step(f"{count} runs made under {runs_root(count)} ({time.perf_counter() - t0:.0f}s)")
    points: dict[str, list[dict[str, Any]]] = {s: [] for s in ORDER if s in stages}
    for stage in [s for s in ORDER if s in stages]:
        for n in runs if stage == "runs_list" else sizes:
            args = {
                "n": n,
                "model": model,
                "src": prefixes.get(n, ""),
                "profile": profile,
                "trace_memory": trace_memory,
            }
            r = run_child(stage, args, work, env)
            r["n"] = n
            points[stage].append(r)
            step(
                f"{stage} at {n:,}: {r['seconds']:.2f}s, driver peak {r['peak_rss_mb']:.0f} MB "
                f"({r['peak_above_baseline_mb']:.0f} above baseline), "
                f"{sum(r['requests'].values())} requests"
            )
        done(points)
    return points


def run(
    sizes: list[int],
    runs: list[int],
    stages: list[str],
    profile: bool = False,
    trace_memory: bool = False,
) -> dict[str, Any]:
    t_all = time.perf_counter()

    def save(points: dict[str, list[dict[str, Any]]]) -> None:  # after each stage
        save_results(points, sizes, runs, time.perf_counter() - t_all)

    with environment() as work:
        env = child_env()
        if {"shard", "night_plan", "score"} & set(stages) or "reader_plan" in stages:
            t0 = time.perf_counter()
            upload(tiny_pngs(max(sizes)), sizes)
            step(f"uploaded {max(sizes):,} tiny PNGs ({time.perf_counter() - t0:.0f}s)")
        points = measure(sizes, runs, stages, work, env, profile, trace_memory, save)
    return save_results(points, sizes, runs, time.perf_counter() - t_all)


def save_results(
    points: dict[str, list[dict[str, Any]]], sizes: list[int], runs: list[int], total: float
) -> dict[str, Any]:
    summary = {s: summarize(s, p) for s, p in points.items() if p}
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(summary, str(RESULTS / "scale.png"))
    missed = [s for s, v in summary.items() if not (v["meets_exponent"] and v["meets_memory"])]
    left = [s for s, p in points.items() if not p]
    record(
        "scale",
        {
            "stages": summary,
            "total_seconds": round(total, 1),
            "missed_goals": missed,
            "not_measured": left,
        },
        notes=notes(sizes, runs, total)
        + (f" Not measured (run cut short): {left}." if left else ""),
        markdown=markdown(summary) + "\n\n![scale](scale.png)",
    )
    return summary


def notes(sizes: list[int], runs: list[int], total: float) -> str:
    return (
        f"Sizes {', '.join(f'{n:,}' for n in sizes)} items ({', '.join(map(str, runs))} runs for "
        f"runs_list); whole benchmark {total / 60:.1f} min on {os.cpu_count()} CPUs. Each figure "
        "is one fresh driver process (`benchmarks/bench_scale.py`, its docstring says what each "
        f"stage runs): {IMAGE_PX}x{IMAGE_PX} PNGs on the embedded S3 server, shards of "
        f"{SHARD_MB} MB, score.block_size {BLOCK_SIZE}, a tiny_cnn model. Peak RSS is VmHWM of "
        "the driver process, reset after its imports (ru_maxrss keeps the forking parent's peak "
        "across execve on Linux); baseline = its RSS after the imports; for shard and score (Ray) the driver's alone, not its workers'. "
        "Requests per item are the driver's, counted at the client (boto3 calls by operation; "
        "arrow:open_input_file = Parquet files opened through pyarrow, whose ranged reads are "
        "not counted). Goals: exponent <= 1.1, memory ratio (largest / smallest) <= 1.3. "
        "Measured on a machine shared with other work: wall times are noisy."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="items per size")
    parser.add_argument("--runs", default=",".join(map(str, RUNS)), help="runs for runs_list")
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated stages")
    parser.add_argument(
        "--record-from",
        metavar="RESULTS_JSON",
        help="record the scale section of another results.json here (a run made in a copy "
        "of the tree), re-rendered, with NOTE added to its notes",
    )
    parser.add_argument("--note", default="", help="with --record-from: a line for the notes")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run each stage under cProfile (slower): its top lines go into the results",
    )
    parser.add_argument(
        "--trace-memory",
        action="store_true",
        help="trace the driver's allocations (slower): the top sites at its peak go into "
        "the results",
    )
    args = parser.parse_args()
    if args.record_from:
        with open(args.record_from) as f:
            entry = json.load(f)["scale"]
        for stage in entry["figures"]["stages"].values():  # from the raw counts
            counts = zip(stage["requests"], stage["items"], strict=True)
            stage["requests_per_item"] = [per_item(r, n) for r, n in counts]
        notes_text = " ".join(t for t in (entry["notes"], args.note) if t)
        body = markdown(entry["figures"]["stages"]) + "\n\n![scale](scale.png)"
        record("scale", entry["figures"], notes_text, body, entry["measured_at"])
        return 0
    sizes = sorted(int(s) for s in args.sizes.split(","))
    runs = sorted(int(s) for s in args.runs.split(","))
    stages = [s.strip() for s in args.only.split(",") if s.strip()]
    for stage, needs in NEEDS.items():  # what a stage reads, some earlier stage writes
        if stage in stages and needs not in stages:
            stages.append(needs)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}: choose from {', '.join(ORDER)}")
    run(sizes, runs, stages, args.profile, args.trace_memory)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "_child":
        child(sys.argv[2], json.loads(sys.argv[3]))
        raise SystemExit(0)
    raise SystemExit(main())
