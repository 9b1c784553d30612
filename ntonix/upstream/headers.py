"""Which headers cross the gateway, in each direction.

Hop-by-hop headers (RFC 9110 section 7.6.1) belong to one connection and never
cross; neither do the framing headers, which Twisted sets for the hop it
writes. Everything else passes, ``Authorization`` included.
"""

import re
import uuid
from typing import Iterable, Set

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
    b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Set per hop by the HTTP machinery on each side.
FRAMING = frozenset({b"content-length", b"host", b"expect"})
# Replaced with the gateway's own values.
FORWARDING = frozenset({b"x-real-ip", b"x-request-id", b"x-forwarded-proto"})

_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def connection_listed(headers: Headers) -> Set[bytes]:
    """Header names that a Connection header declares hop-by-hop."""
    out: Set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        out.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return out


def _copy(src: Headers, drop: Iterable[bytes]) -> Headers:
    dropped = set(drop) | HOP_BY_HOP | connection_listed(src)
    out = Headers()
    for name, values in src.getAllRawHeaders():
        if name.lower() not in dropped:
            out.setRawHeaders(name, list(values))
    return out


def request_id_from(headers: Headers) -> bytes:
    """The client's X-Request-ID when it is sane, else a fresh one."""
    given = headers.getRawHeaders(b"x-request-id")
    if given and _REQUEST_ID.match(given[0]):
        return given[0]
    return uuid.uuid4().hex.encode()


def upstream_request_headers(client: Headers, client_ip: str, request_id: bytes,
                             secure: bool) -> Headers:
    out = _copy(client, FRAMING | FORWARDING)
    xff = client.getRawHeaders(b"x-forwarded-for")
    ip = client_ip.encode()
    out.setRawHeaders(b"X-Forwarded-For", [b", ".join(xff + [ip]) if xff else ip])
    out.setRawHeaders(b"X-Real-IP", [ip])
    out.setRawHeaders(b"X-Forwarded-Proto", [b"https" if secure else b"http"])
    out.setRawHeaders(b"X-Request-ID", [request_id])
    return out


def client_response_headers(upstream: Headers) -> Headers:
    """The backend's response headers fit for the client.

    The body is relayed byte for byte, so Content-Encoding stays as the
    backend sent it; the relay sets Content-Length from the response.
    """
    return _copy(upstream, FRAMING)
