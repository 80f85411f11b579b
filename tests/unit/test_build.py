"""What ``build`` tells an operator while it assembles a worker."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdfleet.build import make_runtime
from sdfleet.models.tiny import make_tiny
from sdfleet.settings import FleetConfig, ModelsConfig, QueueConfig, Settings


def _settings(models: Path) -> Settings:
    fleet = FleetConfig(queues=[QueueConfig(name="q")], models=ModelsConfig(dir=models))
    return Settings(fleet=fleet)


def test_an_empty_models_folder_is_said_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="sdfleet.build")
    make_runtime(_settings(tmp_path / "models"), "q")
    [said] = [r.getMessage() for r in caplog.records if "holds no model" in r.getMessage()]
    assert "queue q" in said and "make-tiny" in said
    caplog.clear()
    make_tiny(tmp_path / "models", "tiny")
    make_runtime(_settings(tmp_path / "models"), "q")
    make_runtime(_settings(tmp_path / "empty"), "q", runtime="synthetic")  # needs no model files
    assert not [r for r in caplog.records if "holds no model" in r.getMessage()]
