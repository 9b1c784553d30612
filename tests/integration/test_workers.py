"""server.workers: a supervising twistd process that accepts every
connection and hands it to the least busy worker process, through the real
plugin."""

import http.client
import json
import os
import re
import signal
import ssl
from collections import Counter

import pytest_twisted
import treq
from twisted.internet import defer
from twisted.internet.threads import deferToThread

from certs import issue, make_ca, write_ca, write_pair
from harness import (JSON, chat_body, http_client, raw_connect, raw_post, sleep, start_gateway,
                     stop_gateway, until, within)


async def workers(gw):
    r = await within(http_client().get(gw.admin_url + "/workers"), 5)
    return (await treq.json_content(r))["workers"]


async def until_workers(gw, n, timeout=20.0, exclude=()):
    """``n`` workers that take connections (started, and reported ready)."""
    waited = 0.0
    while True:
        ws = [w for w in await workers(gw)
              if w["alive"] and w["accepting"] and w["pid"] not in exclude]
        if len(ws) >= n:
            return ws
        assert waited < timeout, ws
        await sleep(0.1)
        waited += 0.1


async def chat(gw, text="hi"):
    r = await within(http_client().post(gw.url + "/v1/chat/completions",
                                        data=chat_body(text, temperature=0), headers=JSON), 10)
    await treq.content(r)
    return r


