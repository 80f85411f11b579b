"""The SSRF guard's decisions (no traffic at all) and the fetcher against a real HTTP server on
127.0.0.1. Nothing here sends a packet anywhere else: hostnames go through a fake ``resolve``,
and the one test that needs a "public" first hop uses a transport that connects to 127.0.0.1."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from fakes.servers import free_port
from sdfleet.errors import InputFetchError, InputUnavailable, UrlRefused
from sdfleet.guarded_http import InputFetcher, check_url, resolve_host, retry_after_s

PUBLIC = "93.184.216.34"
NAMES = {
    "public.test": [PUBLIC],
    "images.test": [PUBLIC],
    "cdn.test": ["2606:2800:220:1:248:1893:25c8:1946"],
    "internal.test": ["10.1.2.3"],
    "metadata.test": ["169.254.169.254"],
    "mixed.test": [PUBLIC, "127.0.0.1"],
    "v6local.test": ["::1"],
}


def fake_resolve(host: str) -> list[str]:
    """Stands in for DNS; a name it does not know is a test bug, never a lookup."""
    if host not in NAMES:
        raise AssertionError(f"unexpected resolution of {host!r}")
    return NAMES[host]


def png(size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


REFUSED = [
    ("http://127.0.0.1/", "loopback"),
    ("http://127.8.9.10:8080/x", "loopback"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.5.4/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://169.254.169.254/latest/meta-data/", "metadata"),
    ("http://169.254.1.1/", "link-local"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://100.127.255.254/", "CGNAT"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "address"),
    ("http://255.255.255.255/", "address"),
    ("http://192.0.2.1/", "address"),
    ("http://[::1]/", "loopback"),
    ("http://[::]/", "unspecified"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fc00::1]/", "private"),
    ("http://[fd00:ec2::254]/", "private"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://[::ffff:169.254.169.254]/", "metadata"),
    ("http://[::ffff:10.0.0.1]/", "private"),
    ("http://[::ffff:100.64.0.1]/", "CGNAT"),
    ("http://[2002:7f00:1::]/", "loopback"),
    ("http://[64:ff9b::a9fe:a9fe]/", "metadata"),
    ("http://2130706433/", "non-canonical"),
    ("http://0x7f.1/", "non-canonical"),
    ("http://0x7f000001/", "non-canonical"),
    ("http://017700000001/", "non-canonical"),
    ("http://0177.0.0.1/", "malformed|non-canonical"),
    ("http://127.1/", "non-canonical"),
    ("http://1572395042/", "non-canonical"),
    ("http://localhost/", "loopback name"),
    ("http://LOCALHOST./", "loopback name"),
    ("http://api.localhost:8080/", "loopback name"),
    ("http://internal.test/", "private"),
    ("http://metadata.test/", "metadata"),
    ("http://mixed.test/", "loopback"),
    ("http://v6local.test/", "loopback"),
    (f"http://user:pw@{PUBLIC}/", "credentials"),
    (f"http://{PUBLIC}@127.0.0.1/", "credentials"),
    (f"http://{PUBLIC}\\@127.0.0.1/", "backslash"),
    (f"ftp://{PUBLIC}/a.png", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://public.test:70/_x", "scheme"),
    ("//public.test/a.png", "scheme"),
    ("http:///a.png", "no host"),
    ("http://xn--zz.com/a.png", "malformed host"),  # an invalid IDNA label: httpx raises on .host
    ("http://xn--/", "malformed host"),
]

ALLOWED = [
    f"http://{PUBLIC}/",
    f"https://{PUBLIC}:8443/img.png?x=1",
    "http://8.8.8.8:65535/",
    "http://[2606:2800:220:1:248:1893:25c8:1946]/",
    f"http://[::ffff:{PUBLIC}]/",
    "http://public.test/a.png",
    "https://cdn.test/a.png",
]


@pytest.mark.parametrize(("url", "reason"), REFUSED, ids=[u for u, _ in REFUSED])
def test_guard_refuses(url: str, reason: str) -> None:
    with pytest.raises(UrlRefused, match=reason):
        check_url(url, allow_private=False, resolve=fake_resolve)


@pytest.mark.parametrize("url", ALLOWED)
def test_guard_allows_public(url: str) -> None:
    assert check_url(url, allow_private=False, resolve=fake_resolve) is None


def test_allow_private_skips_address_checks_only() -> None:
    def no_dns(host: str) -> list[str]:
        raise AssertionError("allow_private must not resolve")

    for url in ("http://127.0.0.1:8080/", "http://169.254.169.254/", "http://localhost/", "http://[::1]/"):
        assert check_url(url, allow_private=True, resolve=no_dns) is None
    for url, reason in (("ftp://127.0.0.1/", "scheme"), ("http://u@127.0.0.1/", "credentials")):
        with pytest.raises(UrlRefused, match=reason):
            check_url(url, allow_private=True, resolve=no_dns)


class Handler(BaseHTTPRequestHandler):
    image = png()
    release = threading.Event()

    def log_message(self, format: str, *args: object) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}) and status != 599:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path
        if path == "/img.png":
            self._send(200, self.image, {"Content-Type": "image/png"})
        elif path == "/big-declared":
            self._send(200, self.image, {"Content-Length": "10000000"})
        elif path == "/big-streamed":
            self.send_response(200)
            self.end_headers()  # HTTP/1.0 without Content-Length: the body runs until close
            self.wfile.write(self.image * 200)
        elif path == "/slow":
            self.release.wait(5)
            self._send(200, self.image)
        elif path == "/text":
            self._send(200, b"hello, not an image", {"Content-Type": "text/plain"})
        elif path.startswith(("/hops/", "/status/")):
            self._numbered(path)
        elif path == "/to-metadata":
            self._send(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})
        elif path == "/to-loopback":
            self._send(301, headers={"Location": f"http://127.0.0.1:{self.server.server_port}/img.png"})
        elif path == "/to-cdn":
            self._send(307, headers={"Location": f"http://cdn.test:{self.server.server_port}/img.png"})
        else:
            self._send(404, b"no")

    def _numbered(self, path: str) -> None:
        what, n = path.strip("/").split("/")
        if what == "status":
            self._send(int(n), b"not now", {"Retry-After": "7"} if n == "429" else None)
        else:
            hops = int(n)
            self._send(302, headers={"Location": f"/hops/{hops - 1}" if hops > 1 else "/img.png"})


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}"
    Handler.release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
async def fetcher() -> AsyncIterator[InputFetcher]:
    async with InputFetcher(max_bytes=4096, timeout_s=2.0, allow_private=True) as f:
        yield f


async def test_fetch_image(server: str, fetcher: InputFetcher) -> None:
    assert await fetcher.fetch(f"{server}/img.png") == Handler.image


async def test_fetch_follows_three_redirects_not_four(server: str, fetcher: InputFetcher) -> None:
    assert await fetcher.fetch(f"{server}/hops/3") == Handler.image
    with pytest.raises(InputFetchError, match="more than 3 times"):
        await fetcher.fetch(f"{server}/hops/4")


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/big-declared", "more than the 4096"),
        ("/big-streamed", "larger than the 4096"),
        ("/text", "not a readable image"),
        ("/missing", "HTTP 404"),
    ],
)
async def test_fetch_refuses(server: str, fetcher: InputFetcher, path: str, reason: str) -> None:
    """A lasting refusal: the agent fails the task at once, it does not retry it."""
    with pytest.raises(InputFetchError, match=reason) as caught:
        await fetcher.fetch(server + path)
    assert not isinstance(caught.value, InputUnavailable)


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_fetch_unavailable_for_now(server: str, fetcher: InputFetcher, status: int) -> None:
    """Answers that say "not now": the agent retries the task (``InputUnavailable``)."""
    with pytest.raises(InputUnavailable, match=f"HTTP {status}") as caught:
        await fetcher.fetch(f"{server}/status/{status}")
    assert caught.value.retry_after_s == (7.0 if status == 429 else None)  # its Retry-After


@pytest.mark.parametrize("status", [400, 401, 403, 410])
async def test_fetch_refused_for_good(server: str, fetcher: InputFetcher, status: int) -> None:
    with pytest.raises(InputFetchError, match=f"HTTP {status}") as caught:
        await fetcher.fetch(f"{server}/status/{status}")
    assert not isinstance(caught.value, InputUnavailable)


async def test_fetch_from_a_server_that_is_down_is_unavailable(fetcher: InputFetcher) -> None:
    with pytest.raises(InputUnavailable, match="ConnectError"):
        await fetcher.fetch(f"http://127.0.0.1:{free_port()}/img.png")


@pytest.mark.parametrize(("errno", "retried"), [(socket.EAI_NONAME, False), (socket.EAI_AGAIN, True)])
def test_a_name_that_does_not_resolve(monkeypatch: pytest.MonkeyPatch, errno: int, retried: bool) -> None:
    """An unknown name is refused for good; a resolver that cannot answer now ("try again") is
    retried. The resolver is faked: no query leaves this machine."""

    def getaddrinfo(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(errno, "fake resolver")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(InputFetchError, match="cannot resolve") as caught:
        resolve_host("images.example")
    assert isinstance(caught.value, InputUnavailable) is retried


async def test_fetch_times_out(server: str) -> None:
    async with InputFetcher(max_bytes=4096, timeout_s=0.3, allow_private=True) as f:
        t0 = time.monotonic()
        with pytest.raises(InputUnavailable, match=r"longer than 0\.3s"):
            await f.fetch(f"{server}/slow")
        assert time.monotonic() - t0 < 2


async def test_fetch_inline_images(fetcher: InputFetcher) -> None:
    b64 = base64.b64encode(Handler.image).decode()
    assert await fetcher.fetch(f"data:image/png;base64,{b64}") == Handler.image
    assert await fetcher.fetch(b64) == Handler.image
    assert await fetcher.fetch(b64.rstrip("=")) == Handler.image
    with pytest.raises(InputFetchError, match="not a readable image"):
        await fetcher.fetch("data:text/plain;base64," + base64.b64encode(b"hello").decode())
    with pytest.raises(InputFetchError, match="neither an http"):
        await fetcher.fetch("not base64 at all!")
    with pytest.raises(InputFetchError, match="larger than 4096"):
        await fetcher.fetch(base64.b64encode(Handler.image * 200).decode())


class LoopbackOnly(httpx.AsyncBaseTransport):
    """Sends every request to 127.0.0.1 (same port) and records what was asked, so a test can
    pretend a host is public without a packet leaving the machine."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((str(request.url), request.headers["host"]))
        request.url = request.url.copy_with(host="127.0.0.1")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.mark.parametrize("path", ["/to-metadata", "/to-loopback"])
