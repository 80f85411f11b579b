"""The server runtimes' start: their URL checked, and the wait for their server said while it lasts."""

from __future__ import annotations

import logging

import pytest

from sdfleet.errors import ConfigError, ModelLoadError, RuntimeFailure
from sdfleet.runtimes import _server_start
from sdfleet.runtimes._server_start import server_url, wait_for_server


def test_a_url_no_http_client_can_call_is_refused_at_once() -> None:
    assert server_url({"url": "http://sd:7860/"}, "http://127.0.0.1:7860", "SD WebUI") == "http://sd:7860"
    assert server_url({}, "http://127.0.0.1:8188", "ComfyUI") == "http://127.0.0.1:8188"
    for bad in ("ftp://sd:7860", "sd:7860", "http://", "127.0.0.1:7860"):
        with pytest.raises(ConfigError, match=f"SD WebUI URL '{bad}': use http://host:port"):
            server_url({"url": bad}, "http://127.0.0.1:7860", "SD WebUI")


async def test_the_wait_is_said_while_it_lasts_and_when_it_ends(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger=_server_start.__name__)
    monkeypatch.setattr(_server_start, "SAY_EVERY_S", 0.0)  # every failed try, here
    tries = []

    async def probe() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise RuntimeFailure("refused")
        return "up"

    assert await wait_for_server("SD WebUI", "http://sd:7860", probe, 60) == "up"
    said = caplog.messages
    assert len(said) == 3 and said[-1].startswith("SD WebUI at http://sd:7860 answers after "), said
    assert all(
        m.startswith("waiting for SD WebUI at http://sd:7860 (") and m.endswith("): refused")
        for m in said[:2]
    )


async def test_a_server_that_never_answers_fails_the_start() -> None:
    async def probe() -> None:
        raise RuntimeFailure("refused")

    with pytest.raises(ModelLoadError, match=r"^ComfyUI not ready after 0.3s: refused$"):
        await wait_for_server("ComfyUI", "http://c:8188", probe, 0.3)
