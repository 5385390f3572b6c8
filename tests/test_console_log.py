"""The log file is private: its own 0700 folder, 0600 file, never through a link."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

SHOW_LOG = "from xfer import console; print(console.log_path())"


def _log_path(tmp_path: os.PathLike[str]) -> str:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("XFER_LOG_FILE", None)
    out = subprocess.run(
        [sys.executable, "-c", SHOW_LOG], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_the_log_folder_and_file_are_private(tmp_path):
    path = _log_path(tmp_path)
    folder = os.path.dirname(path)
    assert folder == os.path.join(str(tmp_path), f"xfer-logs-{os.getuid()}")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_planted_link_or_open_folder_is_not_used(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, tmp_path / f"xfer-logs-{os.getuid()}")
    path = _log_path(tmp_path)
    assert not os.listdir(elsewhere), "the log went through the planted link"
    assert not os.path.islink(os.path.dirname(path))
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700

    os.unlink(tmp_path / f"xfer-logs-{os.getuid()}")
    (tmp_path / f"xfer-logs-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"xfer-logs-{os.getuid()}", 0o777)
    path = _log_path(tmp_path)
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
