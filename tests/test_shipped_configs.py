"""Every shipped config is a test case: each file in jobs/configs/ loads and validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from xfer.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "jobs" / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert CONFIGS, "jobs/configs/ holds no configs"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path):
    cfg = load_config(str(path))
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#"), f"{path.name} should open with a comment giving its command"
    assert cfg.output.model_name
