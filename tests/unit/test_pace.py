"""The receiver's bound: prefetch, at most what the runtime starts within the horizon."""

from __future__ import annotations

import pytest

from sdfleet.agent.pace import Pace, ahead_limit


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_call_counts_from_its_hand_over_when_the_runtime_was_idle() -> None:
    clock = Clock()
    pace = Pace(alpha=0.5, now=clock)
    assert pace.estimate() is None
    pace.started(1)
    clock.t = 4.0
    assert pace.estimate() is None  # nothing ended yet: the limit stays at one call's worth
    pace.ended()
    assert pace.estimate() == 4.0
    clock.t = 10.0  # idle time between calls is not the runtime's
    pace.started(2)
    clock.t = 12.0
    pace.ended()
    assert pace.per_task_s == pytest.approx(0.5 * 4.0 + 0.5 * 1.0)


def test_a_queued_call_counts_from_the_end_of_the_one_before() -> None:
    """A server runtime holds the next job while one runs: two calls in flight, ending 2 s apart,
    are 2 s each, not 2 and 4."""
    clock = Clock()
    pace = Pace(alpha=1.0, now=clock)
    pace.started(1)
    pace.started(1)
    clock.t = 2.0
    pace.ended()
    assert pace.per_task_s == 2.0
    clock.t = 4.0
    pace.ended()
    assert pace.per_task_s == 2.0


def test_a_call_running_longer_than_usual_raises_the_estimate_while_it_runs() -> None:
    clock = Clock()
    pace = Pace(alpha=1.0, now=clock)
    pace.started(1)
    clock.t = 1.0
    pace.ended()
    pace.started(1)
    clock.t = 31.0
    assert pace.estimate() == 30.0
    assert ahead_limit(4, 1, 30.0, pace.estimate()) == 1


@pytest.mark.parametrize(
    ("prefetch", "floor", "horizon_s", "per_task_s", "limit"),
    [
        (4, 1, None, 50.0, 4),  # no horizon: prefetch
        (4, 1, 30.0, None, 1),  # speed unknown: one call's worth
        (4, 1, 30.0, 0.2, 4),  # short tasks: prefetch
        (4, 1, 30.0, 10.0, 3),
        (4, 1, 30.0, 50.0, 1),  # long tasks: never fewer than one call's worth
        (8, 4, 30.0, 20.0, 4),  # a batching runtime: a full batch at least
        (2, 4, 30.0, 0.1, 2),  # never more than prefetch
        (4, 1, 30.0, 0.0, 4),
    ],
)
def test_ahead_limit(
    prefetch: int, floor: int, horizon_s: float | None, per_task_s: float | None, limit: int
) -> None:
    assert ahead_limit(prefetch, floor, horizon_s, per_task_s) == limit


def test_a_job_queued_at_a_server_runtime_counts_as_held_ahead() -> None:
    assert ahead_limit(4, 1, 30.0, 10.0, queued=1) == 2
    assert ahead_limit(4, 1, 30.0, 20.0, queued=1) == 1
    assert ahead_limit(4, 1, 30.0, 1.0, queued=1) == 4
