"""Day one of the nightly job (issue 23): empty nights, what ``{date}`` names, a report
that cannot fail a committed night, one store-outage budget.

Against the real embedded S3 server and the session's local Ray, with the session's
trained model. A night of 0 images starts no scoring actor, so these tests are quick.
"""

from __future__ import annotations

import datetime as dt

import pytest

from xfer.config import load_config
from xfer.data.synth import synthesize
from xfer.errors import ConfigError
from xfer.reports.nightly import REPORT, SUMMARY
from xfer.scoring.score import partition_date, score
from xfer.scoring.scoreplan import table_manifest_uri
from xfer.store import storage

from .conftest import config_for, run_xfer


def config(root: str, *overrides: str):
    return config_for(root, "score.batch_size=4", *overrides)


def test_an_empty_folder_commits_an_empty_night_flagged_in_its_report(
    trained_run, session_root, bucket, capsys
):
    """On main: DataError "no images found" (exit 2), no partition, and KubeRay retried
    the failed job."""
    storage.write_bytes(f"{bucket}/incoming/2026-04-01/.keep", b"")  # a folder, no image
    result = score(
        config(session_root),
        trained_run.run_uri,
        f"{bucket}/incoming/{{date}}/",
        f"{bucket}/preds",
        date="2026-04-01",
    )
    part = f"{bucket}/preds/dt=2026-04-01"
    assert (result.output, result.rows, result.errors) == (part, 0, 0)
    marker = storage.read_json(f"{part}/_SUCCESS")
    assert (marker["rows"], marker["files"]) == (0, [])
    assert storage.read_text(table_manifest_uri(part)) == ""  # a table reads 0 rows
    summary = storage.read_json(f"{part}/{SUMMARY}")
    assert summary["rows"] == 0 and summary["look_at"][0].startswith("0 images: nothing to score")
    assert "<b>Look at:</b> 0 images" in storage.read_text(f"{part}/{REPORT}")
    out, err = capsys.readouterr()
    assert "(0 images: nothing to score" in out and "no such folder" not in err
    assert "0 images to score: committed an empty night" in result.describe()
    assert not [f for f in storage.list_files(bucket) if "/_tmp/" in f.uri]


def test_a_missing_folder_of_the_night_before_exits_0_with_a_warning(
    trained_run, session_root, bucket
):
    """`score.date_offset_days=-1` without --date: {date} names yesterday (UTC); its
    folder was never made. On main: no such key, and exit 2."""
    assert partition_date(None, -1) in {
        (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=d)).isoformat()
        for d in (1, 0)  # (the test may run across midnight)
    }
    assert partition_date("20260301", -1) == "2026-03-01"  # an explicit --date wins
    before = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)
    inputs, out = f"{bucket}/incoming/{{date}}/", f"{bucket}/preds"
    overrides = [f"storage.root={session_root}", "score.date_offset_days=-1"]
    command = ["score", "--model", trained_run.run_uri, "--input", inputs, "--output", out]
    proc = run_xfer(*command, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    day = [d for d in storage.list_dirs(out) if d.startswith("dt=")]
    assert day in (["dt=" + before.isoformat()], ["dt=" + partition_date(None, -1)]), day
    part = f"{out}/{day[0]}"
    warning = f"[xfer] warning: --input {bucket}/incoming/{day[0][3:]}: no such folder"
    assert warning in proc.stderr and "Traceback" not in proc.stderr
    assert "0 images to score: committed an empty night" in proc.stdout
    first = storage.read_json(f"{part}/_SUCCESS")
    assert first["rows"] == 0 and storage.exists(f"{part}/{REPORT}")
    # A second run of the committed empty night: scored and committed again, like any.
    again = score(config(session_root), trained_run.run_uri, inputs, out, date=day[0][3:])
    second = storage.read_json(f"{part}/_SUCCESS")
    assert again.rows == second["rows"] == 0 and second["scored_at"] != first["scored_at"]
    assert storage.read_json(f"{part}/{SUMMARY}")["look_at"][0].startswith("0 images")


def test_a_report_that_cannot_be_written_leaves_the_night_committed(
    trained_run, session_root, bucket, fault_proxy, capsys
):
    """The store throttles the report's PUT past storage.outage_seconds, after the
    commit. On main: StoreUnavailable (exit 75, "nothing committed") for a committed
    night, and a re-run scored the whole night again."""
    synthesize(f"{bucket}/incoming", ["ring", "star"], per_class=1, size=40, seed=11)
    rule = fault_proxy.add("PUT", r"/dt(=|%3D)2026-04-03/_summary\.json", "slowdown", times=10**6)
    cfg = config(session_root, "storage.outage_seconds=1")
    args = (trained_run.run_uri, f"{bucket}/incoming", f"{bucket}/preds")
    first = score(cfg, *args, date="2026-04-03")  # returns: the CLI exits 0
    part = f"{bucket}/preds/dt=2026-04-03"
    marker = storage.read_bytes(f"{part}/_SUCCESS")
    assert first.rows == 2 and rule.hits >= 1
    assert not storage.exists(f"{part}/{SUMMARY}") and not storage.exists(f"{part}/{REPORT}")
    err = capsys.readouterr().err
    assert f"[xfer] warning: the night at {part} is committed but its report was not" in err
    assert "budget 1s" in err  # storage.outage_seconds, not a budget of scoring's own
    fault_proxy.clear()
    again = score(cfg, *args, date="2026-04-03")
    assert again.report_only and again.rows == 2
    assert "writing it, without scoring again" in capsys.readouterr().out
    assert storage.read_bytes(f"{part}/_SUCCESS") == marker  # nothing scored or committed
    assert storage.read_json(f"{part}/{SUMMARY}")["rows"] == 2
    assert storage.exists(f"{part}/{REPORT}")


def test_scoring_has_no_budget_of_its_own():
    """One store-outage budget for every command: storage.outage_seconds."""
    with pytest.raises(ConfigError, match=r"store_outage_seconds is now storage\.outage_seconds"):
        load_config(None, ["score.store_outage_seconds=5"])
    cfg = load_config(None, ["score.date_offset_days=-1"])
    assert cfg.score.date_offset_days == -1 and cfg.storage.outage_seconds == 180
