"""Training while the store has bad minutes: ridden out within ``storage.outage_seconds``,
and past it a clean stop (exit 75, one line naming the endpoint).

Before issue 21 only `xfer score` set the store-outage budget: one ``503 SlowDown``
on a worker's read of a dataset shard (or on the driver's write of metrics.json)
failed the whole training run (exit 2, "training run ... failed").
"""

from __future__ import annotations

import pytest

from xfer.config import load_config
from xfer.store import storage
from xfer.store.commit import SUCCESS

from .conftest import REPO, run_xfer, train_overrides
from .faultproxy import FaultProxy

# One short head phase on one worker: enough reads of every shard, little training.
SHORT = {
    "train.head.epochs": 1,
    "train.fine_tune.epochs": 0,
    "cluster.num_workers": 1,
    "cluster.max_failures": 0,  # a failed worker fails the run: no restart hides it
    "output.predictions": "false",  # no scoring pass after training: nothing reads it
    "output.gate.min_test_accuracy": 0.0,
}
SHARDS = r"/datasets/shapes/.*\.parquet"
TRAIN_SHARDS = r"/datasets/shapes/[^/]+/train/part-\d+\.parquet"


def test_shard_tasks_ride_out_as_long_as_their_driver(ray_local: None) -> None:
    """`xfer shard` sets the budget on its driver; each task gets it, whatever the
    environment its (pooled) Ray worker process was started with."""
    from xfer.raycluster import run_tasks
    from xfer.store.retry import budget, budget_seconds

    with budget(7):
        seen = run_tasks(budget_seconds, [(), ()], "probe")
    assert seen == [7.0, 7.0]


@pytest.mark.slow
def test_throttled_reads_and_writes_during_training_are_ridden_out(
    fault_proxy: FaultProxy,
    session_root: str,
    pretrained_weights: str,
    target_dataset: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from xfer.train.driver import train

    # No SDK retries (boto3, pyarrow): every SlowDown reaches xfer's own retry.
    monkeypatch.setenv("XFER_S3_MAX_ATTEMPTS", "1")
    # Past the training shards' opening reads (4 shards, read 4 at a time): these
    # land on the worker's row-group reads.
    reads = fault_proxy.add("GET", TRAIN_SHARDS, "slowdown", times=4, skip=8)
    writes = fault_proxy.add("PUT", r"/metrics\.json", "slowdown", times=3)
    overrides = train_overrides(
        session_root, pretrained_weights, **SHORT, **{"storage.outage_seconds": 120}
    )
    result = train(load_config(None, overrides))
    assert reads.hits == 4, "the proxy throttled fewer shard reads than planned"
    assert writes.hits == 3, "the proxy throttled fewer metrics.json writes than planned"
    assert storage.exists(storage.join(result.run_uri, SUCCESS))
    assert result.metrics["failures"] == [], "a worker failed instead of riding it out"


@pytest.mark.slow
def test_a_store_away_past_the_budget_stops_training_with_exit_75(
    fault_proxy: FaultProxy, session_root: str, pretrained_weights: str, target_dataset: str
) -> None:
    fault_proxy.add("GET", SHARDS, "slowdown", seconds=600)
    overrides = train_overrides(
        session_root,
        pretrained_weights,
        **SHORT,
        **{"storage.outage_seconds": 3, "cluster.local_num_cpus": 2},
    )
    env = fault_proxy.env()
    env.update({"RAY_ADDRESS": "", "XFER_S3_MAX_ATTEMPTS": "2", "PYTHONPATH": str(REPO / "src")})
    proc = run_xfer("train", *overrides, env=env, timeout=600)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("xfer: error:")]
    assert proc.returncode == 75, proc.stderr[-4000:]
    assert len(errors) == 1, proc.stderr[-4000:]
    line = errors[0]
    assert fault_proxy.endpoint in line, line
    assert "budget 3s" in line and "output.run_id=" in line, line
    assert "Traceback" not in proc.stderr.split("xfer: error:")[-1]
