"""The shared Redis tier does not trust Redis (#23 item 5), through real
gateway processes and a real redis-server: someone who can write to the
Redis cannot make a gateway send a header (an entry or a live answer with
"a\\r\\nSet-Cookie: evil=1" in a value), a malformed entry is a miss and no
traceback, an entry sealed with another secret is a miss, rediss:// speaks
TLS with the server's certificate checked, and a Redis URL's password
appears nowhere.

The attacker's writes go through a plain RedisClient, in the format the
gateway under test reads (sealed with an empty key when the deployment has
no secret: anyone can compute that tag)."""

import json
import shutil

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor

from certs import issue, make_ca, write_ca, write_pair
from harness import (free_port, http_client, run_to_exit, sleep, start_gateway, stop_gateway,
                     within)
from test_redis_client import RedisServer, failure_of
from test_shared_cache import ask, cache_label

from ntonix.cache.redis_client import RedisClient, RedisUnavailable

try:
    from ntonix.cache.sealed import ENTRY_MAGIC, TAG_BYTES, Seal
except ImportError:  # a gateway from before entries were sealed: they are bare
    ENTRY_MAGIC, TAG_BYTES, Seal = b"", 0, None

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None,
                                reason="Debian's redis-server is not installed here")

SECRET = "the deployment's redis secret"
SERVER_SECRET = {"NTONIX_SERVER_SECRET": "shared by every gateway here"}
POISON = "a\r\nSet-Cookie: evil=1"


@pytest_twisted.async_yield_fixture
async def redis():
    s = RedisServer()
    await s.start()
    s.url = f"redis://127.0.0.1:{s.port}/0"
    yield s
    await s.stop()
    shutil.rmtree(s.dir, ignore_errors=True)


@pytest_twisted.async_yield_fixture
async def attacker(redis):
    """Someone with write access to the Redis, and no secret."""
    c = RedisClient(reactor, "127.0.0.1", redis.port, command_timeout=2.0)
    yield c
    await within(c.close(), 5)


async def gateways(redis_url, mock, n=2, secret=None, extra=()):
    args = ["--port", "0", "--backend", mock.address, "--set", f"cache.redis_url={redis_url}",
            *extra]
    if secret:
        args += ["--set", f"cache.redis_secret={secret}"]
    out = []
    try:
        for _ in range(n):
            out.append(await start_gateway(args, env=SERVER_SECRET))
    except BaseException:
        for g in out:
            await stop_gateway(g)
        raise
    return out


async def asked(gw, attacker, text):
    """Ask ``gw`` and wait (bounded) for the answer's entry to reach Redis:
    (response, its body, Redis key, head, stored body). The store follows
    the answer by a moment."""
    before = set(await within(attacker.execute(b"KEYS", b"ntonix:v1:e:*"), 5))
    r, answer = await ask(gw, text)
    for _ in range(200):
        new = set(await within(attacker.execute(b"KEYS", b"ntonix:v1:e:*"), 5)) - before
        if new:
            (rkey,) = new
            data = await within(attacker.execute(b"GET", rkey), 5)
            if ENTRY_MAGIC and data.startswith(ENTRY_MAGIC):
                data = data[len(ENTRY_MAGIC) + TAG_BYTES:]
            n, _, rest = data.partition(b"\n")
            return r, answer, rkey, json.loads(rest[:int(n)]), rest[int(n):]
        await sleep(0.01)
    raise AssertionError(f"no entry stored for {text!r}")


def bare(head, body):
    h = json.dumps(head).encode()
    return b"%d\n" % len(h) + h + body


async def overwrite(attacker, rkey, data):
    await within(attacker.execute(b"SET", rkey, data, b"PX", 60_000), 5)


async def replaced(attacker, rkey, written):
    """Until what was written at ``rkey`` is gone: deleted as refused, and
    the answer of the gateway that then asked a backend stored (bounded)."""
    for _ in range(200):
        data = await within(attacker.execute(b"GET", rkey), 5)
        if data is not None and data != written:
            return data
        await sleep(0.01)
    raise AssertionError("the refused entry is still there")


