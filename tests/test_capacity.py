"""benchmarks/capacity.py: the calculator's arithmetic and its command line (no servers)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "capacity.py"
HOURS = 3600.0


@pytest.fixture(scope="module")
def cap() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("capacity", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["capacity"]


def prices(cap: ModuleType) -> argparse.Namespace:
    return cap.parser().parse_args(["--images", "1"])


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_doubling_the_images_doubles_requests_and_their_cost(cap: ModuleType) -> None:
    n = 50_000_000
    one = cap.night_requests(n, 2048, 6 * HOURS, 150.0, 3, False)
    two = cap.night_requests(2 * n, 2048, 6 * HOURS, 150.0, 3, False)
    for kind in ("LIST", "GET", "PUT", "COPY"):
        assert two[kind] / one[kind] == pytest.approx(2.0, rel=0.01), kind
    cost_one = cap.request_cost(one, prices(cap), 0)
    assert cap.request_cost(two, prices(cap), 0) / cost_one == pytest.approx(2.0, rel=0.01)
    epoch_one = cap.epoch_requests(n, 64, 2000, 4)
    assert cap.epoch_requests(2 * n, 64, 2000, 4)["GET"] / epoch_one["GET"] == pytest.approx(2.0)


def test_requests_follow_the_code_per_image_block_and_page(cap: ModuleType) -> None:
    """One GET per image; per block two PUTs (plan block, part), one COPY and three GETs
    (the plan, the report's read of the part, the HEAD before the copy); one LIST per 1,000
    keys; an Inventory manifest replaces the listing with one GET per data file. (bench_scale
    measured the driver's share at 10k objects: PUT, COPY exact, GET within 7%.)"""
    n, block = 10_000_000, 2048
    req = cap.night_requests(n, block, 6 * HOURS, 150.0, 2, False)
    blocks = math.ceil(n / block)
    assert req["COPY"] == blocks
    assert req["PUT"] >= 2 * blocks
    assert n + 3 * blocks <= req["GET"] <= n + 3 * blocks + 200
    assert req["LIST"] >= n // 1000
    inventory = cap.night_requests(n, block, 6 * HOURS, 150.0, 2, True)
    assert inventory["LIST"] < 100
    assert inventory["GET"] == req["GET"] + 11
    args = prices(cap)
    listed = cap.request_cost(inventory, args, n) - cap.request_cost(inventory, args, 0)
    assert listed == pytest.approx(n * 0.0025 / 1e6)


def test_a_tighter_deadline_needs_proportionally_more_gpus_rounded_up(cap: ModuleType) -> None:
    n, rate = 100_000_000, 2771.0
    at_six = cap.workers_needed(n, 6 * HOURS, rate)
    assert at_six == math.ceil(n / (6 * HOURS * rate)) == 2  # 1.67 GPUs: rounded up
    assert cap.workers_needed(n, 3 * HOURS, rate) == math.ceil(2 * n / (6 * HOURS * rate)) == 4
    assert cap.workers_needed(n, 1 * HOURS, rate) == math.ceil(6 * n / (6 * HOURS * rate)) == 11


def test_parallel_listing_takes_the_sequential_time_over_the_prefixes(cap: ModuleType) -> None:
    n, latency = 100_000_000, 0.05
    sequential = cap.listing_seconds(n, latency)
    assert sequential == pytest.approx(100_000 * latency)  # 1,000 keys a page
    assert cap.listing_seconds(n, latency, 1) == sequential
    for parallel in (4, 16, 64):
        assert cap.listing_seconds(n, latency, parallel) == pytest.approx(
            sequential / parallel, rel=0.01
        )


def test_a_gpu_is_fed_by_enough_cores_or_bounded_by_them(cap: ModuleType) -> None:
    rate, cores, bound = cap.per_gpu(2800.0, 400.0, None)
    assert (rate, cores, bound) == (2800.0, 7, "GPU")
    assert cap.per_gpu(2800.0, 400.0, 4) == (1600.0, 4, "decode")


def test_counts_and_durations_parse(cap: ModuleType) -> None:
    assert [cap.parse_count(t) for t in ("100000000", "1e8", "100M", "10k")] == [
        100_000_000,
        100_000_000,
        100_000_000,
        10_000,
    ]
    assert cap.parse_duration("6h") == 6 * HOURS
    assert cap.parse_duration("1h30m") == 1.5 * HOURS
    assert cap.parse_duration("90") == 90.0
    for bad in ("6x", "h", "-1h", ""):
        with pytest.raises(cap.PlanError, match="--deadline"):
            cap.parse_duration(bad)


def test_the_cli_prints_the_plan_from_the_committed_results() -> None:
    done = run("--images", "1M,10M,100M", "--deadline", "6h")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "| quantity | 1,000,000 | 10,000,000 | 100,000,000 | source |" in out
    for row in ("GPUs (one actor each) for the deadline", "request cost (USD)", "driver memory"):
        assert f"| {row}" in out
    assert "measured: scoring" in out and "[mlperf]" in out and "[s3price]" in out


def test_the_cli_plans_a_training_epoch_and_a_cpu_night() -> None:
    epoch = run("--images", "10M", "--train-epoch", "--model", "resnet50", "--gpu", "a100")
    assert epoch.returncode == 0, epoch.stderr
    assert "| A100 training, resnet50 (img/s) | 2,600 | published [timm] |" in epoch.stdout
    cpu = run("--images", "1M", "--gpu", "none", "--store", "s3")
    assert cpu.returncode == 0, cpu.stderr
    assert "| CPU cores for the deadline |" in cpu.stdout


def test_bench_scale_figures_are_shown_beside_the_model(tmp_path: Path) -> None:
    """results.json -> scale (bench_scale.py): the night's driver requests per item by
    price class and the driver's peak RSS at each size, next to the derived counts."""
    results = json.loads((SCRIPT.parent / "results" / "results.json").read_text())
    per_op = {"ListObjectsV2": 0.002, "GetObject": 0.03, "HeadObject": 0.04, "CopyObject": 0.03}
    score = {
        "sizes": [10_000, 100_000],
        "peak_rss_mb": [300.0, 330.0],
        "requests_per_item": [{}, per_op],
    }
    notes = "... shards of 0.1 MB, score.block_size 32, a tiny_cnn model ..."
    results["scale"] = {"figures": {"stages": {"score": score}}, "notes": notes}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    done = run("--images", "1M", "--results", str(path))
    assert done.returncode == 0, done.stderr
    assert "a night of 100,000 objects in blocks of 32 (driver only)" in done.stdout
    assert "requests per item, measured: LIST 0.002, GET 0.07, COPY 0.03" in done.stdout
    assert "requests per item, this model: LIST " in done.stdout
    assert "driver peak RSS at 10,000, 100,000: 300, 330 MB (x1.10)" in done.stdout


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--images", "100M", "--deadline", "6x"], "--deadline '6x'"),
        (["--images", "lots"], "--images 'lots'"),
        (["--images", "1M", "--gpu", "h999"], "argument --gpu"),
        (["--images", "100M", "--deadline", "10m", "--list-parallel", "1"], "--deadline 10.0 min"),
        (["--images", "1M", "--results", "/nonexistent/results.json"], "/nonexistent/results.json"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], names: str) -> None:
    done = run(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("capacity.py: error:"), done.stderr
    assert names in lines[0]
