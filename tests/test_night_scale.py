"""A night at scale (issue 24): the nightly report streams a night of many parts, and a
night's commit copies its parts in parallel, the commit rule intact.

Against the real embedded S3 server; no Ray (the night's parts are written the way the
scoring actors write them, ``predictions.predictions_table``, and committed by
``scoreplan.commit_night``, so the partition and its ``_SUCCESS`` are the real ones).
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from xfer.errors import StorageError
from xfer.models.calibration import file_metadata
from xfer.registry.layout import PREDICTIONS, ModelRef
from xfer.reports.nightly import summarize_night
from xfer.reports.nightstats import COLUMNS, READERS
from xfer.scoring.predictions import class_columns, predictions_table
from xfer.scoring.scorejob import NightPlan, ScoringJob
from xfer.scoring.scoreplan import (
    commit_night,
    night_root,
    table_manifest_uri,
    write_table_manifest,
)
from xfer.store import commit, storage

from .faultproxy import FaultProxy

CLASSES = ["ring", "star", "cross"]
REASONS = [
    "cannot decode (img.jpg): truncated file",
    "too large (12 MB > 10 MB)",
    "not an image: text/plain",
    "access denied: s3://in/secret",
]
SCORED_AT = "2026-11-29T02:00:00+00:00"


def part_table(seed: int, rows: int) -> Any:
    """One block's predictions in the scoring actors' schema (checked against
    ``predictions.predictions_table`` in :func:`test_parts_have_the_scorers_schema`), built
    with numpy: ~3% error rows, each with one of :data:`REASONS`."""
    rng = np.random.default_rng([24, seed])
    probs = rng.dirichlet([1.0, 1.5, 2.5], rows)
    failed = np.zeros(rows, dtype=bool)
    failed[rng.choice(rows, size=max(1, rows // 30), replace=False)] = True
    index = probs.argmax(axis=1)
    keys = [f"cam-{seed:04d}/img-{j:07d}.jpg" for j in range(rows)]
    cols: dict[str, Any] = {
        "key": pa.array(keys),
        "source_uri": pa.array([f"s3://in/{k}" for k in keys]),
        "predicted_label": pa.array(np.array(CLASSES, dtype=object)[index], pa.string(), failed),
        "predicted_index": pa.array(index.astype(np.int32), pa.int32(), failed),
        "probability": pa.array(probs[np.arange(rows), index], pa.float64(), failed),
    }
    for c, col in enumerate(class_columns(CLASSES)):
        cols[col] = pa.array(probs[:, c], pa.float64(), failed)
    cols["model_name"] = pa.array(["shapes"] * rows, pa.string())
    cols["run_id"] = pa.array(["run-1"] * rows, pa.string())
    at = dt.datetime.fromisoformat(SCORED_AT)
    cols["scored_at"] = pa.array([at] * rows, pa.timestamp("ms", tz="UTC"))
    reasons = np.array(REASONS, dtype=object)[rng.integers(len(REASONS), size=rows)]
    cols["error"] = pa.array(reasons, pa.string(), ~failed)
    metadata = {
        "xfer.classes": json.dumps(CLASSES),
        "xfer.run_id": "run-1",
        **file_metadata(None),  # the night's probabilities: the network's own
    }
    return pa.table(cols).replace_schema_metadata(metadata)


def test_parts_have_the_scorers_schema() -> None:
    model = ModelRef("s3://m/run-1", "run-1", "shapes", "s3://m/run-1/model", CLASSES, 48)
    job = ScoringJob(model=model, scored_at=SCORED_AT)
    items = [{"key": "a.jpg", "source_uri": "s3://in/a.jpg"}, {"key": "b", "source_uri": "b"}]
    probs = np.array([[0.2, 0.3, 0.5], [np.nan, np.nan, np.nan]])
    real = predictions_table(job, items, probs, [None, "not an image: text/plain"])
    ours = part_table(0, 60)
    assert ours.schema.equals(real.schema, check_metadata=True)
    assert ours.filter(pa.compute.is_null(ours["error"])).column("key").null_count == 0


def write_night(final: str, parts: int, rows: int) -> list[Any]:
    """A committed night of ``parts`` parts (the real staging, names and ``_SUCCESS``)."""
    token = uuid.uuid4().hex[:8]
    night = NightPlan(
        identity={"token": token},
        token=token,
        plan_uri=storage.join(night_root(final), token, "plan"),
        parts_uri=storage.join(night_root(final), token, "parts"),
        final=final,
        blocks=parts,
    )
    tables = [part_table(i, rows) for i in range(parts)]
    names = [f"part-{b:05d}-{token}.parquet" for b in range(parts)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda b: storage.write_parquet(tables[b], storage.join(night.parts_uri, names[b])),
                range(parts),
            )
        )
    summaries = {
        b: {
            "file": names[b],
            "rows": tables[b].num_rows,
            "errors": len(tables[b]) - tables[b]["error"].null_count,
        }
        for b in range(parts)
    }
    base = {"run_id": "run-1", "model_name": "shapes", "scored_at": SCORED_AT, "input": "s3://in/"}
    commit_night(night, summaries, {**base, "classes": CLASSES})
    return tables


def expected_figures(table: Any) -> dict[str, Any]:
    """The report's figures from the whole table, computed here without xfer's code."""
    rows = table.select(COLUMNS).to_pylist()
    scored = [r for r in rows if r["predicted_label"] is not None]
    conf = np.array([r["probability"] for r in scored], dtype=float)
    counts = Counter(r["predicted_label"] for r in scored)
    n = len(scored)
    return {
        "scored": n,
        "per_class": {c: counts[c] for c in CLASSES},
        "shares": {c: counts[c] / n for c in CLASSES},
        "confidence_histogram": np.histogram(conf, bins=10, range=(0, 1))[0].tolist(),
        "mean_confidence": float(conf.mean()),
        "low_confidence_share": float((conf < 0.6).mean()),
    }


def assert_same_figures(got: dict[str, Any], want: dict[str, Any]) -> None:
    # The mean is a sum taken in another order: equal to within float rounding.
    assert got["mean_confidence"] == pytest.approx(want["mean_confidence"], rel=1e-12)
    assert {**got, "mean_confidence": 0} == {**want, "mean_confidence": 0}


# ------------------------------------------------------------ the nightly report

PARTS, ROWS = 200, 2000


@pytest.fixture(scope="module")
def big_night(s3_server: Any) -> dict[str, Any]:
    """A night of 200 parts (400,000 rows), a night of 1 part, and a test split."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    root = f"s3://{name}"
    final = f"{root}/preds/dt=2026-11-29"
    tables = write_night(final, PARTS, ROWS)
    small = f"{root}/preds/dt=2026-11-28"
    write_night(small, 1, ROWS)
    run = f"{root}/runs/run-1"
    test = pa.concat_tables([part_table(1000 + i, 700) for i in range(3)])
    # Several row groups: the test split is read through the same streaming code.
    storage.write_parquet(test, storage.join(run, PREDICTIONS, "test.parquet"), row_group_size=500)
    return {"final": final, "small": small, "run": run, "tables": tables, "test": test}