def anyone_can_seal(rkey, body):
    """What a deployment without a secret accepts: tagged with an empty key."""
    return Seal().seal_body(rkey, body) if Seal is not None else body


async def metrics(gw):
    r = await within(http_client().get(gw.admin_url + "/metrics/prometheus"), 5)
    return (await within(treq.content(r), 5)).decode()


def set_cookie(r):
    return r.headers.getRawHeaders(b"set-cookie")


@pytest_twisted.ensureDeferred
async def test_a_header_injected_into_an_entry_never_reaches_a_client(redis, attacker, mocks):
    m, _ = mocks
    a, b = await gateways(redis.url, m)
    try:
        r, _, rkey, head, body = await asked(a, attacker, "poison me")
        assert cache_label(r) == b"MISS"
        head["headers"].append(["X-Poison", POISON])
        poisoned = anyone_can_seal(rkey, bare(head, body))
        await overwrite(attacker, rkey, poisoned)

        r, answer = await ask(b, "poison me")
        assert r.code == 200 and json.loads(answer)["object"] == "chat.completion"
        assert set_cookie(r) is None and r.headers.getRawHeaders(b"x-poison") is None
        assert cache_label(r) == b"MISS" and m.count() == 2  # from the backend again
        assert 'ntonix_redis_rejected_total{kind="entry",reason="malformed"} 1.0' \
            in await metrics(b)
        # The poisoned entry is gone, b's own answer stored instead.
        assert POISON.encode() not in await replaced(attacker, rkey, poisoned)
        # No secret: said once at start.
        assert a.output.decode().count("cache.redis_secret is not") == 1
    finally:
        await stop_gateway(a)
        await stop_gateway(b)


MALFORMED_HEADS = {
    "the phrase a number": lambda h: h.update(phrase=200),
    "a header value a number": lambda h: h["headers"].append(["X-A", 1]),
    "sizes a string": lambda h: h.update(sizes="many"),
    "pacing times nested": lambda h: h.update(times=[[[0]]]),
}
DEEP = b"[" * 100_000 + b"]" * 100_000
GARBAGE = {
    "not UTF-8": lambda rkey: b"\xff" * 64,
    "a length of 5000 digits": lambda rkey: b"9" * 5000 + b"\n{}",
    "a head nested past the recursion limit":
        lambda rkey: anyone_can_seal(rkey, b"%d\n" % len(DEEP) + DEEP),
}


@pytest_twisted.ensureDeferred
async def test_a_malformed_entry_is_a_miss_never_a_traceback(redis, attacker, mocks):
    m, _ = mocks
    a, b = await gateways(redis.url, m)
    try:
        for i, (name, spoil) in enumerate(sorted(MALFORMED_HEADS.items())):
            _, _, rkey, head, body = await asked(a, attacker, f"malformed {i}")
            spoil(head)
            spoiled = anyone_can_seal(rkey, bare(head, body))
            await overwrite(attacker, rkey, spoiled)
            r, answer = await ask(b, f"malformed {i}")
            assert r.code == 200, (name, answer)
            assert cache_label(r) == b"MISS", name
            assert json.loads(answer)["object"] == "chat.completion", name
            await replaced(attacker, rkey, spoiled)
        # Raw bytes that are no entry at all, and a key of another type.
        for i, (name, garbage) in enumerate(sorted(GARBAGE.items())):
            _, _, rkey, _, _ = await asked(a, attacker, f"garbage {i}")
            await overwrite(attacker, rkey, garbage(rkey))
            r, _ = await ask(b, f"garbage {i}")
            assert r.code == 200 and cache_label(r) == b"MISS", name
            await replaced(attacker, rkey, garbage(rkey))
        _, _, rkey, _, _ = await asked(a, attacker, "wrong type")
        await within(attacker.execute(b"DEL", rkey), 5)
        await within(attacker.execute(b"RPUSH", rkey, b"x"), 5)
        r, _ = await ask(b, "wrong type")
        assert r.code == 200 and cache_label(r) == b"MISS"
        for _ in range(200):  # the list deleted, b's answer stored
            if await within(attacker.execute(b"TYPE", rkey), 5) == "string":
                break
            await sleep(0.01)
        else:
            raise AssertionError("the key of another type is still there")
        assert m.count() == 2 * (len(MALFORMED_HEADS) + len(GARBAGE) + 1)
        output = b.output.decode(errors="replace")
        assert "Traceback" not in output and "CRITICAL" not in output.upper(), output[-3000:]
        assert "Unhandled" not in output
        r = await within(http_client().get(b.url + "/health"), 5)
        assert (await treq.json_content(r))["status"] == "healthy"  # Redis itself is fine
    finally:
        await stop_gateway(a)
        await stop_gateway(b)


