"""Nightly scoring never loses or mixes a committed partition (issue 21).

Against the real embedded S3 server and a real local Ray, with the session's trained
model. One night is scored once for the module (:func:`baseline`); tests that need a
good partition to protect get a server-side copy of it under their own date.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import signal
import socket
import subprocess
import threading
import uuid

import numpy as np
import pytest
from PIL import Image

from xfer.data import inputs
from xfer.data.synth import synthesize
from xfer.errors import DataError, JobFailed, XferError
from xfer.scoring.score import partition_date, score
from xfer.scoring.scorelock import LOCK_FILE, NightBusy, NightLock
from xfer.scoring.scoreplan import NIGHT_FILE, night_root
from xfer.store import storage

from .conftest import config_for, run_xfer

GOOD_IMAGES = 24


@pytest.fixture(scope="module")
def night(s3_server, trained_run, session_root):
    """A bucket with a committed night of good images, scored with ``--date 20260105``."""
    name = f"nights-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(name)
    bucket = f"s3://{name}"
    synthesize(f"{bucket}/incoming", ["ring", "star"], per_class=GOOD_IMAGES // 2, size=48)
    result = score(
        config(session_root),
        trained_run.run_uri,
        f"{bucket}/incoming",
        f"{bucket}/preds",
        date="20260105",
    )
    return {
        "bucket": bucket,
        "output": result.output,
        "model": trained_run.run_uri,
        "root": session_root,
    }


def config(root: str, *overrides: str):
    return config_for(root, "score.batch_size=8", *overrides)


def good_partition(night: dict, day: str) -> str:
    """A committed partition for ``day``: the baseline night's files, copied."""
    part = f"{night['bucket']}/preds/dt={day}"
    for f in storage.list_files(night["output"]):
        storage.copy(f.uri, f"{part}/{storage.basename(f.uri)}")
    return part


def state(part: str) -> tuple[list[tuple[str, int]], bytes]:
    files = [(storage.basename(f.uri), f.size) for f in storage.list_files(part)]
    return files, storage.read_bytes(f"{part}/_SUCCESS")


def rows_of(part: str) -> dict[str, dict]:
    marker = storage.read_json(f"{part}/_SUCCESS")
    return {
        r["key"]: r
        for f in marker["files"]
        for r in storage.read_parquet(f"{part}/{f}").to_pylist()
    }


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_xfer("score", *args)


def score_night(night: dict, date: str) -> subprocess.CompletedProcess[str]:
    """`xfer score` of the night's incoming images into its preds, for ``date``."""
    bucket = night["bucket"]
    return cli(
        *("--model", night["model"], "--input", f"{bucket}/incoming"),
        *("--output", f"{bucket}/preds", "--date", date),
    )


# ------------------------------------------------------------ 5. one date, one name


def test_a_date_has_one_spelling(night):
    """`--date 20260105` wrote dt=20260105 beside dt=2026-01-05 on main."""
    assert night["output"].endswith("/preds/dt=2026-01-05")
    partitions = [d for d in storage.list_dirs(f"{night['bucket']}/preds") if d[0] != "_"]
    assert partitions == ["dt=2026-01-05"]  # (table engines skip _symlink_format_manifest)
    assert storage.list_dirs(f"{night['bucket']}/preds/_symlink_format_manifest") == partitions
    assert partition_date("2026-01-05") == partition_date("20260105") == "2026-01-05"
    for bad in ("2026-W48-5", "2026-02-30", "26-1-5", "2026-0105"):
        with pytest.raises(XferError, match=f"--date '{bad}' is not a date"):
            partition_date(bad)
    proc = score_night(night, "2026-W48-5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("xfer: error: --date '2026-W48-5'")


# ------------------------------------------------------ 1. refused reads, error share


def test_a_night_whose_reads_are_refused_fails_and_keeps_the_partition(night):
    """On main: exit 0, and the partition held 20 error rows instead of the good night."""
    part = good_partition(night, "2026-01-06")
    before = state(part)
    missing = f"s3://no-such-{uuid.uuid4().hex[:8]}"
    listing = f"{night['bucket']}/lists/missing.csv"
    rows = "\n".join(f"{missing}/cam/img{i}.jpg" for i in range(20))
    storage.write_bytes(listing, f"uri\n{rows}\n".encode())
    cfg = config(night["root"], "score.allow_outside_inputs=true")
    with pytest.raises(XferError) as caught:
        score(cfg, night["model"], listing, f"{night['bucket']}/preds", date="2026-01-06")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"--input {listing}: cannot read {missing}")
    assert "does not exist" in message and "previous partition stays" in message
    assert state(part) == before


