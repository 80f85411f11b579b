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
    assert said == (
        f"queue q: the models folder {tmp_path / 'models'} (the folder does not exist) holds no model; "
        "its tasks will fail until one is there "
        "(`sdfleet models make-tiny NAME`, `sdfleet models pull`, or models.s3)"
    )
    caplog.clear()
    make_tiny(tmp_path / "models", "tiny")
    make_runtime(_settings(tmp_path / "models"), "q")
    make_runtime(_settings(tmp_path / "empty"), "q", runtime="synthetic")  # needs no model files
    assert not [r for r in caplog.records if "holds no model" in r.getMessage()]


def test_an_unreadable_default_model_is_said_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first model by name is every unnamed task's: a checkpoint cut short in copying failed
    each such task three times (``model_load_error``) with nothing said at start."""
    caplog.set_level(logging.WARNING, logger="sdfleet.build")
    models = tmp_path / "models"
    make_tiny(models, "zz-good")
    (models / "aa-cut-short.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    make_runtime(_settings(models), "q")
    [said] = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]
    assert said.startswith(
        f"queue q: its default model {models / 'aa-cut-short.safetensors'} cannot be read ("
    )
    assert said.endswith("); tasks that name no model will fail until it is replaced")
    caplog.clear()
    settings = _settings(models)
    settings.fleet.models.default = "zz-good"  # a readable default; the broken file is not used
    make_runtime(settings, "q")
    settings.fleet.models.default = "not-here-yet.safetensors"  # fetched by its first task
    make_runtime(settings, "q")
    assert not [r for r in caplog.records if "cannot be read" in r.getMessage()]


def test_the_diffusers_generation_bound_follows_the_apis_unless_set(tmp_path: Path) -> None:
    """What the API admits (``api.max_width`` × ``api.max_height``) must run on the diffusers
    runtime, so its bound defaults to the API's from the one fleet file; a value set wins."""
    from sdfleet.runtimes.diffusers import DiffusersRuntime

    make_tiny(tmp_path / "models", "tiny")
    settings = _settings(tmp_path / "models")
    settings.fleet.runtimes["diffusers"] = {"device": "cpu"}
    runtime = make_runtime(settings, "q")
    assert isinstance(runtime, DiffusersRuntime)
    assert runtime.options.generate_max_pixels == 2048 * 2048
    settings.api.max_width, settings.api.max_height = 4096, 3072
    runtime = make_runtime(settings, "q")
    assert isinstance(runtime, DiffusersRuntime) and runtime.options.generate_max_pixels == 4096 * 3072
    settings.fleet.runtimes["diffusers"]["generate_max_pixels"] = 512 * 512
    runtime = make_runtime(settings, "q")
    assert isinstance(runtime, DiffusersRuntime) and runtime.options.generate_max_pixels == 512 * 512
    assert settings.fleet.runtimes["diffusers"] == {"device": "cpu", "generate_max_pixels": 512 * 512}