@pytest_twisted.ensureDeferred
async def test_with_a_secret_only_entries_sealed_with_it_are_taken(redis, attacker, mocks):
    m, _ = mocks
    a, b = await gateways(redis.url, m, secret=SECRET)
    try:
        # The same secret: shared as ever.
        r1, body1, _, _, _ = await asked(a, attacker, "sealed")
        r2, body2 = await ask(b, "sealed")
        assert (cache_label(r1), cache_label(r2)) == (b"MISS", b"HIT") and body1 == body2

        # A well-formed header added, the tag kept (it cannot be made anew).
        _, _, rkey, head, body = await asked(a, attacker, "tampered")
        data = await within(attacker.execute(b"GET", rkey), 5)
        head["headers"].append(["Set-Cookie", "evil=1"])
        tampered = data[:len(ENTRY_MAGIC) + TAG_BYTES] + bare(head, body)
        await overwrite(attacker, rkey, tampered)
        r, _ = await ask(b, "tampered")
        assert r.code == 200 and cache_label(r) == b"MISS" and set_cookie(r) is None
        await replaced(attacker, rkey, tampered)

        # An entry sealed with another secret (another deployment, or a guess).
        _, _, rkey, head, body = await asked(a, attacker, "foreign")
        head["headers"].append(["Set-Cookie", "evil=1"])
        other = Seal(b"not the deployment's secret").seal_body(rkey, bare(head, body))
        await overwrite(attacker, rkey, other)
        r, _ = await ask(b, "foreign")
        assert r.code == 200 and cache_label(r) == b"MISS" and set_cookie(r) is None
        assert m.count() == 5
        assert 'ntonix_redis_rejected_total{kind="entry",reason="unauthenticated"} 2.0' \
            in await metrics(b)
        r = await within(http_client().get(b.admin_url + "/cache/stats"), 5)
        shared = (await treq.json_content(r))["shared"]
        assert shared["rejected"] == 2 and shared["authenticated"] is True
    finally:
        await stop_gateway(a)
        await stop_gateway(b)


async def forge_leader(attacker, rkey, records, secret=b""):
    """A lease naming a stream that holds ``records`` ((kind, data) pairs),
    as a gateway leading an answer would leave them."""
    token = b"0123456789abcdef-1"
    hexkey = rkey.rsplit(b":", 1)[1]
    stream = b"ntonix:v1:s:" + hexkey + b":" + token
    await within(attacker.execute(b"DEL", rkey), 5)
    await within(attacker.execute(b"SET", b"ntonix:v1:l:" + hexkey, token, b"PX", 60_000), 5)
    for n, (kind, data) in enumerate(records):
        fields = [b"k", kind, b"n", b"%d" % n, b"d", data]
        if Seal is not None:
            fields += [b"m", Seal(secret).record_tag(stream, b"%d" % n, kind, data)]
        await within(attacker.execute(b"XADD", stream, b"*", *fields), 5)


