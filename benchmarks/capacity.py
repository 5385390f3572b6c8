"""Capacity plan: what scoring N images a night, or a training epoch over N images, takes.

    python benchmarks/capacity.py --images 100000000 --deadline 6h
    python benchmarks/capacity.py --images 1M,10M,100M --deadline 6h --gpu l4
    python benchmarks/capacity.py --images 10M --train-epoch --model resnet50 --gpu a100

Arithmetic only (no servers, no Ray): the per-item figures this machine measured
(``benchmarks/results/results.json``, written by ``make bench`` on 2 CPU cores without
a GPU), published GPU and S3 figures (cited in ``CITATIONS`` and docs/capacity.md),
and what the code does per image, per block and per page (derived from
``xfer.configsections`` defaults and the code paths named in docs/capacity.md). Every
row of the table says which. The formulas are in docs/capacity.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "results.json"
PAGE = 1000  # keys per ListObjectsV2 page (and keys per DeleteObjects request)
PREFIX_GET_PER_S = 5500  # S3: GET/HEAD per second per partitioned prefix [s3perf]
# Python objects per item, measured with tracemalloc on copies of the code's objects
# (docs/capacity.md): a scored block's summary dict and Ray Data's {"block": b} item
# (670 B) plus its name in _SUCCESS; a row group's Unit, its place in the epoch's order
# and its Segment in a training reader's plan (261 B).
SUMMARY_BYTES = 1000
UNIT_BYTES = 260
SHARD_ENTRY_BYTES = 300  # one shard in manifest.json: uri, rows, row groups, sha256
CITATIONS = {
    "mlperf": "MLPerf Inference (closed, NVIDIA, TensorRT INT8, ResNet-50 v1.5 Offline, "
    "preprocessed inputs): T4 6,035.57 (v0.7 T4x1_TRT), A10 13,805.2 (v1.1 A10x1_TRT), "
    "L4 12,881.7 (v3.1 L4x1_TRT), A100-PCIe-80GB 39,152.4 img/s (v3.0 A100-PCIe-80GBx1_TRT); "
    "github.com/mlcommons/inference_results_v*/closed/NVIDIA/results/<system>/resnet50/"
    "Offline/performance/run_1/mlperf_log_summary.txt",
    "keras": "keras.io/api/applications: time per inference step, batch 32, Tesla A100: "
    "MobileNetV2 3.8 ms, ResNet50 4.6 ms; CPU (AMD EPYC, 92 cores): 25.9 / 58.2 ms",
    "timm": "huggingface/pytorch-image-models#1491: ResNet-50 training on one A100, AMP, "
    "batch 512, channels-last: 2,600 img/s",
    "s3price": "aws.amazon.com/s3/pricing (S3 Standard, us-east-1, read 2026-11-29): PUT, COPY, "
    "POST, LIST $0.005 per 1,000; GET, SELECT and all other $0.0004 per 1,000; DELETE free; "
    "S3 Inventory $0.0025 per million objects listed",
    "s3perf": "docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html: 5,500 "
    "GET/HEAD and 3,500 PUT/COPY/POST/DELETE per second per prefix; small requests' median "
    "latency 'in the tens of milliseconds' (S3 performance whitepaper)",
}
# Keras at batch 32 on one A100 [keras]: 32 images per step.
KERAS_A100 = {"mobilenet_v2": 32 / 3.8e-3, "resnet50": 32 / 4.6e-3}
KERAS_CPU_STEP_MS = {"mobilenet_v2": 25.9, "resnet50": 58.2}
MLPERF_RESNET50 = {"t4": 6035.57, "a10": 13805.2, "l4": 12881.7, "a100": 39152.4}
TRAIN_A100_RESNET50 = 2600.0  # [timm]
# Store latencies (ms): measured here against the embedded SeaweedFS (loopback,
# 2026-11-29, medians of 20 pages / 200 GETs / 100 copies at load ~2.6; again with
# --measure-store: 194-240 ms a page at load 30-45) or typical S3 (assumed).
STORES = {
    "local": {"list_ms": 75.0, "get_ms": 2.1, "copy_ms": 7.2},
    "s3": {"list_ms": 50.0, "get_ms": 30.0, "copy_ms": 30.0},
}


LEGEND = [
    "measured: results.json on this machine (2 CPU cores, no GPU), or once here as stated;",
    "derived: the code's defaults and docs/capacity.md's formulas; assumed: a typical figure",
    "(an option); published:",
]


class PlanError(ValueError):
    """Bad input: one line, exit 2."""


@dataclass(frozen=True)
class Fig:
    value: float
    source: str  # measured | published | derived | assumed | option


@dataclass(frozen=True)
class Inputs:
    """Every per-item figure the plan uses, each with where it came from."""

    decode_core: Fig  # img/s one core prepares (scoring: GET bytes -> model input)
    predict_core: Fig  # img/s one CPU core predicts (CPU-only plan)
    efficiency: Fig  # xfer's steady rate / the limit, same cores
    gpu_rate: Fig  # img/s one GPU predicts (or trains)
    image_bytes: Fig
    startup_s: Fig
    driver_mb: Fig  # driver peak at the measured size
    list_s: Fig
    get_s: Fig
    copy_s: Fig
    block: int
    row_group_rows: int
    shard_bytes: float
    heartbeat_s: float


# ------------------------------------------------------------------ parsing


def parse_count(text: str) -> int:
    """``100000000``, ``1e8``, ``100M``, ``10k``, ``2G``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgG]?)\s*", text)
    if not m:
        raise PlanError(f"--images {text!r}: expected a count like 1000000, 1e6, 10M or 100k")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    value = round(float(m.group(1)) * scale)
    if value < 1:
        raise PlanError(f"--images {text!r}: needs at least 1 image")
    return value


