"""The SDK against a server that is not the API: what a proxy or another program on the port answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from sdfleet.client import UNREACHABLE, AsyncClient
from sdfleet.errors import SdfleetError

PAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>"


class _Proxy(BaseHTTPRequestHandler):
    """``/v1/tasks/restarting``: a gateway's HTML 502 twice (the API behind it restarting), then
    the task; anything else: an HTML 404, as a web server that is not the API answers."""

    gateway_pages = 2

    def do_GET(self) -> None:
        if self.path == "/v1/tasks/restarting" and _Proxy.gateway_pages:
            _Proxy.gateway_pages -= 1
            self._send(502, "text/html", PAGE)
        elif self.path == "/v1/tasks/restarting":
            self._send(200, "application/json", b'{"id": "restarting", "state": "succeeded"}')
        else:
            self._send(404, "text/html", b"<html>Not Found</html>")

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def proxy() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


async def test_an_answer_that_is_not_json_is_said_as_what_it_is(proxy: str) -> None:
    async with AsyncClient(proxy) as client:
        with pytest.raises(SdfleetError) as raised:
            await client.get("nosuch")
    assert raised.value.code == "not_json"
    assert str(raised.value) == (
        f"GET {proxy}/v1/tasks/nosuch answered HTTP 404 (text/html), not the API's JSON: "
        "another server on that address, or a proxy's error page"
    )


async def test_a_gateways_error_page_is_waited_out_like_an_api_not_reached(proxy: str) -> None:
    _Proxy.gateway_pages = 2
    async with AsyncClient(proxy) as client:
        with pytest.raises(SdfleetError) as raised:
            await client.get("restarting")
        assert raised.value.code == UNREACHABLE
        assert "answered HTTP 502 (text/html)" in str(raised.value)
        view = await client.poll("restarting")  # the second page, then the task
    assert view == {"id": "restarting", "state": "succeeded"}
    assert _Proxy.gateway_pages == 0