FORGED_BODY = json.dumps({"object": "forged"}).encode()


@pytest.mark.parametrize("secret", [None, SECRET])
@pytest_twisted.ensureDeferred
async def test_a_forged_live_answer_is_not_relayed(redis, attacker, mocks, secret):
    m, _ = mocks
    a, b = await gateways(redis.url, m, secret=secret)
    try:
        _, _, rkey, _, _ = await asked(a, attacker, "live")  # to learn the question's key
        headers = [["Content-Type", "application/json"],
                   ["X-A", POISON] if secret is None else ["Set-Cookie", "evil=1"]]
        head = json.dumps({"code": 200, "phrase": "OK", "sse": False, "headers": headers})
        # Without a secret the tags are right (anyone can make them) and the
        # head is refused for its header; with one, the tags are wrong.
        await forge_leader(attacker, rkey, [(b"head", head.encode()), (b"data", FORGED_BODY),
                                            (b"end", b"")])
        r, answer = await ask(b, "live")
        assert r.code == 200 and set_cookie(r) is None and r.headers.getRawHeaders(b"x-a") is None
        assert json.loads(answer)["object"] == "chat.completion", answer
        assert m.count() == 2
        reason = "malformed" if secret is None else "unauthenticated"
        assert f'ntonix_redis_rejected_total{{kind="record",reason="{reason}"}}' \
            in await metrics(b)
        assert "Traceback" not in b.output.decode(errors="replace")
    finally:
        await stop_gateway(a)
        await stop_gateway(b)


# -- rediss://

@pytest.fixture
def pki(tmp_path):
    ca = make_ca()
    server = write_pair(tmp_path, "redis", issue(ca, ["127.0.0.1"]))
    misnamed = write_pair(tmp_path, "misnamed", issue(ca, ["redis.example"]))
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    return {"ca": write_ca(tmp_path, ca), "server": server, "misnamed": misnamed,
            "other_ca": write_ca(other_dir, make_ca("Another CA"))}


def tls_redis(pki, pair="server"):
    """redis-server with a plain port (for the test's own writes) and a TLS
    one (for the gateways), no client certificates asked; not started."""
    cert, key = pki[pair]
    s = RedisServer("--tls-port", str(free_port()), "--tls-cert-file", cert,
                    "--tls-key-file", key, "--tls-ca-cert-file", pki["ca"],
                    "--tls-auth-clients", "no")
    s.tls_port = int(s.extra[1])
    return s


@pytest_twisted.async_yield_fixture
async def servers():
    """Start redis-servers with ``await servers(server)``; each is stopped
    at teardown, whatever the test did."""
    started = []

    async def start(server):
        started.append(server)
        await server.start()
        return server

    yield start
    for server in started:
        await server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)


@pytest_twisted.ensureDeferred
async def test_the_client_speaks_tls_and_checks_the_certificate(pki, servers):
    s = await servers(tls_redis(pki))
    clients = []

    def client(url, ca):
        c = RedisClient.from_url(reactor, url, ca_file=ca, connect_timeout=2.0,
                                 command_timeout=2.0)
        clients.append(c)
        return c

    try:
        url = f"rediss://127.0.0.1:{s.tls_port}/3"
        c = client(url, pki["ca"])
        assert await within(c.execute(b"SET", b"k", b"v" * 100_000), 5) == "OK"
        assert await within(c.execute(b"GET", b"k"), 5) == b"v" * 100_000
        assert b" db=3 " in await within(c.execute(b"CLIENT", b"INFO"), 5)
        read = c.blocking(b"XREAD", b"BLOCK", 2000, b"STREAMS", b"s", b"0", timeout=3)
        await within(c.execute(b"XADD", b"s", b"*", b"f", b"v"), 5)
        assert (await within(read, 5))[0][1][0][1] == [b"f", b"v"]
        # A certificate from another CA, or for another name: never used.
        e = await failure_of(client(url, pki["other_ca"]).execute(b"PING"), 5)
        assert isinstance(e, RedisUnavailable)
        # Plain TCP to the TLS port: a failure, not a hang.
        e = await failure_of(client(f"redis://127.0.0.1:{s.tls_port}/0", None)
                             .execute(b"PING"), 5)
        assert isinstance(e, RedisUnavailable)
        misnamed = await servers(tls_redis(pki, "misnamed"))
        e = await failure_of(client(f"rediss://127.0.0.1:{misnamed.tls_port}/0", pki["ca"])
                             .execute(b"PING"), 5)
        assert isinstance(e, RedisUnavailable)
    finally:
        for c in clients:
            await within(c.close(), 5)


