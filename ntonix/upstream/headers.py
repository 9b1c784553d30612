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
from typing import Any, Iterable, List, Set, Tuple

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
# The client is told the gateway's own request id, the one the backend was sent.
_DROP_CLIENT = HOP_BY_HOP | FRAMING | {b"x-request-id"}

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def connection_listed(raw: Iterable[Tuple[bytes, bytes]]) -> Set[bytes]:
    """Header names that a Connection header declares hop-by-hop."""
    out: Set[bytes] = set()
    for name, value in raw:
        if name.lower() == b"connection":
            out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def _filtered(raw: RawHeaders, drop: frozenset) -> RawHeaders:
    listed = connection_listed(raw)
    if listed:
        drop = drop | listed
    return [(n, v) for n, v in raw if n.lower() not in drop]


# Fresh ids: a random per-process half and a counter, 32 hex digits as a
# UUID's. Unique across processes and restarts without a system call per
# request (os.urandom is one).
_ID_PREFIX = os.urandom(8).hex().encode()
_id_counter = itertools.count(int.from_bytes(os.urandom(4), "big"))


def sane_request_id(given: bytes) -> bytes:
    """``given`` when it is a sane X-Request-ID, else a fresh one."""
    if given and _REQUEST_ID.match(given):
        return given
    return b"%s%016x" % (_ID_PREFIX, next(_id_counter))


def request_id_from(headers: Any) -> bytes:
    """The client's X-Request-ID (from anything with ``getRawHeaders``) when
    it is sane, else a fresh one."""
    given = headers.getRawHeaders(b"x-request-id")
    return sane_request_id(given[0] if given else b"")


def upstream_request_headers(client: RawHeaders, client_ip: str, request_id: bytes,
                             secure: bool) -> RawHeaders:
    """The client's headers fit for the backend, with the forwarding ones."""
    out = _filtered(client, _DROP_UPSTREAM)
    xff = [v for n, v in client if n.lower() == b"x-forwarded-for"]
    ip = client_ip.encode()
    out.append((b"X-Forwarded-For", b", ".join(xff + [ip]) if xff else ip))
    out.append((b"X-Real-IP", ip))
    out.append((b"X-Forwarded-Proto", b"https" if secure else b"http"))
    out.append((b"X-Request-ID", request_id))
    return out


def upstream_request_head(method: bytes, uri: bytes, host: bytes, headers: RawHeaders,
                          body_length: int) -> bytes:
    """The whole head of the request sent upstream."""
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, uri, host)]
    lines.extend(b"%s: %s\r\n" % (n, v) for n, v in headers)
    lines.append(b"Content-Length: %d\r\n\r\n" % body_length)
    return b"".join(lines)


def client_response_headers(upstream: RawHeaders) -> RawHeaders:
    """The backend's response headers fit for the client.

    The body is relayed byte for byte, so Content-Encoding stays as the
    backend sent it; the client side frames the body for its own hop.
    """
    return _filtered(upstream, _DROP_CLIENT)
