"""Backends over HTTPS: certificates the test makes, checked by the gateway
against proxy.ca_file, for plain and streamed answers, health checks and the
model list; a backend whose certificate the gateway cannot trust is an
upstream error, never a relayed answer."""

import pytest
import pytest_twisted
from twisted.internet import reactor, ssl
from twisted.internet.utils import getProcessOutputAndValue

from certs import issue, make_ca, write_ca, write_pair
from harness import JSON, TWISTD, chat_body, http_client, until, within
from ntonix_mock.server import Knobs, make_site


@pytest_twisted.async_yield_fixture
async def tls_backend(tmp_path):
    """A mock backend serving HTTPS on 127.0.0.1 with a certificate from a
    CA of the test's own."""
    ca = make_ca()
    cert_file, key_file = write_pair(tmp_path, "backend", issue(ca, ["127.0.0.1", "localhost"]))
    with open(cert_file, "rb") as c, open(key_file, "rb") as k:
        options = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
    site = make_site("tls-a", Knobs(), reactor)
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    site.ca_file = write_ca(tmp_path, ca)
    site.url = f"https://127.0.0.1:{port.getHost().port}"
    yield site
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_https_backend_checked_against_ca_file(tls_backend, gateway_factory):
    gw = await gateway_factory("--port", "0", "--backend", tls_backend.url,
                               "--set", f"proxy.ca_file={tls_backend.ca_file}",
                               "--set", "health.interval_seconds=0.2")
    r = await within(http_client().post(gw.url + "/v1/chat/completions",
                                        data=chat_body("over tls"), headers=JSON), 10)
    assert r.code == 200, await r.text()
    assert r.headers.getRawHeaders(b"x-backend") == [tls_backend.url.encode()]
    assert (await r.json())["object"] == "chat.completion"
    r = await within(http_client().post(gw.url + "/v1/chat/completions",
                                        data=chat_body("streamed over tls", stream=True),
                                        headers=JSON), 10)
    body = await within(r.content(), 10)
    assert r.code == 200 and body.endswith(b"data: [DONE]\n\n")
    # The control plane speaks HTTPS too: health checks and the model list.
    r = await within(http_client().get(gw.url + "/v1/models"), 10)
    assert r.code == 200 and (await r.json())["data"][0]["id"] == "mock-llm"
    await until(lambda: tls_backend.resource.stats.by_path.get("/health", 0) >= 2, timeout=5)
    r = await within(http_client().get(gw.admin_url + "/backends"), 5)
    [b] = (await r.json())["backends"]
    assert b["tls"] is True and b["state"] == "healthy"
    # Pooled: one connection carried the requests made one at a time.
    r = await within(http_client().get(gw.admin_url + "/metrics/prometheus"), 5)
    text = (await r.content()).decode()
    opened = [line for line in text.splitlines()
              if line.startswith("ntonix_backend_connections_opened_total")]
    assert opened and float(opened[0].rsplit(" ", 1)[1]) <= 2, opened


@pytest_twisted.ensureDeferred
async def test_untrusted_https_backend_is_an_upstream_error(tls_backend, gateway_factory):
    # The system CAs do not know the test's CA: the answer must not be relayed.
    gw = await gateway_factory("--port", "0", "--backend", tls_backend.url,
                               "--set", "health.interval_seconds=3600")
    r = await within(http_client().post(gw.url + "/v1/chat/completions",
                                        data=chat_body("untrusted"), headers=JSON), 10)
    assert r.code == 502
    err = (await r.json())["error"]
    assert err["code"] == "upstream_unreachable"
    assert tls_backend.resource.stats.by_path.get("/v1/chat/completions", 0) == 0


@pytest.mark.parametrize("args, expected", [
    (["--backend", "ftp://10.0.0.5:21"], "scheme 'ftp' is not http or https"),
    (["--backend", "https://10.0.0.5:8443/v1"], "a backend URL has no path"),
    (["--set", "proxy.ca_file=/nonexistent/ca.pem"], 'proxy.ca_file = "/nonexistent/ca.pem": '
                                                     "cannot read it"),
])
@pytest_twisted.ensureDeferred
async def test_unusable_backend_url_or_ca_file_is_one_line(args, expected):
    out, err, code = await within(getProcessOutputAndValue(
        str(TWISTD), ["-n", "--pidfile=", "ntonix", "--port", "0", *args]), 20)
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and expected in lines[0], (out, err)
    assert b"Traceback" not in out + err