@pytest_twisted.ensureDeferred
async def test_gateways_share_over_rediss_and_refuse_an_unknown_certificate(pki, mocks,
                                                                            servers):
    m, _ = mocks
    s = await servers(tls_redis(pki))
    url = f"rediss://127.0.0.1:{s.tls_port}/0"
    attacker = RedisClient(reactor, "127.0.0.1", s.port, command_timeout=2.0)  # plain port
    started = []
    try:
        started += await gateways(url, m, secret=SECRET,
                                  extra=["--set", f"cache.redis_ca_file={pki['ca']}"])
        started += await gateways(url, m, n=1, secret=SECRET,
                                  extra=["--set", f"cache.redis_ca_file={pki['other_ca']}"])
        a, b, c = started
        r1, body1, _, _, _ = await asked(a, attacker, "over tls")
        r2, body2 = await ask(b, "over tls")
        assert (cache_label(r1), cache_label(r2)) == (b"MISS", b"HIT") and body1 == body2
        # A gateway that does not trust the certificate serves on its own.
        for i in range(4):
            r, _ = await ask(c, f"untrusted {i}")
            assert r.code == 200
        r = await within(http_client().get(c.url + "/health"), 5)
        assert (await treq.json_content(r))["cache_tier"] == "degraded"
        assert "certificate verify failed" in c.output.decode(errors="replace")
    finally:
        await within(attacker.close(), 5)
        for g in started:
            await stop_gateway(g)


# -- the password

PASSWORD = "hunter2-redis-pw"


@pytest_twisted.ensureDeferred
async def test_the_redis_password_appears_nowhere(mocks, servers):
    m, _ = mocks
    s = await servers(RedisServer("--requirepass", PASSWORD))
    url = f"redis://:{PASSWORD}@127.0.0.1:{s.port}/0"
    (g,) = await gateways(url, m, n=1)
    try:
        r, _ = await ask(g, "with a password")
        assert r.code == 200
        seen = [await metrics(g)]
        for path in ("/health", "/cache/stats", "/backends"):
            r = await within(http_client().get(g.admin_url + path), 5)
            seen.append((await within(treq.content(r), 5)).decode())
        r = await within(http_client().get(g.url + "/health"), 5)
        seen.append((await within(treq.content(r), 5)).decode())
        await s.stop()  # the log lines of a Redis gone
        for i in range(4):
            await ask(g, f"redis gone {i}")
        seen.append(g.output.decode(errors="replace"))
        assert "redis unusable" in seen[-1]
        for text in seen:
            assert PASSWORD not in text
    finally:
        await stop_gateway(g)
    # Configuration errors show the URL masked.
    for bad in (f"redis://:{PASSWORD}@127.0.0.1:notaport/0", f"http://:{PASSWORD}@h:6379/0",
                f"redis://:{PASSWORD}@h/db1", f"redis://user:{PASSWORD}@h:6379/0",
                f"redis://:{PASSWORD}/x@h:6379/0"):
        p = await run_to_exit(["--port", "0", "--set", f"cache.redis_url={bad}"])
        text = p.output.decode(errors="replace")
        assert p.exit_code != 0 and "cache.redis_url" in text, text
        assert PASSWORD not in text and "hunter2" not in text, text
