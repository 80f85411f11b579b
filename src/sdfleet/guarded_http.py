"""Input images, fetched safely: ``data:`` URLs, bare base64, and http(s) behind an SSRF guard.

A task's ``init_images`` come from clients, so an agent must never become their proxy into its
own network. ``check_url`` refuses every address that is not globally routable (loopback,
RFC 1918, link-local with the 169.254.169.254 metadata service, CGNAT, multicast, reserved …,
also when hidden in IPv4-mapped/6to4/NAT64 IPv6 or non-canonical IPv4 such as ``2130706433``).
The fetcher connects to the very address the guard checked (no second DNS lookup to rebind),
follows at most ``MAX_REDIRECTS`` redirects itself and guards every hop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import io
import ipaddress
import re
import socket
import time
import urllib.parse
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx
from PIL import Image, UnidentifiedImageError

from sdfleet.errors import InputFetchError, InputUnavailable, UrlRefused
from sdfleet.s3_inputs import S3Inputs

MAX_REDIRECTS = 3
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
"""Answers that say "not now" rather than "no": the fetch is worth another try later."""
_SCHEMES = ("http", "https")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_METADATA = ipaddress.ip_address("169.254.169.254")
_NUMERIC_HOST = re.compile(r"^(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.IGNORECASE)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str], list[str]]


def retry_after_s(value: str | None, now: float | None = None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (delay-seconds or an HTTP-date, RFC 9110
    §10.2.3); None when absent or unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def resolve_host(host: str) -> list[str]:
    """Every address ``host`` resolves to (``getaddrinfo``; blocking)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        # EAI_AGAIN: the resolver could not answer now (an unknown name is EAI_NONAME)
        kind = InputUnavailable if getattr(e, "errno", None) == socket.EAI_AGAIN else InputFetchError
        raise kind(f"cannot resolve {host!r}: {e}") from e
    return sorted({str(info[4][0]) for info in infos})


def _inet_aton(host: str) -> ipaddress.IPv4Address | None:
    """The address a C resolver reads in ``127.1``, ``0x7f.1``, ``017700000001`` or ``2130706433``."""
    if not _NUMERIC_HOST.match(host):
        return None
    parts = host.rstrip(".").split(".")
    try:
        nums = [
            int(p, 16) if p.lower().startswith("0x") else int(p, 8 if len(p) > 1 and p[0] == "0" else 10)
            for p in parts
        ]
    except ValueError:
        return None
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (5 - len(nums)):
        return None
    value = last
    for i, n in enumerate(head):
        value |= n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: Address) -> str | None:
    """Why an agent must not connect to ``ip``; None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            why = refusal(inner)
            return f"{why} (embedded in {ip})" if why else None
    if ip == _METADATA:
        return "link-local address (cloud instance metadata)"
    checks = (
        (ip.is_unspecified, "unspecified address"),
        (ip.is_loopback, "loopback address"),
        (ip.is_link_local, "link-local address"),
        (ip.is_multicast, "multicast address"),
        (
            isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT,
            "shared address space (CGNAT 100.64.0.0/10)",
        ),
        (ip.is_private, "private address"),
        (ip.is_reserved, "reserved address"),
        (not ip.is_global, "address that is not globally routable"),
    )
    return next((why for hit, why in checks if hit), None)


def _parse(url: str) -> httpx.URL:
    if any(c in url for c in "\\\r\n\t ") or not url.isprintable():
        raise UrlRefused("URL contains whitespace, control characters or backslashes")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise UrlRefused(f"malformed URL: {e}") from e
    if parsed.scheme not in _SCHEMES:
        raise UrlRefused(f"scheme {parsed.scheme or '(none)'!r} is not allowed; use http or https")
    if parsed.userinfo or "@" in urllib.parse.unquote(parsed.netloc.decode("ascii", "replace")):
        raise UrlRefused("credentials (user@) in URLs are not allowed")
    try:
        # httpx decodes an IDNA ("xn--") host on access and raises for an invalid one.
        host = parsed.host
    except ValueError as e:
        raise UrlRefused(f"malformed host: {e}") from e
    if not host:
        raise UrlRefused("URL has no host")
    return parsed


def _addresses(host: str, resolve: Resolve) -> list[Address]:
    """The addresses of ``host``; names are refused up front where they can only be local."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    numeric = _inet_aton(host)
    if numeric is not None or _NUMERIC_HOST.match(host):
        shown = f" (= {numeric})" if numeric is not None else ""
        raise UrlRefused(f"non-canonical IPv4 address {host!r}{shown}")
    name = host.rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        raise UrlRefused(f"{host!r} is a loopback name")
    try:
        return [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(name)]
    except ValueError as e:
        raise UrlRefused(f"{host!r} resolved to something that is not an address: {e}") from e