def parse_duration(text: str) -> float:
    """Seconds in ``6h``, ``90m``, ``45s``, ``1h30m`` or a bare number of seconds."""
    parts = re.findall(r"([0-9]*\.?[0-9]+)([hms]?)", text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip().replace(" ", ""):
        raise PlanError(f"--deadline {text!r}: expected a duration like 6h, 90m, 1h30m or 3600")
    seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)
    if seconds <= 0:
        raise PlanError(f"--deadline {text!r}: must be longer than 0")
    return seconds


# ----------------------------------------------------------------- measured


def load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise PlanError(f"{path}: no benchmark results (run `make bench`, or pass --results)")
    try:
        return dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise PlanError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None


def figure(results: dict[str, Any], section: str, name: str) -> float:
    try:
        return float(results[section]["figures"][name])
    except (KeyError, TypeError, ValueError):
        raise PlanError(
            f"results.json: {section} -> {name!r} is missing (run `make bench`)"
        ) from None


# boto3 operations (as bench_scale counts them) by price class
OP_CLASS = {
    "ListObjectsV2": "LIST",
    "ListObjects": "LIST",
    "PutObject": "PUT",
    "CopyObject": "COPY",
    "GetObject": "GET",
    "HeadObject": "GET",
    "HeadBucket": "GET",
    "arrow:open_input_file": "GET",
    "DeleteObjects": "DELETE",
    "DeleteObject": "DELETE",
}


def scale_stage(results: dict[str, Any], stage: str) -> dict[str, Any] | None:
    """bench_scale.py's figures for ``stage`` (results.json -> scale), if it ran: sizes,
    the driver's peak RSS and its requests per item by operation at each size."""
    try:
        found = results["scale"]["figures"]["stages"][stage]
        return {
            "sizes": [int(n) for n in found["sizes"]],
            "peak": [float(m) for m in found["peak_rss_mb"]],
            "per_item": dict(found["requests_per_item"][-1]),
        }
    except (KeyError, TypeError, ValueError, IndexError):
        return None