async def test_redirect_to_refused_address_is_not_followed(server: str, path: str) -> None:
    port = server.rsplit(":", 1)[1]
    transport = LoopbackOnly()
    async with httpx.AsyncClient(transport=transport) as client:
        f = InputFetcher(
            max_bytes=4096, timeout_s=2.0, allow_private=False, client=client, resolve=fake_resolve
        )
        with pytest.raises(UrlRefused, match=r"metadata|loopback"):
            await f.fetch(f"http://images.test:{port}{path}")
        await f.aclose()
    # one request only, pinned to the address the guard approved, with the original Host
    assert transport.seen == [(f"http://{PUBLIC}:{port}{path}", f"images.test:{port}")]


async def test_every_hop_is_resolved_and_pinned(server: str) -> None:
    port = server.rsplit(":", 1)[1]
    transport = LoopbackOnly()
    async with httpx.AsyncClient(transport=transport) as client:
        f = InputFetcher(
            max_bytes=4096, timeout_s=2.0, allow_private=False, client=client, resolve=fake_resolve
        )
        assert await f.fetch(f"http://images.test:{port}/to-cdn") == Handler.image
    v6 = "[2606:2800:220:1:248:1893:25c8:1946]"
    assert transport.seen == [
        (f"http://{PUBLIC}:{port}/to-cdn", f"images.test:{port}"),
        (f"http://{v6}:{port}/img.png", f"cdn.test:{port}"),
    ]


def test_an_input_that_may_come_back_is_retried_with_a_backoff() -> None:
    from sdfleet.agent.backoff import input_retry_delay

    assert [input_retry_delay(n, 0.0) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert input_retry_delay(1, 10.0) == 10.0  # agent.retry_delay_s, when it is longer
    assert input_retry_delay(1, 0.0, 45.0) == 45.0  # the server's Retry-After, when it is longer
    assert input_retry_delay(4, 0.0, 2.0) == 8.0
    assert input_retry_delay(1, 0.0, 86400.0) == 600.0  # but a message is not hidden for a day


def test_retry_after_in_seconds_or_as_an_http_date() -> None:
    now = 1_800_000_000.0  # 2027-01-15 08:00:00 GMT
    assert retry_after_s("120", now) == 120.0
    assert retry_after_s("Fri, 15 Jan 2027 08:00:30 GMT", now) == 30.0
    assert retry_after_s("Fri, 15 Jan 2027 07:59:00 GMT", now) == 0.0  # already past
    for unreadable in (None, "", "soon", "-5", "1.5", "Fri, 15 Jan 2027 08:00:30"):
        assert retry_after_s(unreadable, now) is None, unreadable