def test_access_denied_on_the_inputs_fails_the_night_naming_the_object(night, fault_proxy):
    """403 on the night's images (a bucket policy, a role lacking s3:GetObject): on
    main each became an error row and the night replaced the partition."""
    part = good_partition(night, "2026-01-14")
    before = state(part)
    rule = fault_proxy.add("GET", r"/incoming/star/", "denied")
    with pytest.raises(XferError) as caught:
        score(
            config(night["root"]),
            night["model"],
            f"{night['bucket']}/incoming",
            f"{night['bucket']}/preds",
            date="2026-01-14",
        )
    message = str(caught.value)
    assert message.startswith(f"--input {night['bucket']}/incoming: cannot read ")
    assert "/incoming/star/star_" in message and "access denied" in message
    assert rule.hits >= 1 and state(part) == before


def test_a_night_of_mostly_errors_is_not_committed_and_a_lost_plan_is_made_again(night, capsys):
    """max_error_fraction guards the partition; the staged night is kept, and when the
    `_tmp/` lifecycle rule has expired its plan, the next attempt plans it again (on
    main it failed forever, reading the missing plan blocks)."""
    part = good_partition(night, "2026-01-07")
    before = state(part)
    broken = f"{night['bucket']}/broken"
    synthesize(broken, ["ring", "star"], per_class=1, size=48, seed=1)
    for i in range(6):
        storage.write_bytes(f"{broken}/junk/{i}.jpg", b"not an image %d" % i)
    out = f"{night['bucket']}/preds"
    with pytest.raises(
        DataError,
        match=r"6 of 8 inputs \(75%\) could not be scored, over "
        r"score.max_error_fraction \(50%\); nothing committed",
    ):
        score(config(night["root"]), night["model"], broken, out, date="2026-01-07")
    assert state(part) == before
    # A day later: the lifecycle rule expired the staged plan and parts, not _night.json.
    root = night_root(part)
    staged = storage.read_json(f"{root}/{NIGHT_FILE}")
    storage.delete_prefix(f"{root}/{staged['token']}")
    capsys.readouterr()
    allowed = config(night["root"], "score.max_error_fraction=1")
    result = score(allowed, night["model"], broken, out, date="2026-01-07")
    assert "lost blocks of its plan (expired?): planning the night again" in capsys.readouterr().out
    assert (result.rows, result.errors) == (8, 6)
    assert sum(r["error"] is not None for r in rows_of(part).values()) == 6


# ------------------------------------------------------------ 2. inputs that kill actors


def test_objects_over_the_size_limit_are_error_rows_never_read_whole(night, tmp_path):
    """On main every object was read whole: a 50 MB noise image was scored, and
    /dev/zero in a list was read until the actor died (retried for ever)."""
    prefix = f"{night['bucket']}/sizes"
    synthesize(prefix, ["ring", "star"], per_class=1, size=48, seed=2)
    noise = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")  # ~49 KB, a valid image
    storage.write_bytes(f"{prefix}/big.png", buf.getvalue())
    cfg = config(night["root"], "score.max_object_mb=0.01", "score.allow_outside_inputs=true")
    result = score(cfg, night["model"], prefix, f"{night['bucket']}/sized", date="2026-01-08")
    rows = rows_of(result.output)
    assert rows["big.png"]["error"].startswith("too large: over score.max_object_mb (0.01 MB)")
    assert [k for k, r in rows.items() if r["error"]] == ["big.png"]
    # A list gives no sizes: the read itself stops at the limit.
    synthesize(str(tmp_path / "imgs"), ["ring", "star"], per_class=1, size=48, seed=3)
    (tmp_path / "list.csv").write_text("uri\n/dev/zero\nimgs/ring/ring_00000.jpg\n")
    result = score(
        cfg, night["model"], str(tmp_path / "list.csv"), str(tmp_path / "out"), date="2026-01-08"
    )
    rows = rows_of(result.output)
    assert rows["/dev/zero"]["error"] == "too large: over score.max_object_mb (0.01 MB)"
    assert rows["imgs/ring/ring_00000.jpg"]["error"] is None