def test_the_report_of_200_parts_has_the_whole_tables_figures(big_night: dict[str, Any]) -> None:
    whole = pa.concat_tables(big_night["tables"])
    summary = summarize_night(big_night["final"], CLASSES, big_night["run"])
    rows = whole.select(COLUMNS).to_pylist()
    errors = [(r["key"], r["error"]) for r in rows if r["error"]]
    reasons = Counter(e.split(":")[0].split(" (")[0] for _, e in errors)
    assert summary["rows"] == PARTS * ROWS == whole.num_rows
    assert summary["errors"] == len(errors) > 20
    assert summary["error_reasons"] == dict(reasons.most_common(10))
    assert list(summary["error_reasons"]) == [r for r, _ in reasons.most_common(10)]
    assert summary["error_examples"] == [{"key": k, "error": e} for k, e in errors[:20]]
    night, ref = expected_figures(whole), expected_figures(big_night["test"])
    assert_same_figures(summary["night"], night)
    assert_same_figures(summary["test_split"], ref)
    shift = 0.5 * sum(abs(night["shares"][c] - ref["shares"][c]) for c in CLASSES)
    assert summary["drift"]["class_shift"] == pytest.approx(shift, rel=1e-12)
    assert (summary["run_id"], summary["input"]) == ("run-1", "s3://in/")


MEASURE = r"""
import json, sys, tracemalloc
import pyarrow as pa
from xfer.reports.nightly import summarize_night
big, small, run, classes = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
summarize_night(small, classes, run)  # warm up: imports, clients, one part's buffers
tracemalloc.start()
summary = summarize_night(big, classes, run)
python_peak = tracemalloc.get_traced_memory()[1]
print(json.dumps({"python": python_peak, "arrow": pa.default_memory_pool().max_memory(),
                  "rows": summary["rows"]}))
"""


