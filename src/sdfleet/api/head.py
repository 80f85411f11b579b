"""``HEAD`` on every ``GET`` route: RFC 9110 §9.3.2 asks it of every general-purpose server, and
``curl -I``, link checkers and some load balancers send it (FastAPI's routes answer it with 405).

The request is routed as the ``GET`` it mirrors, so its status and headers (``Content-Length``,
``Content-Type``, ``Cache-Control``) are the ``GET``'s; uvicorn, which still sees ``HEAD``, writes no
body. A streamed answer (the task events) ends after its first chunk instead of streaming on to a
client that reads no body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _HeadDone(Exception):
    """The headers of a streamed answer went out: the rest of the stream is not wanted."""


class HeadAsGet:
    """ASGI middleware: route ``HEAD`` as ``GET``; end a streamed answer once its headers are out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_head(message: Message) -> None:
            if message["type"] == "http.response.body" and message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                raise _HeadDone
            await send(message)

        try:
            await self.app({**scope, "method": "GET"}, receive, send_head)
        except _HeadDone:
            pass