@pytest_twisted.ensureDeferred
async def test_two_workers_share_the_traffic_and_metrics_sum_exactly(mocks):
    a, _ = mocks
    gw = await start_gateway(["--port", "0", "--backend", a.address,
                              "--set", "server.workers=2", "--set", "cache.enabled=false"])
    try:
        await until_workers(gw, 2)
        prefixes = set()
        n = 60
        for i in range(n):
            r = await chat(gw, f"q {i}")
            assert r.code == 200
            prefixes.add(r.headers.getRawHeaders(b"x-request-id")[0][:8])
        assert len(prefixes) == 2, f"one worker took every connection: {prefixes}"
        r = await within(http_client().get(gw.admin_url + "/metrics/prometheus"), 5)
        text = (await treq.content(r)).decode()
        served = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("ntonix_requests_total{") and 'route="chat"' in line)
        assert served == n, text[:2000]
        assert "ntonix_workers 2.0" in text
        r = await within(http_client().get(gw.admin_url + "/metrics"), 5)
        assert (await treq.json_content(r))["requests_total"] >= n
        for path in ("/livez", "/readyz", "/health"):
            r = await within(http_client().get(gw.admin_url + path), 5)
            await treq.content(r)
            assert r.code == 200, path
    finally:
        await stop_gateway(gw)


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_replaced_and_the_other_keeps_serving(mocks):
    a, _ = mocks
    gw = await start_gateway(["--port", "0", "--backend", a.address,
                              "--set", "server.workers=2"])
    try:
        ws = await until_workers(gw, 2)
        victim = ws[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        codes = []
        for i in range(30):  # meanwhile: every request answered
            r = await chat(gw, f"during {i}")
            codes.append(r.code)
        assert codes == [200] * 30
        ws = await until_workers(gw, 2, exclude=(victim,))
        assert victim not in {w["pid"] for w in ws}
        assert "worker 1 (pid" in gw.output.decode() and "starting it again" in gw.output.decode()
    finally:
        await stop_gateway(gw)


@pytest_twisted.ensureDeferred
async def test_sighup_reaches_every_worker(mocks):
    a, _ = mocks
    gw = await start_gateway(["--port", "0", "--backend", a.address,
                              "--set", "server.workers=2"])
    try:
        await until_workers(gw, 2)
        gw.terminate("HUP")
        for _ in range(100):
            out = gw.output.decode()
            if "worker 0 reloaded" in out and "worker 1 reloaded" in out:
                break
            await sleep(0.1)
        else:
            raise AssertionError(gw.output.decode()[-3000:])
    finally:
        await stop_gateway(gw)


def answered_by(received: bytes) -> bytes:
    """Which worker answered: the per-process prefix of its request ids."""
    return received.split(b"X-Request-ID: ", 1)[1][:8]


def connect_all(port, n):
    """``n`` connections opened at once; fires when all are connected."""
    return defer.gatherResults([defer.ensureDeferred(raw_connect(port)) for _ in range(n)])


async def refused(port, timeout=5.0):
    """Connect until the connection is refused; False if it never was."""
    deadline = timeout
    while deadline > 0:
        try:
            probe = await raw_connect(port)
        except Exception as e:
            assert "refused" in str(e).lower(), e
            return True
        probe.transport.loseConnection()
        await within(probe.closed, 5)
        await sleep(0.02)
        deadline -= 0.02
    return False


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_streams_on_every_worker(mocks):
    a, _ = mocks
    a.knobs.itl_ms = 50
    gw = await start_gateway(["--port", "0", "--backend", a.address, "--set", "server.workers=2",
                              "--set", "cache.enabled=false"])
    try:
        await until_workers(gw, 2)
        clients = await connect_all(gw.port, 16)
        for i, c in enumerate(clients):
            c.transport.write(raw_post(chat_body(f"stream {i}", stream=True, max_tokens=30),
                                       close=True))
        # Every stream under way: its first event arrived.
        await until(lambda: all(b"data: " in c.received for c in clients), timeout=10)
        gw.terminate("TERM")
        # Draining: new connections are refused while the streams go on.
        assert await refused(gw.port), "a draining gateway still accepts connections"
        assert not all(c.closed.called for c in clients), "the drain was over already"
        await defer.gatherResults([within(c.closed, 20) for c in clients])
        for c in clients:
            assert c.status == 200 and b"data: [DONE]" in c.received, c.received[-200:]
        # Both workers carried streams, and as evenly as a burst is promised
        # to be split (no worker more than 5/8 of them).
        split = Counter(answered_by(c.received) for c in clients)
        assert len(split) == 2 and all(6 <= n <= 10 for n in split.values()), split
        await within(gw.ended, 30)  # twistd ends as SIGTERM'd processes do
        out = gw.output.decode()
        assert "did not stop" not in out and "Traceback" not in out, out[-3000:]
    finally:
        await stop_gateway(gw)


@pytest_twisted.ensureDeferred
async def test_health_checks_run_once_per_machine_and_every_worker_sees_a_circuit_open(mocks):
    a, b = mocks
    gw = await start_gateway(["--port", "0", "--backend", a.address, "--backend", b.address,
                              "--set", "server.workers=2", "--set", "health.interval_seconds=0.2",
                              "--set", "health.failure_threshold=1",
                              "--set", "cache.enabled=false"])
    try:
        await until_workers(gw, 2)
        before = a.count("/health")
        await sleep(2.0)
        checks = a.count("/health") - before
        assert 6 <= checks <= 13, f"{checks} health checks of one backend in 2 s at 0.2 s"
        await b.kill()
        await sleep(0.6)  # three check intervals: worker 0 opened b's circuit, 1 was told
        r = await within(http_client().get(gw.admin_url + "/backends"), 5)
        state = {x["name"]: x["circuit"] for x in (await treq.json_content(r))["backends"]}
        assert state[b.address] == "open", state
        prefixes = set()
        for i in range(30):
            r = await chat(gw, f"after {i}")
            assert r.code == 200
            prefixes.add(r.headers.getRawHeaders(b"x-request-id")[0][:8])
        assert len(prefixes) == 2  # both workers answered, neither tried the dead backend
        r = await within(http_client().get(gw.admin_url + "/metrics/prometheus"), 5)
        text = (await treq.content(r)).decode()
        errors_b = sum(float(line.split()[-1]) for line in text.splitlines()
                       if line.startswith("ntonix_backend_errors_total{")
                       and b.address in line)
        # Worker 0's failed health checks only: no request was sent to it.
        sent_b = sum(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("ntonix_backend_requests_total{") and b.address in line)
        assert sent_b == 0, (sent_b, errors_b)
    finally:
        await stop_gateway(gw)


async def until_open(gw, n, timeout=5.0):
    """The workers, once their open connections add up to ``n``."""
    waited = 0.0
    while True:
        ws = await workers(gw)
        if sum(w["connections_open"] for w in ws) == n:
            return ws
        assert waited < timeout, ws
        await sleep(0.05)
        waited += 0.05


@pytest_twisted.ensureDeferred
async def test_a_burst_of_connections_is_split_evenly_between_the_workers(mocks):
    a, _ = mocks
    n = 64
    gw = await start_gateway(["--port", "0", "--backend", a.address, "--set", "server.workers=2",
                              "--set", "cache.enabled=false"])
    try:
        await until_workers(gw, 2)
        # All connected before any request is sent; each connection then
        # carries one request and stays open.
        clients = await connect_all(gw.port, n)
        for i, c in enumerate(clients):
            c.transport.write(raw_post(chat_body(f"burst {i}", temperature=0)))
        await until(lambda: all(b"\r\n\r\n" in c.received for c in clients), timeout=20)
        assert all(c.status == 200 for c in clients)
        by_answer = Counter(answered_by(c.received) for c in clients)
        # The supervisor's view: what it handed out and the workers' reports.
        ws = await until_open(gw, n)
        split = [w["connections_open"] for w in ws]
        print(f"burst of {n}: connections per worker {split}, answers per worker "
              f"{sorted(by_answer.values())}")
        assert sum(split) == n, ws
        assert sorted(split) == sorted(by_answer.values()), (split, by_answer)
        assert all(24 <= k <= 40 for k in split), split
        # The workers saw the clients' own address (the access log, and the
        # X-Forwarded-For the backend got).
        assert a.stats.last_headers["x-forwarded-for"] == "127.0.0.1"
        assert b"127.0.0.1 POST /v1/chat/completions 200" in gw.output
        for c in clients:
            c.transport.loseConnection()
        await defer.gatherResults([within(c.closed, 5) for c in clients])
    finally:
        await stop_gateway(gw)


HTTPS_LISTENING = re.compile(rb"https listening on [0-9.]+:(\d+)")


def https_chats(port, ca_file, n):
    """``n`` chats over HTTPS, each on its own connection: (status, worker)."""
    ctx = ssl.create_default_context(cafile=ca_file)
    out = []
    for i in range(n):
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=chat_body(f"tls {i}", temperature=0),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        out.append((r.status, r.getheader("x-request-id")[:8]))
        conn.close()
    return out


@pytest_twisted.ensureDeferred
async def test_https_through_the_supervisor_reaches_both_workers(tmp_path, mocks):
    a, _ = mocks
    ca = make_ca()
    ca_file = write_ca(tmp_path, ca)
    cert, key = write_pair(tmp_path, "default", issue(ca, ["localhost", "127.0.0.1"]))
    gw = await start_gateway(["--port", "0", "--ssl-port", "0", "--bind", "127.0.0.1",
                              "--cert", cert, "--key", key, "--backend", a.address,
                              "--set", "server.workers=2", "--set", "cache.enabled=false"])
    try:
        await until(lambda: HTTPS_LISTENING.search(gw.output) is not None, timeout=5)
        port = int(HTTPS_LISTENING.search(gw.output).group(1))
        await until_workers(gw, 2)
        answers = await deferToThread(https_chats, port, ca_file, 6)
        assert [status for status, _ in answers] == [200] * 6
        assert len({w for _, w in answers}) == 2, answers  # both workers serve HTTPS
        assert a.stats.last_headers["x-forwarded-proto"] == "https"
        assert a.stats.last_headers["x-forwarded-for"] == "127.0.0.1"
        # And plain HTTP beside it, on the same workers.
        r = await chat(gw)
        assert r.code == 200
    finally:
        await stop_gateway(gw)


TOKEN = "s3cret-admin-token"
BEARER = {b"Authorization": [f"Bearer {TOKEN}".encode()]}


async def fetch(url, headers=None):
    r = await within(http_client().get(url, headers=headers or {}), 10)
    return r.code, r.headers, await within(treq.content(r), 10)


def request_counts(page: bytes):
    """The ntonix_requests_total series of a Prometheus page, but those of
    the metrics route: reading the page on the public port is a request."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in page.decode().splitlines()
            if line.startswith("ntonix_requests_total{") and 'route="metrics"' not in line}


async def spread_chats(gw, n):
    """``n`` chats, each on a new connection; both workers must take some."""
    prefixes = set()
    for i in range(n):
        r = await chat(gw, f"wide {i}")
        assert r.code == 200
        prefixes.add(r.headers.getRawHeaders(b"x-request-id")[0][:8])
    assert len(prefixes) == 2, f"one worker took every connection: {prefixes}"


@pytest_twisted.ensureDeferred
async def test_the_public_ports_admin_routes_are_the_whole_gateways(mocks):
    a, _ = mocks
    n = 200
    gw = await start_gateway(["--port", "0", "--backend", a.address,
                              "--set", "server.workers=2", "--set", f"admin.token={TOKEN}"])
    try:
        await until_workers(gw, 2)
        await spread_chats(gw, n)
        code, headers, public = await fetch(gw.url + "/metrics/prometheus", BEARER)
        assert code == 200 and b"ntonix_workers 2.0" in public
        assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        _, _, admin = await fetch(gw.admin_url + "/metrics/prometheus")
        counts = request_counts(public)
        assert counts == request_counts(admin)
        assert sum(v for k, v in counts.items() if 'route="chat"' in k) == n, counts
        # /metrics as a scraper asks for it: the same page.
        _, _, scraped = await fetch(gw.url + "/metrics",
                                    {**BEARER, b"Accept": [b"text/plain;version=0.0.4"]})
        assert request_counts(scraped) == counts
        # JSON: every request so far, the two metrics requests on the public
        # port included; the admin listener's answer adds this third one.
        code, _, body = await fetch(gw.url + "/metrics", BEARER)
        assert code == 200 and json.loads(body)["requests_total"] == n + 2
        _, _, body = await fetch(gw.admin_url + "/metrics")
        assert json.loads(body)["requests_total"] == n + 3
        for path in ("/cache/stats", "/admission"):
            code, _, body = await fetch(gw.url + path, BEARER)
            doc = json.loads(body)
            assert code == 200 and len(doc["workers"]) == 2, (path, doc)
            _, _, body = await fetch(gw.admin_url + path)
            assert json.loads(body).keys() == doc.keys(), path
        _, _, body = await fetch(gw.url + "/cache/stats", BEARER)
        cache = json.loads(body)
        assert cache["hits"] + cache["misses"] == n, cache
        code, _, body = await fetch(gw.url + "/backends", BEARER)
        assert code == 200 and [b["name"] for b in json.loads(body)["backends"]] == [a.address]
        code, _, _ = await fetch(gw.url + "/metrics")
        assert code == 401  # still the token's
    finally:
        await stop_gateway(gw)


@pytest_twisted.ensureDeferred
async def test_without_an_admin_listener_the_public_port_still_shows_every_worker(mocks):
    a, _ = mocks
    n = 200
    gw = await start_gateway(["--port", "0", "--backend", a.address, "--set", "server.workers=2",
                              "--set", f"admin.token={TOKEN}", "--set", "admin.http_port=-1"])
    try:
        assert b"admin api listening" not in gw.output
        await spread_chats(gw, n)
        pages = []
        for _ in range(4):  # whichever worker takes the connection
            code, _, page = await fetch(gw.url + "/metrics/prometheus", BEARER)
            assert code == 200 and b"ntonix_workers 2.0" in page
            pages.append(request_counts(page))
        assert all(p == pages[0] for p in pages), pages
        assert sum(v for k, v in pages[0].items() if 'route="chat"' in k) == n, pages[0]
        code, _, body = await fetch(gw.url + "/metrics", BEARER)
        assert code == 200 and json.loads(body)["requests_total"] == n + 4
    finally:
        await stop_gateway(gw)
