"""The process's log handler writes to the ``sys.stderr`` of the moment: a caller that swapped it
for a while and closed its own (click's test runner does) leaves later records working."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from sdfleet.telemetry import setup_logging


@pytest.fixture
def own_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def test_records_follow_stderr_when_it_is_swapped_and_closed(
    own_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging()
    real = sys.stderr
    swapped = io.StringIO()
    sys.stderr = swapped
    try:
        logging.getLogger("sdfleet.x").warning("during")
        during = swapped.getvalue()
    finally:
        swapped.close()
        sys.stderr = real
    logging.getLogger("sdfleet.x").warning("after")
    assert json.loads(during)["msg"] == "during"
    err = capsys.readouterr().err
    assert "Logging error" not in err and json.loads(err.splitlines()[-1])["msg"] == "after", err