def _descendants() -> dict[int, str]:
    """pid -> command line of every process below this one (ours to stop)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = {}, [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                with open(f"/proc/{child}/cmdline", "rb") as f:
                    out[child] = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            todo.append(child)
    return out


class ActorKiller(threading.Thread):
    """SIGKILLs each scoring actor of this test's Ray as it appears, as an OOM killer
    would, at most ``limit`` times (so that on main, which restarts for ever, the
    night ends, succeeding, instead of hanging the test)."""

    def __init__(self, limit: int):
        super().__init__(daemon=True)
        self.limit, self.killed, self.done = limit, [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2) and len(self.killed) < self.limit:
            for pid, cmd in _descendants().items():
                if "MapWorker" in cmd and "BlockScorer" in cmd and pid not in self.killed:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)


def test_a_night_that_keeps_killing_its_actors_fails_with_a_clear_error(night):
    killer = ActorKiller(limit=8)
    cfg = config(night["root"], "score.max_actor_restarts=1", "score.num_actors=1")
    killer.start()
    try:
        with pytest.raises(
            JobFailed,  # the job failed (exit 1), not the input
            match=r"scoring actors kept dying \(restarted up to "
            r"score.max_actor_restarts=1 times",
        ):
            score(
                cfg,
                night["model"],
                f"{night['bucket']}/incoming",
                f"{night['bucket']}/killed",
                date="2026-01-09",
            )
    finally:
        killer.done.set()
        killer.join()
    assert 2 <= len(killer.killed) < 8
    assert storage.list_files(f"{night['bucket']}/killed/dt=2026-01-09") == []


# ------------------------------------------------------------ 3. one run per night


def _foreign_lock(part: str, age_minutes: float, host: str = "otherhost", pid: int = 4242) -> str:
    uri = f"{night_root(part)}/{LOCK_FILE}"
    beat = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=age_minutes)
    body = {
        "token": "other",
        "host": host,
        "pid": pid,
        "started": beat.isoformat(),
        "heartbeat": beat.isoformat(),
    }
    storage.write_bytes(uri, json.dumps(body).encode())
    return uri


def test_a_night_held_by_another_run_exits_75_naming_the_holder(night):
    """On main a second run of the same night shared (and discarded) its staging."""
    part = good_partition(night, "2026-01-10")
    before = state(part)
    _foreign_lock(part, age_minutes=1)
    proc = score_night(night, "2026-01-10")
    assert proc.returncode == 75, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("xfer: error: the night is held by otherhost pid 4242 since")
    assert "try again later" in last and "Traceback" not in proc.stderr
    assert state(part) == before


@pytest.mark.parametrize("where", ["s3", "local"])
def test_the_lock_admits_one_holder_and_takes_over_a_stale_one(night, tmp_path, where):
    part = f"{night['bucket']}/locks/dt=2026-01-11" if where == "s3" else str(tmp_path / "p")
    root = night_root(part)
    with NightLock(root, stale_seconds=60) as first:
        held = storage.read_json(f"{root}/{LOCK_FILE}")
        assert held["token"] == first.token and held["host"] == socket.gethostname()
        with pytest.raises(NightBusy, match=f"held by {socket.gethostname()} pid {os.getpid()}"):
            NightLock(root, stale_seconds=60).__enter__()
        first.check()
    assert not storage.exists(f"{root}/{LOCK_FILE}")
    _foreign_lock(part, age_minutes=5)
    with NightLock(root, stale_seconds=60) as taker:
        assert storage.read_json(f"{root}/{LOCK_FILE}")["token"] == taker.token
    # A fresh lock of a process of this host that is gone (killed, or its store went
    # away before it could remove the lock) is taken over at once.
    dead = subprocess.Popen(["true"])
    dead.wait()
    _foreign_lock(part, age_minutes=0, host=socket.gethostname(), pid=dead.pid)
    with NightLock(root, stale_seconds=60) as taker:
        assert storage.read_json(f"{root}/{LOCK_FILE}")["token"] == taker.token
    # A holder that was taken over finds out before committing.
    with NightLock(root, stale_seconds=60) as holder:
        _foreign_lock(part, age_minutes=0)
        with pytest.raises(NightBusy, match="lost the night's lock to another run"):
            holder.check()


def test_a_stale_lock_is_taken_over_and_the_night_commits(night, capsys):
    part = good_partition(night, "2026-01-12")
    _foreign_lock(part, age_minutes=30)
    result = score(
        config(night["root"]),
        night["model"],
        f"{night['bucket']}/incoming",
        f"{night['bucket']}/preds",
        date="2026-01-12",
    )
    assert "took over a stale lock: the night is held by otherhost pid 4242" in (
        capsys.readouterr().out
    )
    assert result.rows == GOOD_IMAGES and not storage.exists(f"{night_root(part)}/{LOCK_FILE}")


# ------------------------------------------------------------ 6. what a list may name


def test_list_labels_are_text_and_rows_outside_the_list_are_refused(night, tmp_path):
    (tmp_path / "a.csv").write_text("uri,label\nx/1.jpg,01\nx/2.jpg,NA\nx/3.jpg,\n")
    found = inputs.read_list(str(tmp_path / "a.csv"), labelled=True)
    assert [i.label for i in found] == ["01", "NA", None]  # on main: "1", None, None
    bucket = night["bucket"]
    for given in (
        "../secret.jpg",
        "sub/../../secret.jpg",
        "s3://other-bucket/x.jpg",
        f"{bucket}/elsewhere/x.jpg",
        "/etc/passwd",
    ):
        listing = f"{bucket}/lists/{uuid.uuid4().hex[:6]}.csv"
        storage.write_bytes(listing, f"uri\nok.jpg\n{given}\n".encode())
        with pytest.raises(
            DataError,
            match=rf"row 2: '{given}' is outside the list's folder "
            rf"{bucket}/lists/ \(set score.allow_outside_inputs=true",
        ):
            inputs.read_list(listing, labelled=False)
        allowed = inputs.read_list(listing, labelled=False, allow_outside=True)
        assert [i.key for i in allowed] == ["ok.jpg", given]
    inside = f"{bucket}/lists/in.csv"
    storage.write_bytes(inside, f"uri\n./a/b.jpg\nsub/../c.jpg\n{bucket}/lists/d.jpg\n".encode())
    assert len(inputs.read_list(inside, labelled=False)) == 3
    # Both jobs refuse: scoring at listing, before any work, and sharding.
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "s.csv").write_text("uri,label\n../a.csv,x\n")
    with pytest.raises(DataError, match=r"set score\.allow_outside_inputs=true"):
        score(
            config(night["root"]),
            night["model"],
            str(tmp_path / "lists" / "s.csv"),
            str(tmp_path / "out"),
            date="2026-01-13",
        )
    from xfer.config import ShardConfig
    from xfer.data.shard import shard_dataset

    with pytest.raises(DataError, match=r"set shard\.allow_outside_inputs=true"):
        shard_dataset(str(tmp_path / "lists" / "s.csv"), str(tmp_path / "ds"), ShardConfig())


def test_a_resumed_night_is_pinned_to_its_dataset(root):
    """On main a night staged from a dataset resumed on a re-sharded one: blocks
    planned from the old manifest read the new shards."""
    from xfer.data.manifest import Manifest, ShardInfo, SplitInfo
    from xfer.scoring.scoreplan import plan_night

    dataset = f"{root}/datasets/tiny"

    def write_dataset(rows: int) -> None:
        shard = ShardInfo("v-0/test/part-00000.parquet", rows, 1, "x", [2] * (rows // 2))
        split = SplitInfo(rows=rows, shards=[shard], class_counts={"a": rows})
        m = Manifest("tiny", ["a", "b"], {"test": split}, {}, {}, {}, uri=dataset)
        storage.write_bytes(f"{dataset}/manifest.json", m.to_json())

    final = f"{root}/preds/dt=2026-01-05"
    write_dataset(4)
    assert plan_night({"run_id": "r"}, dataset, "test", final, 2, False)[1] is False
    assert plan_night({"run_id": "r"}, dataset, "test", final, 2, False)[1] is True
    write_dataset(6)  # re-sharded meanwhile
    night, resumed = plan_night({"run_id": "r"}, dataset, "test", final, 2, False)
    assert not resumed and night.blocks == 3