def test_the_report_holds_a_few_parts_never_the_night(big_night: dict[str, Any]) -> None:
    """In a fresh process: the peak of Python's heap (tracemalloc) and of Arrow's memory
    pool while the report reads 200 parts stays within a few parts' size, ten times
    less than the night. The code before issue 24 (every part concatenated, columns
    turned into lists) peaked at 71 MB / 20 MB here, against a bound of 1.9 MB."""
    tables = big_night["tables"]
    marker = storage.read_json(storage.join(big_night["final"], commit.SUCCESS))
    files = [storage.stat(storage.join(big_night["final"], f)).size for f in marker["files"]]
    part = max(files) + max(t.select(COLUMNS).nbytes for t in tables)  # its bytes, decoded
    bound = 2 * READERS * part + 256 * 1024  # READERS parts at once, each read and decoded
    night = sum(t.select(COLUMNS).nbytes for t in tables)
    assert night > 8 * bound, "the night must dwarf the bound, or the test proves nothing"
    args = [big_night["final"], big_night["small"], big_night["run"], json.dumps(CLASSES)]
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peak["rows"] == PARTS * ROWS
    assert peak["python"] < bound, (peak, bound, night)
    assert peak["arrow"] < bound, (peak, bound, night)


# --------------------------------------------------------- the parallel commit

NPARTS = 32


def stage(final: str, version: str) -> tuple[str, list[str]]:
    """A night's parts staged the way xfer names them (the night's token in each)."""
    staging = commit.staging_prefix(final)
    files = [f"part-{i:05d}-{version}.parquet" for i in range(NPARTS)]
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda f: storage.write_bytes(storage.join(staging, f), version.encode()), files
            )
        )
    return staging, files


def commit_night_parts(final: str, staging: str, files: list[str], version: str) -> None:
    body = json.dumps({"version": version, "files": files}).encode()
    commit.commit_partition(
        staging,
        final,
        commit.SUCCESS,
        body,
        keep=files,
        before_delete=lambda _: write_table_manifest(final, files),
    )


def assert_whole(final: str, version: str) -> list[str]:
    """The marker names this version's parts, each there, once, holding the version."""
    marker = storage.read_json(storage.join(final, commit.SUCCESS))
    assert marker["version"] == version
    for name in marker["files"]:
        assert storage.read_bytes(storage.join(final, name)) == version.encode()
    manifest = storage.read_text(table_manifest_uri(final)).split()
    assert manifest == [storage.join(final, name) for name in marker["files"]]
    return marker["files"]


@pytest.mark.parametrize("action", ["slowdown", "denied"])
def test_one_failed_copy_fails_the_parallel_commit_and_a_retry_commits(
    fault_proxy: FaultProxy, bucket: str, action: str
) -> None:
    final = f"{bucket}/preds/dt=2026-11-29"
    old_staging, old = stage(final, "old")
    commit_night_parts(final, old_staging, old, "old")
    staging, new = stage(final, "new")
    fault_proxy.clear()  # its log: this commit's requests only
    # One part's copy answered 503 (past the client's retries) or 403; every copy slowed
    # down so that parallel ones overlap at the proxy.
    fault_proxy.add("COPY", r"/part-00017-new\.parquet", action)
    fault_proxy.add("COPY", r"/dt(=|%3D)2026-11-29/part-", "delay", pause=0.3)
    with pytest.raises(StorageError, match=r"part-00017-new\.parquet"):
        commit_night_parts(final, staging, new, "new")
    assert fault_proxy.max_in_flight["COPY"] > 1, "the copies ran one at a time"
    assert fault_proxy.max_in_flight["COPY"] <= commit.COPY_WORKERS
    assert fault_proxy.requests("PUT", r"/_SUCCESS") == [], "no marker after a failed copy"
    assert assert_whole(final, "old") == old  # the previous night, whole
    staged = sorted(storage.basename(f.uri) for f in storage.list_files(staging))
    assert staged == new  # a failed commit keeps its staging
    fault_proxy.clear()
    fault_proxy.add("COPY", r"/dt(=|%3D)2026-11-29/part-", "delay", pause=0.3)
    commit_night_parts(final, staging, new, "new")
    assert fault_proxy.max_in_flight["COPY"] >= 4
    assert assert_whole(final, "new") == new
    listed = [storage.basename(f.uri) for f in storage.list_files(final)]
    assert listed == sorted([*new, commit.SUCCESS])  # every part once, no old one left
    assert storage.list_files(staging) == []
