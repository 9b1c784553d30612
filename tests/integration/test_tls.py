"""TLS termination with real TLS clients and certificates made by the tests."""

import http.client
import re
import socket
import ssl

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from certs import issue, make_ca, write_ca, write_pair
from harness import chat_body, raw_connect, run_to_exit, until, within

HTTPS = re.compile(rb"https listening on [0-9.]+:(\d+)")


@pytest.fixture
def pki(tmp_path):
    ca = make_ca()
    return {
        "dir": tmp_path,
        "ca": ca,
        "ca_file": write_ca(tmp_path, ca),
        "default": write_pair(tmp_path, "default", issue(ca, ["localhost", "127.0.0.1"])),
        "api": write_pair(tmp_path, "api", issue(ca, ["api.example.test"])),
        "wild": write_pair(tmp_path, "wild", issue(ca, ["*.wild.test"])),
    }


def client_context(ca_file, minimum=ssl.TLSVersion.TLSv1_2, maximum=ssl.TLSVersion.MAXIMUM_SUPPORTED):
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = minimum
    ctx.maximum_version = maximum
    return ctx


def handshake(port, ca_file, server_name, minimum=ssl.TLSVersion.TLSv1_2,
              maximum=ssl.TLSVersion.MAXIMUM_SUPPORTED):
    """Blocking TLS handshake: (protocol version, certificate names, ALPN)."""
    ctx = client_context(ca_file, minimum, maximum)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            names = [v for k, v in s.getpeercert()["subjectAltName"]]
            return s.version(), names, s.selected_alpn_protocol()


def old_protocol_refused(port):
    import warnings

    warnings.simplefilter("ignore", DeprecationWarning)  # asking for TLS 1.0 on purpose
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            ctx.wrap_socket(raw, server_hostname="localhost")
        except (ssl.SSLError, ConnectionResetError) as e:
            return str(e)
    return None


def https_stream(port, ca_file):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ca_file),
                                       timeout=10)
    conn.request("POST", "/v1/chat/completions", body=chat_body("over tls", stream=True),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, r.getheader("content-type"), body


async def start_tls_gateway(gateway_factory, pki, mock, *extra):
    cert, key = pki["default"]
    gw = await gateway_factory("--port", "0", "--ssl-port", "0", "--bind", "127.0.0.1",
                               "--cert", cert, "--key", key, "--backend", mock.address, *extra)
    await until(lambda: HTTPS.search(gw.output) is not None, timeout=5)
    gw.tls_port = int(HTTPS.search(gw.output).group(1))
    return gw


@pytest_twisted.ensureDeferred
async def test_tls12_and_13_with_right_certificate_per_sni(tmp_path, pki, mocks, gateway_factory):
    import json as _json
    cfg = tmp_path / "tls.json"
    cfg.write_text(_json.dumps({"ssl": {"sni": {
        "api.example.test": {"cert_file": pki["api"][0], "key_file": pki["api"][1]},
        "*.wild.test": {"cert_file": pki["wild"][0], "key_file": pki["wild"][1]},
    }}}))
    gw = await start_tls_gateway(gateway_factory, pki, mocks[0], "--config", str(cfg))
    port, ca = gw.tls_port, pki["ca_file"]
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        v, names, alpn = await deferToThread(handshake, port, ca, "localhost", version, version)
        assert v == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        assert "localhost" in names and alpn == "http/1.1"
    v, names, _ = await deferToThread(handshake, port, ca, "api.example.test")
    assert v == "TLSv1.3" and names == ["api.example.test"]
    _, names, _ = await deferToThread(handshake, port, ca, "x.wild.test")
    assert names == ["*.wild.test"]
    _, names, _ = await deferToThread(handshake, port, ca, "localhost")  # default pair
    assert "localhost" in names
    assert b"Traceback" not in gw.output
    with pytest.raises(ssl.SSLCertVerificationError):
        # Two labels deep is not covered by *.wild.test: the default pair answers.
        await deferToThread(handshake, port, ca, "a.b.wild.test")


@pytest_twisted.ensureDeferred
async def test_old_protocols_refused(pki, mocks, gateway_factory):
    gw = await start_tls_gateway(gateway_factory, pki, mocks[0])
    assert await deferToThread(old_protocol_refused, gw.tls_port) is not None


@pytest_twisted.ensureDeferred
async def test_streamed_chat_over_https(pki, mocks, gateway_factory):
    a, _ = mocks
    a.knobs.itl_ms = 5
    gw = await start_tls_gateway(gateway_factory, pki, a)
    status, ctype, body = await deferToThread(https_stream, gw.tls_port, pki["ca_file"])
    assert status == 200 and ctype == "text/event-stream"
    assert body.endswith(b"data: [DONE]\n\n") and body.count(b"data: ") == 19
    assert a.stats.last_headers["x-forwarded-proto"] == "https"


def keepalive_session(port, ca_file):
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=client_context(ca_file),
                                       timeout=10)
    conn.request("GET", "/health")
    r = conn.getresponse()
    r.read()
    return conn, conn.sock.getpeercert(binary_form=True)


