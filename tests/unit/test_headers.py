from ntonix.http.request import RequestHeaders
from ntonix.upstream.headers import (
    client_response_headers,
    request_id_from,
    upstream_request_head,
    upstream_request_headers,
)


def lower_names(raw):
    return [n.lower() for n, _ in raw]


def values(raw, name):
    return [v for n, v in raw if n.lower() == name]


def test_upstream_headers_strip_hop_by_hop_and_add_forwarding():
    client = [
        (b"Connection", b"keep-alive, X-Private"), (b"X-Private", b"1"), (b"TE", b"trailers"),
        (b"Host", b"gw"), (b"Content-Length", b"10"), (b"Accept-Encoding", b"br"),
        (b"Authorization", b"Bearer k"), (b"X-Forwarded-For", b"1.1.1.1"),
        (b"X-Forwarded-For", b"2.2.2.2"), (b"X-Real-IP", b"6.6.6.6"), (b"Upgrade", b"h2c"),
        (b"X-Dup", b"a"), (b"X-Dup", b"b"),
    ]
    out = upstream_request_headers(client, "10.0.0.1", b"rid", secure=True)
    names = lower_names(out)
    for gone in (b"connection", b"x-private", b"te", b"host", b"content-length", b"upgrade"):
        assert gone not in names
    # Bodies are relayed untouched, so the client's encodings are the backend's to honour.
    assert values(out, b"accept-encoding") == [b"br"]
    assert values(out, b"authorization") == [b"Bearer k"]
    assert values(out, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 10.0.0.1"]
    assert values(out, b"x-real-ip") == [b"10.0.0.1"]
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-request-id") == [b"rid"]
    # Repeated end-to-end headers keep their order.
    assert values(out, b"x-dup") == [b"a", b"b"]


def test_upstream_head_is_one_request_with_its_framing():
    head = upstream_request_head(b"POST", b"/v1/chat/completions", b"10.0.0.5:8000",
                                 [(b"Content-Type", b"application/json")], 7)
    assert head == (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 10.0.0.5:8000\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 7\r\n\r\n")


def test_response_headers_drop_framing_hop_by_hop_and_connection_listed():
    up = [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5"),
          (b"Keep-Alive", b"timeout=5"), (b"Content-Encoding", b"gzip"),
          (b"Connection", b"X-Hop"), (b"X-Hop", b"secret"),
          (b"Content-Type", b"text/event-stream"), (b"Set-Cookie", b"a=b")]
    out = client_response_headers(up)
    assert sorted(lower_names(out)) == [b"content-encoding", b"content-type", b"set-cookie"]


def test_request_id_kept_when_sane_else_fresh():
    assert request_id_from(RequestHeaders([(b"X-Request-ID", b"abc-123")])) == b"abc-123"
    for bad in (b"", b"has space", b"x" * 129, b"new\nline"):
        rid = request_id_from(RequestHeaders([(b"X-Request-ID", bad)]))
        assert rid != bad and len(rid) == 32
