"""`xfer demo --quick`: the README's first command, end to end, in a subprocess (slow)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from .conftest import run_xfer

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_and_leaves_nothing_running(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_ADDRESS"))}
    proc = run_xfer("demo", "--quick", "--workdir", str(tmp_path / "demo"), env=env, timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "xfer demo finished" in out
    for step in range(1, 8):
        assert f"=== [{step}/7]" in out
    pretrained = re.search(r"pretrained frozen base\s+([\d.]+)%", out)
    random_base = re.search(r"random frozen base\s+([\d.]+)%", out)
    assert pretrained and random_base, out[-3000:]
    assert (tmp_path / "demo" / "report.html").exists()
    assert re.search(r"nightly\s+s3://xfer/predictions/shapes/dt=\d{4}-\d{2}-\d{2}/", out)
    # Quiet: xfer's own lines only, ending with the summary; the rest is in the log file.
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) <= 60, "\n".join(lines)
    internals = re.compile(
        r"pid=\d+|^[IWE]\d{4} |tensorflow|TrainingReport|Checkpoint successfully|absl|"
        r"oneDNN|streaming_executor|core_worker|Traceback"
    )
    assert not [line for line in lines if internals.search(line)], out
    assert lines[-1] == "=" * 72
    log = re.search(r"full log\s+(\S+)", out)
    assert log, out[-2000:]
    kept = Path(log.group(1)).read_text()
    assert "RayTrainWorker pid=" in kept and "TrainingReport" in kept
    # Nothing left running: no weed process for this data dir, no Ray of its own.
    leftovers = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        if str(tmp_path / "demo") in cmd:
            leftovers.append(cmd)
    assert not leftovers, leftovers
