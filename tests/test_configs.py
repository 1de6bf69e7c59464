"""The shipped recipes in configs/ load through the one schema, and default.yaml is the default."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.config import RunConfig, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def test_configs_are_shipped() -> None:
    assert CONFIG_FILES, f"no *.yaml under {CONFIGS}"
    assert CONFIGS / "default.yaml" in CONFIG_FILES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_config_loads(path: Path) -> None:
    config = load_config(path)
    assert isinstance(config, RunConfig)
    header = path.read_text().splitlines()[0]
    assert header.startswith("#"), f"{path.name} should start with a comment saying what it is"
    assert "--config configs/" in path.read_text(), f"{path.name} should say how to run it"


def test_default_config_is_the_schema_default() -> None:
    # Nothing is excluded: every key, including the run name and output directory, must match.
    assert load_config(CONFIGS / "default.yaml").model_dump() == RunConfig().model_dump()
