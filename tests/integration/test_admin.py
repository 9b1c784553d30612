"""The admin surface: the gateway's internals on their own listener (loopback
by default), on the public port only to a request bearing admin.token."""

import pytest_twisted

from harness import JSON, chat_body, http_client, within

ADMIN_PATHS = ["/metrics", "/metrics/prometheus", "/backends", "/cache/stats"]


async def get(url, headers=None):
    r = await within(http_client().get(url, headers=headers or {}), 5)
    return r.code, r, await within(r.content(), 5)


@pytest_twisted.ensureDeferred
async def test_internals_are_on_the_admin_listener_not_the_public_port(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address)
    assert f"admin api listening on 127.0.0.1:{gw.admin_port}".encode() in gw.output
    for path in ADMIN_PATHS:
        code, r, body = await get(gw.url + path)
        assert code == 404 and b"admin.http_port" in body, (path, body)
        code, _, _ = await get(gw.admin_url + path)
        assert code == 200, path
    # The public port keeps the API and the probes; the admin one has no API.
    for path in ("/", "/health", "/livez", "/readyz"):
        assert (await get(gw.url + path))[0] == 200
        assert (await get(gw.admin_url + path))[0] == 200
    r = await within(http_client().post(gw.admin_url + "/v1/chat/completions",
                                        data=chat_body(), headers=JSON), 5)
    assert r.code == 404 and a.stats.by_path.get("/v1/chat/completions", 0) == 0
    await r.content()
    r = await within(http_client().post(gw.url + "/v1/chat/completions", data=chat_body(),
                                        headers=JSON), 5)
    assert r.code == 200
    await r.content()


@pytest_twisted.ensureDeferred
async def test_token_opens_the_internals_on_the_public_port(mocks, gateway_factory):
    a, _ = mocks
    gw = await gateway_factory("--port", "0", "--backend", a.address,
                               "--set", "admin.token=s3cret-token")
    for path in ADMIN_PATHS:
        code, r, body = await get(gw.url + path)
        assert code == 401 and r.headers.getRawHeaders(b"www-authenticate") == [b"Bearer"]
        assert b'"code":"invalid_admin_token"' in body and b"s3cret" not in body
        code, _, _ = await get(gw.url + path, {b"Authorization": [b"Bearer wrong-token"]})
        assert code == 401
        code, _, _ = await get(gw.url + path, {b"Authorization": [b"Bearer s3cret-token"]})
        assert code == 200, path
    assert b"s3cret" not in gw.output  # never logged