def again(conn):
    conn.request("GET", "/health")
    r = conn.getresponse()
    r.read()
    cert = conn.sock.getpeercert(binary_form=True)
    conn.close()
    return r.status, cert


@pytest_twisted.ensureDeferred
async def test_certificate_reload_on_sighup(pki, mocks, gateway_factory):
    gw = await start_tls_gateway(gateway_factory, pki, mocks[0])
    old_conn, old_cert = await deferToThread(keepalive_session, gw.tls_port, pki["ca_file"])
    cert_path, key_path = pki["default"]
    # A bad pair is refused and the old one stays.
    with open(cert_path, "rb") as fh:
        good = fh.read()
    with open(cert_path, "wb") as fh:
        fh.write(b"not a certificate")
    gw.terminate("HUP")
    await until(lambda: b"certificate reload refused" in gw.output, timeout=5)
    _, still = await deferToThread(keepalive_session, gw.tls_port, pki["ca_file"])
    assert still == old_cert
    # A good new pair is served to new connections; the old connection is untouched.
    write_pair(pki["dir"], "default", issue(pki["ca"], ["localhost", "127.0.0.1"]))
    gw.terminate("HUP")
    await until(lambda: b"certificates reloaded" in gw.output, timeout=5)
    _, new_cert = await deferToThread(keepalive_session, gw.tls_port, pki["ca_file"])
    assert new_cert != old_cert and new_cert != good
    status, cert_seen = await deferToThread(again, old_conn)
    assert status == 200 and cert_seen == old_cert


@pytest_twisted.ensureDeferred
async def test_plain_http_garbage_and_stalls_leave_gateway_serving(pki, mocks, gateway_factory):
    gw = await start_tls_gateway(gateway_factory, pki, mocks[0],
                                 "--set", "server.header_timeout_seconds=1")
    plain = await raw_connect(gw.tls_port)
    plain.transport.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    await within(plain.closed, 5)
    assert b"healthy" not in plain.received
    junk = await raw_connect(gw.tls_port)
    junk.transport.write(bytes(range(256)) * 8)
    await within(junk.closed, 5)
    stalled = await raw_connect(gw.tls_port)
    stalled.transport.write(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    await within(stalled.closed, 4)
    status, _, body = await deferToThread(https_stream, gw.tls_port, pki["ca_file"])
    assert status == 200 and body.endswith(b"data: [DONE]\n\n")
    assert b"Traceback" not in gw.output


@pytest.mark.parametrize("case,expected", [
    ("missing", 'ssl.cert_file = "{cert}" (--cert): cannot be read: No such file or directory'),
    ("directory", 'ssl.cert_file = "{cert}" (--cert): cannot be read: Is a directory'),
    ("not-pem", 'ssl.cert_file = "{cert}" (--cert): not a PEM certificate'),
    ("mismatch", 'ssl.key_file = "{key}" (--key): does not match the certificate in {cert}'),
    ("expired", 'ssl.cert_file = "{cert}" (--cert): certificate expired on'),
])
@pytest_twisted.ensureDeferred
async def test_bad_certificate_stops_start_with_one_line(tmp_path, pki, case, expected):
    cert, key = pki["default"]
    if case == "missing":
        cert = str(tmp_path / "nope.crt")
    elif case == "directory":
        cert = str(tmp_path)
    elif case == "not-pem":
        (tmp_path / "bad.crt").write_text("hello")
        cert = str(tmp_path / "bad.crt")
    elif case == "mismatch":
        key = pki["api"][1]
    elif case == "expired":
        cert, key = write_pair(tmp_path, "old", issue(pki["ca"], ["localhost"], expired=True))
    proc = await run_to_exit(["--port", "0", "--ssl-port", "0", "--cert", cert, "--key", key])
    out = proc.output.decode()
    lines = [line for line in out.splitlines() if line.strip()]
    assert proc.exit_code != 0 and "Traceback" not in out
    assert len(lines) == 1, out
    assert lines[0].startswith("ntonix: invalid configuration: "
                               + expected.format(cert=cert, key=key)), lines[0]


def resumed(port, ca_file, version):
    ctx = client_context(ca_file, version, version)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            if version == ssl.TLSVersion.TLSv1_3:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(4096)  # TLS 1.3 tickets arrive after the handshake
            session = s.session
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
            return s.session_reused


@pytest_twisted.ensureDeferred
async def test_session_resumption(pki, mocks, gateway_factory):
    gw = await start_tls_gateway(gateway_factory, pki, mocks[0])
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        assert await deferToThread(resumed, gw.tls_port, pki["ca_file"], version), version
