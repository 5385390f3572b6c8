"""Every shipped config is a test case: each file in jobs/configs/ loads, validates, and
sets only keys that the commands it is for read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from xfer.config import load_config
from xfer.configreads import unread_settings

CONFIGS = sorted((Path(__file__).parent.parent / "jobs" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS, "jobs/configs/ holds no configs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path):
    cfg = load_config(str(path))
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path.name} should open with a comment giving its command"
    assert cfg.output.model_name


def _commands(path: Path) -> set[str]:
    """The commands a config's opening comment runs it with (`xfer train`, `jobs/shard.py`)."""
    header = path.read_text().split("\n\n", 1)[0]
    header = "\n".join(line for line in header.splitlines() if line.startswith("#"))
    return set(re.findall(r"(?:xfer |jobs/)(train|score|shard)\b", header))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_sets_only_keys_its_commands_read(path: Path):
    """A key no command of the config reads misleads (output.model_name in a scoring
    config once looked as if it chose the model): each is named by the command."""
    commands = _commands(path)
    assert commands, f"{path.name}: its opening comment names no xfer command"
    cfg = load_config(str(path))
    unread = [set(unread_settings(cfg, c)) for c in sorted(commands)]
    # Keys unread by every command of the config (a line names one section's keys).
    keys = [set(re.findall(r"[a-z_]+\.[a-z_.]+", " ".join(u))) for u in unread]
    assert not set.intersection(*keys), f"{path.name}: read by none of {sorted(commands)}: {unread}"


def test_the_packaged_local_config_is_the_shipped_one():
    """`xfer demo` from a wheel reads src/xfer/configs/local.yaml: a copy of jobs/configs/'s."""
    packaged = Path(__file__).parent.parent / "src" / "xfer" / "configs" / "local.yaml"
    shipped = Path(__file__).parent.parent / "jobs" / "configs" / "local.yaml"
    assert packaged.read_text() == shipped.read_text(), (
        "src/xfer/configs/local.yaml differs from jobs/configs/local.yaml: copy one onto the other"
    )
