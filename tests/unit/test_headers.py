from ntonix.upstream.headers import (
    client_response_headers,
    lower_names,
    request_line,
    sane_request_id,
    upstream_header_block,
)


def values(raw, name):
    return [v for n, v in raw if n.lower() == name]


def parse_block(block):
    assert block.endswith(b"\r\n\r\n")
    return [tuple(line.split(b": ", 1)) for line in block[:-4].split(b"\r\n")]


def test_upstream_headers_strip_hop_by_hop_and_add_forwarding():
    client = [
        (b"Connection", b"keep-alive, X-Private"), (b"X-Private", b"1"), (b"TE", b"trailers"),
        (b"Host", b"gw"), (b"Content-Length", b"10"), (b"Accept-Encoding", b"br"),
        (b"Authorization", b"Bearer k"), (b"X-Forwarded-For", b"1.1.1.1"),
        (b"X-Forwarded-For", b"2.2.2.2"), (b"X-Real-IP", b"6.6.6.6"), (b"Upgrade", b"h2c"),
        (b"X-Dup", b"a"), (b"X-Dup", b"b"), (b"Expect", b"100-continue"),
    ]
    out = parse_block(upstream_header_block(client, lower_names(client), "10.0.0.1", b"rid",
                                            True, 7, trusted=True))
    names = [n.lower() for n, _ in out]
    for gone in (b"connection", b"x-private", b"te", b"host", b"upgrade", b"expect"):
        assert gone not in names
    # Bodies are relayed untouched, so the client's encodings are the backend's to honour.
    assert values(out, b"accept-encoding") == [b"br"]
    assert values(out, b"authorization") == [b"Bearer k"]
    assert values(out, b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 10.0.0.1"]
    assert values(out, b"x-real-ip") == [b"2.2.2.2"]  # as the trusted proxy says
    assert values(out, b"x-forwarded-proto") == [b"https"]
    assert values(out, b"x-request-id") == [b"rid"]
    # The body's own length, once, whatever the client said.
    assert values(out, b"content-length") == [b"7"]
    # Repeated end-to-end headers keep their order.
    assert values(out, b"x-dup") == [b"a", b"b"]


def test_an_untrusted_clients_forwarding_headers_are_dropped():
    client = [(b"X-Forwarded-For", b"1.2.3.4"), (b"X-Real-IP", b"1.2.3.4"),
              (b"Forwarded", b"for=1.2.3.4;host=admin"), (b"X-Forwarded-Host", b"admin"),
              (b"X-Forwarded-Port", b"1")]
    out = parse_block(upstream_header_block(client, lower_names(client), "10.0.0.9", b"r",
                                            False, 0))
    assert values(out, b"x-forwarded-for") == [b"10.0.0.9"]
    assert values(out, b"x-real-ip") == [b"10.0.0.9"]
    for name in (b"forwarded", b"x-forwarded-host", b"x-forwarded-port"):
        assert values(out, name) == [], name


def test_first_hop_gets_the_client_address_alone():
    client = [(b"Content-Type", b"application/json")]
    out = parse_block(upstream_header_block(client, lower_names(client), "10.0.0.9", b"r",
                                            False, 0))
    assert values(out, b"x-forwarded-for") == [b"10.0.0.9"]
    assert values(out, b"x-forwarded-proto") == [b"http"]


def test_request_line_names_the_backend():
    assert request_line(b"POST", b"/v1/chat/completions", b"10.0.0.5:8000") == (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 10.0.0.5:8000\r\n")


def test_response_headers_drop_framing_hop_by_hop_and_connection_listed():
    up = [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5"),
          (b"Keep-Alive", b"timeout=5"), (b"Content-Encoding", b"gzip"),
          (b"Connection", b"X-Hop"), (b"X-Hop", b"secret"),
          (b"Content-Type", b"text/event-stream"), (b"Set-Cookie", b"a=b"),
          (b"X-Request-ID", b"backend-own")]
    out = client_response_headers(up, lower_names(up))
    assert sorted(n.lower() for n, _ in out) == [b"content-encoding", b"content-type",
                                                 b"set-cookie"]


def test_request_id_kept_when_sane_else_fresh():
    assert sane_request_id(b"abc-123") == b"abc-123"
    seen = set()
    for bad in (b"", b"has space", b"x" * 129, b"new\nline"):
        rid = sane_request_id(bad)
        assert rid != bad and len(rid) == 32 and int(rid, 16) >= 0
        seen.add(rid)
    assert len(seen) == 4