def guarded_addresses(url: str, *, allow_private: bool, resolve: Resolve = resolve_host) -> list[str]:
    """``check_url``, returning the addresses that passed (empty when ``allow_private``: no lookup)."""
    parsed = _parse(url)
    if allow_private:
        return []
    host = parsed.raw_host.decode("ascii")
    addresses = _addresses(host, resolve)
    if not addresses:
        raise UrlRefused(f"{host!r} has no address")
    for ip in addresses:
        why = refusal(ip)
        if why is not None:
            raise UrlRefused(f"{url} is refused: {host} is a {why}")
    return [str(ip) for ip in addresses]


def check_url(url: str, *, allow_private: bool, resolve: Resolve = resolve_host) -> None:
    """Raise ``UrlRefused`` unless an agent may fetch ``url``: http(s) only, no credentials in the
    URL, and (unless ``allow_private``) every address the host resolves to is public."""
    guarded_addresses(url, allow_private=allow_private, resolve=resolve)


DEFAULT_MAX_PIXELS = 4096 * 4096


def image_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header (nothing decoded yet) and
    verified. Raises ``InputFetchError`` when it is not an image or has more than ``max_pixels``:
    a PNG of a few KB can stand for billions of pixels, which decoding would have to allocate."""
    try:
        with warnings.catch_warnings():
            # PIL only warns between 89 and 179 Mpx: what is above our limit must not decode at all
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise InputFetchError(
                        f"input image is {width}x{height} ({width * height} pixels), more than the "
                        f"{max_pixels} allowed",
                        code="input_too_large",
                    )
                img.verify()
    except InputFetchError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise InputFetchError(
            f"input image is more than the {max_pixels} pixels allowed ({e})", code="input_too_large"
        ) from e
    except UnidentifiedImageError as e:  # its message names a BytesIO object, nothing of use
        raise InputFetchError("input is not a readable image (no format PIL reads)") from e
    except Exception as e:  # PIL raises many types (SyntaxError, OSError, DecompressionBombError…)
        raise InputFetchError(f"input is not a readable image: {e}") from e
    return width, height


def decode_inline(url: str, max_bytes: int) -> bytes | None:
    """The bytes of a ``data:`` URL or bare base64 input; None for an http(s) URL."""
    text = url.strip()
    if text[:5].lower() == "data:":
        return _decode_data_url(text, max_bytes)
    if "://" in text[:16]:
        return None
    return _b64decode(text, max_bytes)


def _b64decode(text: str, max_bytes: int) -> bytes:
    compact = "".join(text.split())
    if len(compact) // 4 * 3 > max_bytes + 2:
        raise InputFetchError(f"input image is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError) as e:
        raise InputFetchError(f"input is neither an http(s) URL, a data: URL nor base64: {e}") from e
    if len(data) > max_bytes:
        raise InputFetchError(f"input image is larger than {max_bytes} bytes")
    return data


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url[len("data:") :].partition(",")
    if not sep:
        raise InputFetchError("malformed data: URL (no comma)")
    if header.lower().endswith(";base64"):
        return _b64decode(payload, max_bytes)
    data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise InputFetchError(f"input image is larger than {max_bytes} bytes")
    return data


async def pinned_target(
    url: str, *, allow_private: bool, resolve: Resolve
) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
    """The request to send for ``url`` (URL, extra headers, httpx extensions), pinned to the address
    the guard approved, so a second DNS answer cannot point it elsewhere. Raises ``UrlRefused``."""
    approved = await asyncio.to_thread(guarded_addresses, url, allow_private=allow_private, resolve=resolve)
    parsed = httpx.URL(url)
    host = parsed.raw_host.decode("ascii")
    if not approved or approved[0] == host:
        return parsed, {}, {}
    headers = {"Host": parsed.netloc.decode("ascii")}
    extensions: dict[str, Any] = {"sni_hostname": host} if parsed.scheme == "https" else {}
    return parsed.copy_with(host=approved[0]), headers, extensions


def guarded_client(timeout_s: float) -> httpx.AsyncClient:
    """An HTTP client for URLs clients give us: no redirects followed for us (each hop is checked by
    the guard), no proxy settings from the environment."""
    return httpx.AsyncClient(
        timeout=timeout_s, follow_redirects=False, trust_env=False, headers={"User-Agent": "sdfleet"}
    )


def fetcher_from_options(options: Mapping[str, Any]) -> InputFetcher:
    """The fetcher of a server-backed runtime (a1111, comfyui) from its options:
    ``input_max_bytes``, ``input_timeout_s``, ``allow_private_inputs``, ``input_s3_buckets``,
    ``input_max_pixels``."""
    return InputFetcher(
        max_bytes=int(options.get("input_max_bytes", 20 * 2**20)),
        timeout_s=float(options.get("input_timeout_s", 30)),
        allow_private=bool(options.get("allow_private_inputs", False)),
        s3_buckets=list(options.get("input_s3_buckets", ())),
        max_pixels=int(options.get("input_max_pixels", DEFAULT_MAX_PIXELS)),
    )


class InputFetcher:
    """Fetches input images for tasks; one per agent (it owns an ``httpx.AsyncClient`` unless given one)."""

    def __init__(
        self,
        max_bytes: int,
        timeout_s: float,
        allow_private: bool,
        client: httpx.AsyncClient | None = None,
        resolve: Resolve = resolve_host,
        s3_buckets: Sequence[str] = (),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.s3 = S3Inputs(s3_buckets) if s3_buckets else None
        """``s3://`` inputs from these buckets (``bucket`` or ``bucket/prefix``); none: refused."""
        self.timeout_s = timeout_s
        self.allow_private = allow_private
        self._resolve = resolve
        self._owns_client = client is None
        self._client = client or guarded_client(timeout_s)

    async def fetch(self, url: str) -> bytes:
        """The image bytes ``url`` stands for, an image of at most ``max_pixels``. Raises
        ``UrlRefused``, ``InputUnavailable`` (a timeout, a connection error, one of
        ``RETRY_STATUSES``: worth a retry) or ``InputFetchError``."""
        text = url.strip()
        data = decode_inline(text, self.max_bytes)
        if data is None and text[:5].lower() == "s3://":
            if self.s3 is None:
                raise UrlRefused(f"s3:// inputs are off: allow buckets in agent.input_s3_buckets ({text})")
            data = await self.s3.fetch(text, self.max_bytes)
        elif data is None:
            data = await self._fetch_http(text)
        image_size(data, self.max_pixels)
        return data

    async def _fetch_http(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._follow(url)
        except TimeoutError as e:
            raise InputUnavailable(f"fetching {url} took longer than {self.timeout_s:g}s") from e
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as e:
            raise InputUnavailable(f"fetching {url} failed: {type(e).__name__}: {e}") from e
        except httpx.HTTPError as e:
            raise InputFetchError(f"fetching {url} failed: {type(e).__name__}: {e}") from e

    async def _follow(self, url: str) -> bytes:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            target, headers, extensions = await pinned_target(
                current, allow_private=self.allow_private, resolve=self._resolve
            )
            async with self._client.stream(
                "GET", target, headers=headers, extensions=extensions, follow_redirects=False
            ) as resp:
                if resp.is_redirect:
                    location = resp.headers.get("location")
                    if not location:
                        raise InputFetchError(f"{current} redirects without a Location")
                    current = str(httpx.URL(current).join(location))
                    continue
                if resp.status_code in RETRY_STATUSES:
                    after = retry_after_s(resp.headers.get("retry-after"))
                    message = f"fetching {current} failed: HTTP {resp.status_code}"
                    raise InputUnavailable(message, retry_after_s=after)
                if resp.status_code != 200:
                    raise InputFetchError(f"fetching {current} failed: HTTP {resp.status_code}")
                return await self._read(resp, current)
        raise InputFetchError(f"{url} redirects more than {MAX_REDIRECTS} times")

    async def _read(self, resp: httpx.Response, url: str) -> bytes:
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise InputFetchError(f"{url} is {declared} bytes, more than the {self.max_bytes} allowed")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > self.max_bytes:
                raise InputFetchError(f"{url} is larger than the {self.max_bytes} bytes allowed")
            chunks.append(chunk)
        return b"".join(chunks)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
        if self.s3 is not None:
            self.s3.close()

    async def __aenter__(self) -> InputFetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
