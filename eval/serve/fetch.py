"""Remote images that cannot be turned inward: ``http(s)://`` fetches with checked addresses.

A URL a client sends is fetched by the server, from inside its network. So the host is
resolved here and every address it gives is checked: loopback, private, link-local (cloud
metadata at 169.254.169.254), multicast, reserved and unspecified addresses are refused
unless the server allows private hosts. The connection then goes to the address that was
checked (a second lookup could answer otherwise), each redirect is checked the same way, at
most :data:`MAX_REDIRECTS` of them, and the whole fetch (connecting, redirects, reading) has
one deadline and one size cap: a server that drips a byte at a time cannot hold a worker.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass

MAX_REDIRECTS = 3
REDIRECTS = (301, 302, 303, 307, 308)
CHUNK = 64 * 2**10


class FetchError(Exception):
    """A fetch refused or failed: ``status`` (a 4xx for the client) and ``code`` say which."""

    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass
class FetchPolicy:
    """Args:
    max_bytes: a larger image is refused (413), by its Content-Length or as it arrives.
    timeout_s: the deadline of the whole fetch, redirects included.
    private_hosts: allow the addresses that are refused by default (see :func:`refusal`).
    """

    max_bytes: int
    timeout_s: float
    private_hosts: bool = False


def refusal(address: str) -> str | None:
    """Why a fetch may not reach ``address`` (``None``: it may): the kind of address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    if not ip.is_global:  # shared (carrier-grade NAT) and other special-purpose ranges
        return "special-purpose"
    return None


def fetch(url: str, policy: FetchPolicy) -> bytes:
    """The body at ``url`` (``http``/``https``), following at most :data:`MAX_REDIRECTS`
    redirects; raises :class:`FetchError`."""
    deadline = time.monotonic() + policy.timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        try:
            status, location, body = _get(url, policy, deadline)
        except TimeoutError:
            raise FetchError(
                400, f"fetching the image at {url} took over {policy.timeout_s:g} s", "image_fetch_timeout"
            ) from None
        if status not in REDIRECTS:
            if status != 200:
                raise FetchError(400, f"the image URL {url} answered HTTP {status}", "image_fetch_failed")
            return body
        if not location:
            raise FetchError(400, f"{url} redirects (HTTP {status}) without a Location", "image_fetch_failed")
        url = urllib.parse.urljoin(url, location)
    raise FetchError(
        400, f"the image URL redirects more than {MAX_REDIRECTS} times", "image_too_many_redirects"
    )


def _get(url: str, policy: FetchPolicy, deadline: float) -> tuple[int, str | None, bytes]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise FetchError(400, f"cannot fetch {url!r}: only http(s):// URLs with a host", "image_url_refused")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = _checked_address(parts.hostname, port, policy, _left(deadline, url))
    connection_type = _HTTPSToAddress if parts.scheme == "https" else _HTTPToAddress
    conn = connection_type(parts.hostname, port, address=address, timeout=_left(deadline, url))
    # Socket timeouts bound each read; this bounds them all: at the deadline the socket is shut,
    # whatever the server is dripping (headers or body).
    watchdog = threading.Timer(_left(deadline, url), _shut, [conn])
    watchdog.daemon = True
    watchdog.start()
    try:
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        conn.request("GET", path, headers={"User-Agent": "vlm-serve", "Accept": "image/*"})
        sock = conn.sock  # the response reads it even where the connection lets it go
        response = conn.getresponse()
        _left(deadline, url)  # headers the watchdog cut short are not the server's answer
        if response.status in REDIRECTS or response.status != 200:
            return response.status, response.getheader("Location"), b""
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > policy.max_bytes:
            raise _too_large(url, policy)
        body = bytearray()
        while True:
            sock.settimeout(_left(deadline, url))
            piece = response.read1(CHUNK)
            _left(deadline, url)  # a read the watchdog ended is not the end of the image
            if not piece:
                return 200, None, bytes(body)
            body += piece
            if len(body) > policy.max_bytes:
                raise _too_large(url, policy)
    except (OSError, http.client.HTTPException) as err:
        if time.monotonic() >= deadline or isinstance(err, TimeoutError):
            raise TimeoutError(url) from None
        raise FetchError(400, f"cannot fetch the image at {url}: {err}", "image_fetch_failed") from None
    finally:
        watchdog.cancel()
        conn.close()


def _shut(conn: http.client.HTTPConnection) -> None:
    sock = conn.sock
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


def _checked_address(host: str, port: int, policy: FetchPolicy, timeout: float) -> str:
    """An address of ``host`` that the policy lets a fetch reach; every address it resolves to
    is checked (a name with one private address among public ones is refused)."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise FetchError(
            400, f"cannot resolve the image host {host!r}: {err}", "image_fetch_failed"
        ) from None
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    if not addresses:
        raise FetchError(400, f"the image host {host!r} has no address", "image_fetch_failed")
    if not policy.private_hosts:
        for address in addresses:
            kind = refusal(address)
            if kind is not None:
                raise FetchError(
                    400,
                    f"the image host {host!r} is at {address}, a {kind} address: refused (the server "
                    "fetches only from public hosts unless started with --allow-private-image-hosts)",
                    "image_host_refused",
                )
    return addresses[0]


def _left(deadline: float, url: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(url)
    return left


def _too_large(url: str, policy: FetchPolicy) -> FetchError:
    return FetchError(413, f"the image at {url} is larger than {policy.max_bytes} bytes", "image_too_large")


class _HTTPToAddress(http.client.HTTPConnection):
    """Connects to the address that was checked; ``Host`` stays the URL's."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _HTTPSToAddress(http.client.HTTPSConnection):
    """As :class:`_HTTPToAddress`, with TLS verified against the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)
