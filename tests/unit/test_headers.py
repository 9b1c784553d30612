from twisted.web.http_headers import Headers

from ntonix.upstream.headers import (
    client_response_headers,
    request_id_from,
    upstream_request_headers,
)


def test_upstream_headers_strip_hop_by_hop_and_add_forwarding():
    client = Headers({
        b"Connection": [b"keep-alive, X-Private"], b"X-Private": [b"1"], b"TE": [b"trailers"],
        b"Host": [b"gw"], b"Content-Length": [b"10"], b"Accept-Encoding": [b"br"],
        b"Authorization": [b"Bearer k"], b"X-Forwarded-For": [b"1.1.1.1", b"2.2.2.2"],
        b"X-Real-IP": [b"6.6.6.6"], b"Upgrade": [b"h2c"],
    })
    out = upstream_request_headers(client, "10.0.0.1", b"rid", secure=True)
    names = {n.lower() for n, _ in out.getAllRawHeaders()}
    for gone in (b"connection", b"x-private", b"te", b"host", b"content-length", b"upgrade"):
        assert gone not in names
    # Bodies are relayed untouched, so the client's encodings are the backend's to honour.
    assert out.getRawHeaders(b"accept-encoding") == [b"br"]
    assert out.getRawHeaders(b"authorization") == [b"Bearer k"]
    assert out.getRawHeaders(b"x-forwarded-for") == [b"1.1.1.1, 2.2.2.2, 10.0.0.1"]
    assert out.getRawHeaders(b"x-real-ip") == [b"10.0.0.1"]
    assert out.getRawHeaders(b"x-forwarded-proto") == [b"https"]
    assert out.getRawHeaders(b"x-request-id") == [b"rid"]


def test_response_headers_drop_framing_and_hop_by_hop():
    up = Headers({b"Transfer-Encoding": [b"chunked"], b"Content-Length": [b"5"],
                  b"Keep-Alive": [b"timeout=5"], b"Content-Encoding": [b"gzip"],
                  b"Content-Type": [b"text/event-stream"], b"Set-Cookie": [b"a=b"]})
    out = client_response_headers(up)
    assert sorted(n.lower() for n, _ in out.getAllRawHeaders()) == [
        b"content-encoding", b"content-type", b"set-cookie"]


def test_request_id_kept_when_sane_else_fresh():
    assert request_id_from(Headers({b"X-Request-ID": [b"abc-123"]})) == b"abc-123"
    for bad in (b"", b"has space", b"x" * 129, b"new\nline"):
        rid = request_id_from(Headers({b"X-Request-ID": [bad]}))
        assert rid != bad and len(rid) == 32
