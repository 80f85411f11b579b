"""A TCP proxy on 127.0.0.1 in front of a real server that loses one reply.

The next request whose bytes hold ``marker`` reaches the server, which applies it and answers; the
proxy then closes the client's connection without the answer. The client sees a dropped
connection after its write landed, which is what a reset, a timeout or a load balancer's idle cut
does in production, and what client retries (botocore's "standard" mode, redis-py's ``Retry``)
answer by sending the same request again.
"""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from types import TracebackType

import pytest


class LostReplyProxy:
    """Forward 127.0.0.1:``port`` to ``target_port``; lose the reply to the next ``marker`` request
    (``lose_next``), or to requests at random (``lose_at_random``)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._marker: bytes | None = None
        self._rate = 0.0
        self._rng = random.Random(0)
        self._lock = threading.Lock()
        self.lost = 0
        """Replies lost so far."""
        self._closing = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="lost-reply-proxy", daemon=True).start()

    def lose_next(self, marker: bytes) -> None:
        """Lose the reply to the next request that holds ``marker`` (once)."""
        with self._lock:
            self._marker = marker

    def lose_at_random(self, rate: float, seed: int = 0) -> None:
        """From now on lose the reply to each request with probability ``rate`` (0 stops it)."""
        with self._lock:
            self._rate, self._rng = rate, random.Random(seed)

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._sockets += [client, server]
            losing = threading.Event()
            threading.Thread(target=self._up, args=(client, server, losing), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, losing), daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, losing: threading.Event) -> None:
        """Client to server; arms ``losing`` when the marked request passes."""
        tail = b""  # the end of what passed before: a marker may straddle two reads
        while chunk := _recv(client):
            seen = tail + chunk
            with self._lock:
                marker = self._marker
                # a match must end in this chunk (not lie wholly in an earlier request)
                if marker is not None and seen.find(marker, max(0, len(tail) - len(marker) + 1)) >= 0:
                    self._marker = None
                    losing.set()
                elif self._rate and self._rng.random() < self._rate:
                    losing.set()
            tail = seen[-4096:]
            try:
                server.sendall(chunk)
            except OSError:  # the other pump closed it: that reply was lost
                break
        _close(server)

    def _down(self, server: socket.socket, client: socket.socket, losing: threading.Event) -> None:
        """Server to client; once ``losing`` is armed, the next reply is dropped with the connection."""
        while chunk := _recv(server):
            if losing.is_set():
                with self._lock:
                    self.lost += 1
                break
            try:
                client.sendall(chunk)
            except OSError:
                break
        _close(client)
        _close(server)

    def close(self) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                _close(s)

    def __enter__(self) -> LostReplyProxy:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


def proxy_to(engine: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> LostReplyProxy:
    """A proxy in front of the suite's redis-server (``engine`` "redis") or its moto (any other:
    ``AWS_ENDPOINT_URL`` then points at the proxy for the rest of the test)."""
    if engine == "redis":
        return LostReplyProxy(request.getfixturevalue("redis_server").port)
    proxy = LostReplyProxy(int(request.getfixturevalue("moto_url").rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    return proxy


def script_marker(script: str) -> bytes:
    """What marks a call of a Redis script on the wire: its SHA1, as ``EVALSHA`` sends it (the
    script must be loaded already, or the reply lost is the ``NOSCRIPT`` that redis-py answers by
    loading it)."""
    return hashlib.sha1(script.encode()).hexdigest().encode()
