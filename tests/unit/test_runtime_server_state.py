"""runtime serve's ``shared.state`` and options, where a sweep against SD WebUI 1.10.1 (run here)
found them apart: the batch label of an ``n_iter`` job, ``skipped`` kept past its iteration, and a
``GET /options`` that failed (500, plain text) after a client set the clip skip to null."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdfleet.runtime_server.errors import SdApiError
from sdfleet.runtime_server.options import CLIP_SKIP, Options
from sdfleet.runtime_server.state import JobState


def test_an_n_iter_job_is_labelled_by_batch_and_a_skip_ends_with_its_batch() -> None:
    state = JobState()
    state.begin("scripts_txt2img", 2, 10)
    assert state.job == "Batch 1 out of 2"
    state.skipped = True  # POST /skip during the first batch
    state.advance(0.3)
    assert (state.job, state.skipped) == ("Batch 1 out of 2", True)
    state.advance(0.6)
    assert (state.job, state.job_no, state.skipped) == ("Batch 2 out of 2", 1, False)
    state.skipped = True
    state.end(2)
    assert (state.job, state.skipped) == ("", False)
    state.begin("scripts_txt2img", 1, 10)
    assert state.job == "scripts_txt2img"  # one batch: the job's name, as SD WebUI shows it


def test_a_null_clip_skip_is_listed_as_posted_and_refused_by_a_job() -> None:
    options = Options()
    options.update({CLIP_SKIP: None})
    assert options.listing(None, None)[CLIP_SKIP] is None
    with pytest.raises(SdApiError, match="whole number"):
        options.clip_skip()
    options.update({CLIP_SKIP: 2})
    assert options.listing(None, None)[CLIP_SKIP] == 2.0 and options.clip_skip() == 2


async def test_an_empty_models_folder_is_said_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``runtime serve`` starts with no checkpoint, as SD WebUI does, and says where it looked
    (a folder that does not exist, as such) and how to get a model."""
    from sdfleet.models.catalog import ModelCatalog
    from sdfleet.runtime_server.checkpoints import Checkpoints
    from sdfleet.runtime_server.state import ServerState
    from sdfleet.runtimes.synthetic import SyntheticRuntime

    caplog.set_level(logging.WARNING, logger="sdfleet.runtime_server.state")
    missing = tmp_path / "nowhere"
    state = ServerState(SyntheticRuntime(), Checkpoints(ModelCatalog(missing)))
    await state.start(None)
    assert state.loaded() == (None, None)
    assert caplog.messages == [
        f"no model in {missing} (the folder does not exist): the server starts with no checkpoint "
        "(`sdfleet models make-tiny NAME`, `sdfleet models pull`, or models.s3)"
    ]
