"""Which headers cross the gateway, in each direction.

Hop-by-hop headers (RFC 9110 section 7.6.1), and those a ``Connection``
header names, belong to one connection and never cross; neither do the
framing headers, which each side sets for the hop it writes. Everything else
passes, in order and with repeats kept, ``Authorization`` included.

Headers are lists of ``(name, value)`` pairs as received; the upstream
request's head is built here as one bytes string.
"""

import itertools
import os
import re
from typing import List, Optional, Set, Tuple

RawHeaders = List[Tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Set per hop by the HTTP machinery on each side.
FRAMING = frozenset({b"content-length", b"host", b"expect"})
# Replaced with the gateway's own values.
FORWARDING = frozenset({b"x-real-ip", b"x-request-id", b"x-forwarded-proto",
                        b"x-forwarded-for"})
_DROP_UPSTREAM = HOP_BY_HOP | FRAMING | FORWARDING
# What only a trusted proxy may tell a backend about the original request.
PROXY_ONLY = frozenset({b"forwarded", b"x-forwarded-host", b"x-forwarded-port"})
_DROP_UPSTREAM_UNTRUSTED = _DROP_UPSTREAM | PROXY_ONLY
# The client is told the gateway's own request id (the one the backend was
# sent) and the gateway's own X-Cache and X-Backend, never a backend's.
_DROP_CLIENT = HOP_BY_HOP | FRAMING | {b"x-request-id", b"x-cache", b"x-backend"}

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def lower_names(raw: RawHeaders) -> List[bytes]:
    return [n.lower() for n, _ in raw]


def connection_listed(raw: RawHeaders, lower: List[bytes]) -> Set[bytes]:
    """Header names that a Connection header declares hop-by-hop."""
    out: Set[bytes] = set()
    for (_, value), low in zip(raw, lower):
        if low == b"connection":
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def _dropped(raw: RawHeaders, lower: List[bytes], drop: frozenset) -> frozenset:
    if b"connection" in lower:
        return drop | connection_listed(raw, lower)
    return drop


# Fresh ids: a random per-process half and a counter, 32 hex digits as a
# UUID's. Unique across processes and restarts without a system call per
# request (os.urandom is one).
_ID_PREFIX = os.urandom(8).hex().encode()
_id_counter = itertools.count(int.from_bytes(os.urandom(7), "big"))


def sane_request_id(given: bytes) -> bytes:
    """``given`` when it is a sane X-Request-ID, else a fresh one."""
    if given and _REQUEST_ID.match(given):
        return given
    return b"%s%016x" % (_ID_PREFIX, next(_id_counter))


def upstream_header_block(client: RawHeaders, lower: List[bytes], client_ip: str,
                          request_id: bytes, secure: bool, body_length: int,
                          trusted: bool = False) -> bytes:
    """The header lines of the request sent upstream, after its request line
    and Host: the client's end-to-end headers, the forwarding ones, the
    length, and the blank line. Built once per request, in one pass.

    ``trusted``: the peer is one of ``tenants.trusted_proxies``, whose
    ``X-Forwarded-For`` is kept (and the address it last added is the real
    client's); from anyone else it is dropped, so a client cannot make the
    backend believe another address."""
    drop = _dropped(client, lower, _DROP_UPSTREAM if trusted else _DROP_UPSTREAM_UNTRUSTED)
    out = []
    xff = []
    for (name, value), low in zip(client, lower):
        if low in drop:
            if low == b"x-forwarded-for":
                xff.append(value)
            continue
        out.append(b"%s: %s\r\n" % (name, value))
    ip = real = client_ip.encode()
    if xff and trusted:
        real = xff[-1].rsplit(b",", 1)[-1].strip() or ip
        xff.append(ip)
    else:
        xff = []
    out.append(b"X-Forwarded-For: %s\r\nX-Real-IP: %s\r\nX-Forwarded-Proto: %s\r\n"
               b"X-Request-ID: %s\r\nContent-Length: %d\r\n\r\n"
               % (b", ".join(xff) if xff else ip, real, b"https" if secure else b"http",
                  request_id, body_length))
    return b"".join(out)


def request_line(method: bytes, uri: bytes, host: bytes) -> bytes:
    """The request line and Host of a request to the backend ``host``."""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, uri, host)


def client_response_headers(upstream: RawHeaders,
                            lower: Optional[List[bytes]] = None) -> RawHeaders:
    """The backend's response headers fit for the client.

    The body is relayed byte for byte, so Content-Encoding stays as the
    backend sent it; the client side frames the body for its own hop.
    """
    if lower is None:
        lower = lower_names(upstream)
    drop = _dropped(upstream, lower, _DROP_CLIENT)
    return [nv for nv, low in zip(upstream, lower) if low not in drop]