def by_class(per_op: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for op, value in per_op.items():
        kind = OP_CLASS.get(op, "other")
        out[kind] = out.get(kind, 0.0) + float(value)
    return out


def measured_inputs(results: dict[str, Any], args: argparse.Namespace) -> Inputs:
    from xfer.configsections import ScoreConfig, ShardConfig

    score, shard = ScoreConfig(), ShardConfig()
    try:
        cpus = float(results["scoring"]["machine"]["cpus"])
    except (KeyError, TypeError, ValueError):
        raise PlanError("results.json: scoring -> machine -> cpus is missing") from None
    sec = "scoring"
    predict = figure(results, sec, "limit: model.predict batch 64, one process, 2 cores (img/s)")
    if args.train_epoch:  # the training reader: tf.data decode + resize, in memory
        kind = "pre-resized" if args.preresized else "original"
        dec = figure(results, "input_pipeline", f"{kind}: in-memory decode limit (img/s)") / cpus
        dec *= figure(results, "input_pipeline", f"{kind}: reader from S3 / in-memory")
    else:  # scoring's own preparation (EXIF, RGB, pre-resize, resize), one core
        dec = figure(
            results, sec, "limit: scoring's own preparation (+ shard re-encoding), one core (img/s)"
        )
    eff = figure(results, sec, "score_vs_limit with scoring's own preparation")
    eff_src = "measured: scoring"
    if args.train_epoch:  # the reader's own share is in dec; nothing measured past it
        eff, eff_src = 1.0, "assumed: not measured for training"
    mb = figure(results, "input_pipeline", "original: shard MB")
    n_img = figure(results, "input_pipeline", "images")
    store = measure_store() if args.measure_store else STORES[args.store]
    src = {"local": "measured once: local SeaweedFS", "s3": "assumed: typical S3"}[args.store]
    src = "measured now: local SeaweedFS" if args.measure_store else src
    return Inputs(
        decode_core=Fig(dec, f"measured: {'input_pipeline' if args.train_epoch else sec}"),
        predict_core=predict_per_core(predict / cpus, args.model),
        efficiency=Fig(eff, eff_src),
        gpu_rate=gpu_rate(args),
        image_bytes=Fig(args.image_kb * 1e3, "option")
        if args.image_kb
        else Fig(mb * 1e6 / n_img, "measured: input_pipeline"),
        startup_s=Fig(
            figure(results, sec, "10k: start-up to first predictions (s)"), "measured: scoring"
        ),
        driver_mb=Fig(figure(results, sec, "driver peak RSS (MB) at 10k"), "measured: scoring"),
        list_s=Fig((args.list_ms or store["list_ms"]) / 1e3, "option" if args.list_ms else src),
        get_s=Fig((args.get_ms or store["get_ms"]) / 1e3, "option" if args.get_ms else src),
        copy_s=Fig(store["copy_ms"] / 1e3, src),
        block=score.block_size,
        row_group_rows=shard.row_group_rows,
        shard_bytes=shard.target_shard_mb * 1e6,
        heartbeat_s=score.lock_stale_minutes * 60 / 4,
    )


def predict_per_core(mobilenet: float, model: str) -> Fig:
    """CPU predict per core: measured for MobileNetV2; ResNet50 scaled by Keras' CPU ratio."""
    if model == "mobilenet_v2":
        return Fig(mobilenet, "measured: scoring")
    ratio = KERAS_CPU_STEP_MS["mobilenet_v2"] / KERAS_CPU_STEP_MS[model]
    return Fig(mobilenet * ratio, "derived: measured x [keras] CPU ratio")


def gpu_rate(args: argparse.Namespace) -> Fig:
    """One GPU's img/s: Keras on an A100 [keras], scaled to other GPUs by MLPerf's ratio
    [mlperf]; training from [timm] scaled the same way."""
    if args.gpu == "none":
        return Fig(0.0, "option")
    if args.gpu_img_s:
        return Fig(args.gpu_img_s, "option")
    by_gpu = MLPERF_RESNET50[args.gpu] / MLPERF_RESNET50["a100"]
    if args.train_epoch:
        by_model = KERAS_A100[args.model] / KERAS_A100["resnet50"]
        exact = args.gpu == "a100" and args.model == "resnet50"
        src = "published [timm]" if exact else "derived: [timm] x [keras] x [mlperf]"
        return Fig(TRAIN_A100_RESNET50 * by_model * by_gpu, src)
    if args.gpu == "a100":
        return Fig(KERAS_A100[args.model], "published [keras]")
    return Fig(KERAS_A100[args.model] * by_gpu, "derived: [keras] A100 x [mlperf] ratio")


def measure_store(keys: int = 5000, reads: int = 200) -> dict[str, float]:
    """Median latency (ms) of a ListObjectsV2 page of 1,000 keys (the whole prefix listed
    page by page, 4 times), a ranged GET of a 45 KB object and a CopyObject, against a
    fresh embedded SeaweedFS: how STORES["local"] was measured. Load-sensitive: the
    server shares the machine's cores."""
    import os
    import statistics
    import tempfile
    import time
    from concurrent.futures import ThreadPoolExecutor

    from xfer.store.s3server import EmbeddedS3

    def ms(call: Callable[[], Any]) -> tuple[float, Any]:
        start = time.perf_counter()
        out = call()
        return (time.perf_counter() - start) * 1e3, out

    with tempfile.TemporaryDirectory() as tmp, EmbeddedS3(tmp, buckets=("lat",)) as server:
        os.environ.update(server.env())
        from xfer.store.s3 import s3_client

        c, body = s3_client(), os.urandom(45_000)

        def put(i: int) -> None:
            c.put_object(Bucket="lat", Key=f"p/{i:07d}", Body=body if i < reads else b"")

        def get(i: int) -> bytes:
            return bytes(
                c.get_object(Bucket="lat", Key=f"p/{i:07d}", Range="bytes=0-")["Body"].read()
            )

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(put, range(keys)))
        pages: list[float] = []
        for _ in range(4):
            token: dict[str, str] = {}
            while True:
                took, page = ms(
                    lambda t=token: c.list_objects_v2(Bucket="lat", Prefix="p/", MaxKeys=PAGE, **t)
                )
                pages.append(took)
                if not page.get("IsTruncated"):
                    break
                token = {"ContinuationToken": page["NextContinuationToken"]}
        gets = [ms(lambda i=i: get(i))[0] for i in range(reads)]
        source = {"Bucket": "lat", "Key": "p/0000000"}
        copies = [
            ms(lambda i=i: c.copy_object(Bucket="lat", Key=f"c/{i}", CopySource=source))[0]
            for i in range(reads // 2)
        ]
    found = {"list_ms": pages, "get_ms": gets, "copy_ms": copies}
    medians = {key: statistics.median(values) for key, values in found.items()}
    line = ", ".join(f"{key} {value:.1f}" for key, value in medians.items())
    print(
        f"measured against a local SeaweedFS (load {os.getloadavg()[0]:.1f}): {line}",
        file=sys.stderr,
    )
    return medians


# -------------------------------------------------------------- the formulas


def listing_seconds(n: int, latency_s: float, parallel: int = 1) -> float:
    """ListObjectsV2 pages of 1,000 keys one after another; with P sub-prefixes listed
    in parallel (evenly filled; xfer.store.listing), the first page and one listing with a
    delimiter to find them, then pages/P each."""
    pages = math.ceil(n / PAGE)
    if parallel <= 1:
        return pages * latency_s
    return (2 + math.ceil(pages / parallel)) * latency_s


def night_requests(
    n: int, block: int, deadline_s: float, heartbeat_s: float, actors: int, inventory: bool
) -> dict[str, int]:
    """Store requests of one night of ``n`` objects (scoreplan, scorer, commit, nightly)."""
    blocks = math.ceil(n / block)
    kpages = math.ceil(blocks / PAGE)
    beats = math.ceil(deadline_s / heartbeat_s)  # lock heartbeat: one GET + one PUT each
    return {
        # the input's pages; per 1,000 blocks: the parts done, the commit's two listings of
        # the staging and one of the partition, the deletes' two, the night's root
        "LIST": (0 if inventory else math.ceil(n / PAGE)) + 7 * kpages,
        "PUT": 2 * blocks + beats + 6,  # plan block + part per block; markers, report
        "COPY": blocks,  # each part into dt=<date>/
        # each image; per block its plan (an actor), its part (the report) and the HEAD
        # boto3's managed copy makes before each CopyObject; the lock; the model per
        # actor; an Inventory's manifest and data files (~1M rows each)
        "GET": n + 3 * blocks + beats + 3 * actors + (math.ceil(n / 1e6) + 1 if inventory else 0),
        "DELETE": 3 * kpages,  # DeleteObjects, 1,000 keys each: old parts, staging
    }


def epoch_requests(
    n: int, rows_per_group: int, rows_per_shard: int, pipelines: int
) -> dict[str, int]:
    """Store requests of one training epoch: 3 column chunks (key, image, label) per row
    group, and per pipeline one HEAD + one footer GET per shard it opens."""
    shards = math.ceil(n / rows_per_shard)
    groups = math.ceil(n / rows_per_group)
    return {"LIST": 0, "PUT": 0, "COPY": 0, "GET": 3 * groups + 2 * shards * pipelines, "DELETE": 0}


def request_cost(req: dict[str, int], prices: argparse.Namespace, inventory_objects: int) -> float:
    tier1 = req["LIST"] + req["PUT"] + req["COPY"]
    return (
        tier1 * prices.price_put / 1e3
        + req["GET"] * prices.price_get / 1e3
        + req["DELETE"] * prices.price_delete / 1e3
        + inventory_objects * prices.price_inventory / 1e6
    )


def workers_needed(n: int, window_s: float, rate_per_worker: float) -> int:
    """GPUs (or cores) that score ``n`` images within ``window_s``, rounded up."""
    return math.ceil(n / (window_s * rate_per_worker))


def per_gpu(gpu: float, decode_core: float, cores: int | None) -> tuple[float, int, str]:
    """(img/s, cores, what bounds it) of one GPU fed by ``cores`` decode cores (None:
    as many as keep it busy)."""
    need = math.ceil(gpu / decode_core)
    cores = need if cores is None else cores
    feed = cores * decode_core
    return (min(gpu, feed), cores, "GPU" if feed >= gpu else "decode")


# ------------------------------------------------------------------ the plan

Quantities = dict[str, Any]  # every figure of the plan for one N


def compute(n: int, window_s: float, inp: Inputs, args: argparse.Namespace) -> Quantities:
    """Workers for ``n`` images in ``window_s``: GPUs with their decode cores, or CPU cores
    that decode and predict (1 / (1/decode + 1/predict) images per second each)."""
    eff = inp.efficiency.value
    if args.gpu == "none":
        rate = 1 / (1 / inp.decode_core.value + 1 / inp.predict_core.value)
        cores = workers_needed(n, window_s, rate * eff)
        return {"rate": rate, "workers": cores, "cores": cores, "fed": 1, "bound": "CPU"}
    rate, fed, bound = per_gpu(inp.gpu_rate.value, inp.decode_core.value, args.cores_per_gpu)
    gpus = workers_needed(n, window_s, rate * eff)
    return {"rate": rate, "workers": gpus, "cores": gpus * fed, "fed": fed, "bound": bound}


def night(n: int, deadline: float, inp: Inputs, args: argparse.Namespace) -> Quantities:
    q: Quantities = {"n": n, "deadline": deadline}
    q["list_seq"] = listing_seconds(n, inp.list_s.value)
    q["list_par"] = listing_seconds(n, inp.list_s.value, args.list_parallel)
    q["blocks"] = math.ceil(n / inp.block)
    q["commit"] = q["blocks"] * inp.copy_s.value / args.commit_parallel
    listed = 0.0 if args.inventory else q["list_par"]
    q["window"] = deadline - listed - inp.startup_s.value - q["commit"]
    if q["window"] <= 0:
        raise PlanError(
            f"--deadline {fmt_time(deadline)}: listing, start-up and commit of {n:,} images "
            "alone take longer; try --inventory or a larger --list-parallel"
        )
    q.update(compute(n, q["window"], inp, args))
    # Little's law: each reader thread holds an image for its GET and its decode.
    q["threads"] = math.ceil(q["rate"] * (inp.get_s.value + 1 / inp.decode_core.value))
    q["req"] = night_requests(n, inp.block, deadline, inp.heartbeat_s, q["workers"], args.inventory)
    q["driver_mb"] = inp.driver_mb.value + q["blocks"] * SUMMARY_BYTES / 1e6
    return finish(q, inp, args)


def epoch(n: int, deadline: float, inp: Inputs, args: argparse.Namespace) -> Quantities:
    q: Quantities = {"n": n, "deadline": deadline, "window": deadline}
    q["list_seq"] = listing_seconds(n, inp.list_s.value)
    q["list_par"] = listing_seconds(n, inp.list_s.value, args.list_parallel)
    q["rows_per_shard"] = max(1, int(inp.shard_bytes // inp.image_bytes.value))
    q["shards"] = math.ceil(n / q["rows_per_shard"])
    q["groups"] = math.ceil(n / inp.row_group_rows)
    q.update(compute(n, deadline, inp, args))
    q["req"] = epoch_requests(n, inp.row_group_rows, q["rows_per_shard"], q["workers"])
    q["plan_mb"] = q["groups"] * UNIT_BYTES / 1e6
    q["manifest_mb"] = q["shards"] * SHARD_ENTRY_BYTES / 1e6
    return finish(q, inp, args)


def finish(q: Quantities, inp: Inputs, args: argparse.Namespace) -> Quantities:
    """Requests per image, their cost, the GET rate and the bytes read."""
    req = q["req"]
    q["per_image"] = sum(v for k, v in req.items() if k != "DELETE") / q["n"]
    q["cost"] = request_cost(req, args, q["n"] if args.inventory else 0)
    q["get_rate"] = req["GET"] / q["window"]
    q["prefixes"] = math.ceil(q["get_rate"] / PREFIX_GET_PER_S)
    q["gb"] = q["n"] * inp.image_bytes.value / 1e9
    return q


Spec = tuple[str, Callable[[Quantities], str], str]  # label, value of one N, source


def specs(inp: Inputs, args: argparse.Namespace) -> list[Spec]:
    """The table's rows, in order, each with where its figure comes from."""
    lst = f"{inp.list_s.source}, {inp.list_s.value * 1e3:.0f} ms/page"
    rows: list[Spec] = [
        ("images", lambda q: f"{q['n']:,}", "input"),
        ("deadline", lambda q: fmt_time(q["deadline"]), "input"),
    ]
    if args.inventory:
        rows.append(("listing: none (an S3 Inventory manifest)", lambda q: "0 s", "input"))
    else:
        what = "listing the input (xfer shard)" if args.train_epoch else "listing the input"
        rows.append((f"{what}, one page after another", lambda q: fmt_time(q["list_seq"]), lst))
        par = f"listing, {args.list_parallel} sub-prefixes in parallel"
        rows.append((par, lambda q: fmt_time(q["list_par"]), lst))
    rows += epoch_specs(inp) if args.train_epoch else night_specs(inp, args)
    rows += compute_specs(inp, args)
    if not args.train_epoch and args.gpu != "none":
        get = f"reader threads per GPU (GET {inp.get_s.value * 1e3:.0f} ms)"
        rows.append((get, lambda q: f"{q['threads']}", f"derived; {inp.get_s.source}"))
    rows += request_specs(inp, args)
    if args.train_epoch:
        rows.append(("reader plan per worker (MB)", lambda q: f"{q['plan_mb']:,.0f}", "derived"))
        rows.append(("manifest.json (MB)", lambda q: f"{q['manifest_mb']:,.1f}", "derived"))
    else:
        src = f"{inp.driver_mb.source} ({inp.driver_mb.value:.0f} MB at 10k) + 1 KB/block"
        rows.append(("driver memory (MB)", lambda q: f"{q['driver_mb']:,.0f}", src))
    return rows


def night_specs(inp: Inputs, args: argparse.Namespace) -> list[Spec]:
    copy = f"{inp.copy_s.source}, {inp.copy_s.value * 1e3:.0f} ms/copy"
    return [
        (f"blocks ({inp.block:,} images each)", lambda q: f"{q['blocks']:,}", "derived"),
        (
            f"commit: parts copied, {args.commit_parallel} at a time",
            lambda q: fmt_time(q["commit"]),
            copy,
        ),
        (
            "start-up to first predictions",
            lambda q: fmt_time(inp.startup_s.value),
            inp.startup_s.source,
        ),
        ("time left for scoring", lambda q: fmt_time(q["window"]), "derived"),
    ]


def epoch_specs(inp: Inputs) -> list[Spec]:
    shard = f"shards (~{inp.shard_bytes / 1e6:.0f} MB each)"
    return [
        (shard, lambda q: f"{q['shards']:,} x {q['rows_per_shard']:,}", "derived"),
        (f"row groups ({inp.row_group_rows} rows)", lambda q: f"{q['groups']:,}", "derived"),
    ]


def compute_specs(inp: Inputs, args: argparse.Namespace) -> list[Spec]:
    eff = (
        "xfer's steady rate / the limit",
        lambda q: f"{inp.efficiency.value:.2f}",
        inp.efficiency.source,
    )
    decode = "reader: decode per core (img/s)" if args.train_epoch else "decode per core (img/s)"
    rows: list[Spec] = [(decode, lambda q: f"{inp.decode_core.value:,.0f}", inp.decode_core.source)]
    if args.gpu == "none":
        predict = f"predict per core, {args.model} (img/s)"
        return [
            *rows,
            (predict, lambda q: f"{inp.predict_core.value:,.0f}", inp.predict_core.source),
            ("one core, decode + predict (img/s)", lambda q: f"{q['rate']:,.0f}", "derived"),
            eff,
            ("CPU cores for the deadline", lambda q: f"{q['workers']:,}", "derived"),
        ]
    task = "training" if args.train_epoch else "predict"
    gpu = f"{args.gpu.upper()} {task}, {args.model} (img/s)"
    rows.insert(0, (gpu, lambda q: f"{inp.gpu_rate.value:,.0f}", inp.gpu_rate.source))
    need = math.ceil(inp.gpu_rate.value / inp.decode_core.value)
    rows.append(("cores per GPU to keep it busy", lambda q: f"{need}", "derived"))
    rows.append(
        (
            "one GPU and its cores (img/s, bound)",
            lambda q: f"{q['rate']:,.0f} ({q['fed']} cores, {q['bound']})",
            "derived",
        )
    )
    if not args.train_epoch:
        trt = MLPERF_RESNET50[args.gpu]
        ceiling = "ceiling: TensorRT INT8 ResNet-50 (img/s, cores to feed it)"
        feed = math.ceil(trt / inp.decode_core.value)
        rows.append((ceiling, lambda q: f"{trt:,.0f} ({feed} cores)", "published [mlperf]"))
    rows.append(eff)
    rows.append(
        ("GPUs (one actor each) for the deadline", lambda q: f"{q['workers']:,}", "derived")
    )
    rows.append(("CPU cores in all", lambda q: f"{q['cores']:,}", "derived"))
    return rows


def request_specs(inp: Inputs, args: argparse.Namespace) -> list[Spec]:
    rows: list[Spec] = [
        (f"requests: {kind}", lambda q, k=kind: f"{q['req'][k]:,}", "derived")
        for kind in ("LIST", "GET", "PUT", "COPY", "DELETE")
    ]
    rows.append(("billed requests per image", lambda q: f"{q['per_image']:.3f}", "derived"))
    rows.append(("request cost (USD)", lambda q: f"{q['cost']:,.2f}", "published [s3price]"))
    rate = "GET rate (/s), S3 prefixes it needs"
    rows.append((rate, lambda q: f"{q['get_rate']:,.0f}, {q['prefixes']}", "published [s3perf]"))
    read = f"{inp.image_bytes.source}, {inp.image_bytes.value / 1e3:.0f} KB/image"
    rows.append(("bytes read (GB)", lambda q: f"{q['gb']:,.0f}", read))
    return rows


def cross_check(results: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The night's driver-side requests and memory as bench_scale.py measured them, beside
    what :func:`night_requests` counts for the same night (the actors' share taken off)."""
    score = scale_stage(results, "score")
    notes = str(results.get("scale", {}).get("notes", ""))
    found = re.search(r"score\.block_size (\d+)", notes)  # bench_scale's, in its notes
    if args.train_epoch or score is None or found is None:
        return [
            "bench_scale.py's figures are not in results.json (run `make bench`): the request",
            "counts and the driver's growth above are derived from the code, not measured.",
        ]
    n, block = score["sizes"][-1], int(found.group(1))
    blocks = math.ceil(n / block)
    req = night_requests(n, block, 1.0, 150.0, 2, False)
    req["GET"] -= n + blocks + 3 * 2  # the actors' image and plan reads, model loads
    req["PUT"] -= blocks  # the actors' parts
    peak = score["peak"]
    sizes = ", ".join(f"{x:,}" for x in score["sizes"])
    lines = [
        f"bench_scale.py, a night of {n:,} objects in blocks of {block} (driver only):",
        "  requests per item, measured: " + fmt_classes(by_class(score["per_item"])),
        "  requests per item, this model: " + fmt_classes({k: v / n for k, v in req.items()}),
        f"  driver peak RSS at {sizes}: {fmt_peaks(peak)}",
    ]
    report = scale_stage(results, "nightly_report")
    if report is not None:
        lines.append(f"  nightly report, driver peak RSS: {fmt_peaks(report['peak'])}")
    return lines


def fmt_peaks(peak: list[float]) -> str:
    return f"{', '.join(f'{m:.0f}' for m in peak)} MB (x{peak[-1] / peak[0]:.2f})"


def fmt_classes(per: dict[str, float]) -> str:
    order = ["LIST", "GET", "PUT", "COPY", "DELETE", "other"]
    return ", ".join(f"{k} {per[k]:.3g}" for k in order if per.get(k))


def fmt_time(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def render(rows: list[Spec], plans: list[Quantities], title: str, notes: list[str]) -> str:
    head = ["quantity", *[f"{q['n']:,}" for q in plans], "source"]
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, value, source in rows:
        lines.append("| " + " | ".join([label, *[value(q) for q in plans], source]) + " |")
    lines += ["", *notes, "", *LEGEND]
    lines += [f"  [{key}] {text}" for key, text in CITATIONS.items()]
    return "\n".join(lines)


# ----------------------------------------------------------------------- CLI


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"capacity.py: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", required=True, help="N, or several: 1M,10M,100M")
    p.add_argument("--deadline", default="6h", help="the night's (or the epoch's) time: 6h, 90m")
    p.add_argument("--train-epoch", action="store_true", help="a training epoch instead of a night")
    p.add_argument("--model", choices=sorted(KERAS_A100), default="mobilenet_v2")
    p.add_argument("--gpu", choices=[*sorted(MLPERF_RESNET50), "none"], default="l4")
    p.add_argument("--gpu-img-s", type=float, help="override one GPU's img/s")
    p.add_argument("--cores-per-gpu", type=int, help="decode cores per GPU (default: enough)")
    p.add_argument("--image-kb", type=float, help="bytes per image in KB (default: measured)")
    p.add_argument("--preresized", action="store_true", help="training: shards from --max-side")
    p.add_argument("--store", choices=sorted(STORES), default="local", help="request latencies")
    p.add_argument("--measure-store", action="store_true", help="measure local latencies now")
    p.add_argument("--list-ms", type=float, help="ListObjectsV2 page latency (ms)")
    p.add_argument("--get-ms", type=float, help="GET latency of one image (ms)")
    p.add_argument("--list-parallel", type=int, default=16, help="sub-prefixes listed at once")
    p.add_argument("--commit-parallel", type=int, default=16, help="parts copied at once")
    p.add_argument("--inventory", action="store_true", help="input from an S3 Inventory manifest")
    p.add_argument("--price-put", type=float, default=0.005, help="USD per 1,000 PUT/COPY/LIST")
    p.add_argument("--price-get", type=float, default=0.0004, help="USD per 1,000 GET/HEAD")
    p.add_argument("--price-delete", type=float, default=0.0, help="USD per 1,000 DELETE")
    p.add_argument("--price-inventory", type=float, default=0.0025, help="USD per million listed")
    p.add_argument("--results", type=Path, default=RESULTS, help="results.json to read")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        ns = [parse_count(t) for t in args.images.split(",")]
        deadline = parse_duration(args.deadline)
        for name in ("list_parallel", "commit_parallel", "cores_per_gpu"):
            if getattr(args, name) is not None and getattr(args, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')}: must be at least 1")
        results = load_results(args.results)
        inp = measured_inputs(results, args)
        what = "a training epoch" if args.train_epoch else "a night of scoring"
        title = f"Capacity plan: {what}, {args.model}, GPU {args.gpu}, store {args.store}"
        one = epoch if args.train_epoch else night
        plans = [one(n, deadline, inp, args) for n in ns]
        print(render(specs(inp, args), plans, title, cross_check(results, args)))
    except PlanError as exc:
        print(f"capacity.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
