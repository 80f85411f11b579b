"""The process's log handler: it writes to the ``sys.stderr`` of the moment (a caller that swapped
it for a while and closed its own, as click's test runner does, leaves later records working), one
JSON object a line."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from sdfleet.telemetry import JsonFormatter, setup_logging


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


def test_a_json_line_keeps_extras_but_not_uvicorns_coloured_copy_of_the_message() -> None:
    # as uvicorn logs "Uvicorn running on ...": the message again, with ANSI escapes, as an extra
    record = logging.makeLogRecord(
        {
            "name": "uvicorn.error",
            "msg": "Uvicorn running on %s",
            "args": ("http://127.0.0.1:8080",),
            "color_message": "Uvicorn running on \x1b[1m%s\x1b[0m",
            "task_id": "t1",
        }
    )
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "Uvicorn running on http://127.0.0.1:8080"
    assert line["task_id"] == "t1" and "color_message" not in line


def test_diffusers_and_transformers_errors_are_json_lines_once(
    own_root: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both libraries log through a stderr handler of their own and do not propagate: an error of
    theirs was a plain-text line among an agent's JSON ones."""
    from sdfleet.runtimes._diffusers_pipes import quiet_libraries

    setup_logging("INFO", json_logs=True)
    quiet_libraries()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.get_logger("diffusers.pipelines.x").error("diffusers broke")
    transformers_logging.get_logger("transformers.models.x").error("transformers broke")
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["msg"] for line in lines] == ["diffusers broke", "transformers broke"], lines
