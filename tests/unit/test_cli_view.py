"""``sdfleet status`` for a person: a queued task that waits for its retry says why, without
reading as failed."""

from __future__ import annotations

from typing import Any

from sdfleet.cli_common import console
from sdfleet.cli_tasks import _print_view


def _shown(view: dict[str, Any]) -> str:
    with console.capture() as out:
        _print_view(view)
    return out.get()


def _view(state: str, error: dict[str, str] | None) -> dict[str, Any]:
    return {"id": "t-1", "state": state, "progress": 0.0, "queue": "q", "model": None, "error": error}


def test_a_failed_attempt_is_not_shown_as_the_tasks_end() -> None:
    error = {"code": "input_fetch_failed", "message": "fetching https://cdn.example/a.png failed: HTTP 503"}
    waiting = _shown(_view("queued", error))
    assert "t-1: queued · queue q" in waiting
    assert (
        "last try failed: input_fetch_failed: fetching https://cdn.example/a.png failed: HTTP 503" in waiting
    )
    assert "(it is tried again)" in waiting and "error:" not in waiting
    failed = _shown(_view("failed", {**error, "message": error["message"] + " (after 3 attempts)"}))
    assert "  error: input_fetch_failed: " in failed and "tried again" not in failed
    assert "error" not in _shown(_view("succeeded", None))


def test_a_task_run_again_says_which_run() -> None:
    assert "t-1: queued · queue q · run 2" in _shown({**_view("queued", None), "run": 2})
    assert "run" not in _shown({**_view("succeeded", None), "run": 1})


def test_a_task_kept_for_a_while_says_until_when() -> None:
    kept = {**_view("succeeded", None), "expires_at": 1796515200.0}
    assert "  kept until 2026-12-06 00:00:00 UTC" in _shown(kept)
    assert "kept until" not in _shown({**_view("succeeded", None), "expires_at": None})


def test_a_task_with_a_priority_says_it() -> None:
    shown = _shown({**_view("queued", None), "model": "m", "priority": 7, "run": 2})
    assert "t-1: queued · queue q · model m · priority 7 · run 2" in shown
    assert "priority" not in _shown({**_view("queued", None), "priority": 0})


def test_a_queued_task_with_a_ttl_says_by_when_it_must_start() -> None:
    waiting = {**_view("queued", None), "created_at": 1796515200.0, "ttl_s": 90.0}
    assert "  starts by 2026-12-06 00:01:30 UTC or fails unrun (ttl_s)" in _shown(waiting)
    assert "starts by" not in _shown({**waiting, "state": "running"})
    assert "starts by" not in _shown({**waiting, "ttl_s": None})
    assert "starts by" not in _shown({**waiting, "run": 2})  # counted from that run's own submit
