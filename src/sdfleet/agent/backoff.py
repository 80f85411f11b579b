"""When a failed attempt whose input may come back is tried again: the one rule the prepare stage
(the agent's own input fetch) and the finish stage (an input a runtime fetched itself) share."""

from __future__ import annotations

INPUT_RETRY_FIRST_S = 1.0
INPUT_RETRY_MAX_S = 30.0
RETRY_AFTER_MAX_S = 600.0
"""Most of a server's ``Retry-After`` the agent honours: a message is not hidden for hours."""


def input_retry_delay(receive_count: int, retry_delay_s: float, retry_after_s: float | None = None) -> float:
    """How long an input that may come back waits before its next try: 1, 2, 4 … s (at most 30),
    or longer where ``agent.retry_delay_s`` or the server's ``Retry-After`` (at most 10 minutes)
    says so. A server that said "not now" is not asked again within milliseconds."""
    backoff = min(INPUT_RETRY_FIRST_S * 2.0 ** max(0, receive_count - 1), INPUT_RETRY_MAX_S)
    return max(backoff, retry_delay_s, min(retry_after_s or 0.0, RETRY_AFTER_MAX_S))
