"""The Redis tier does not trust Redis (sealed.py, shared.py): entries and
live records are authenticated and validated, whatever bytes Redis holds,
and a Redis URL's password is never shown. Integration tests over real
sockets are in tests/integration/test_redis_trust.py."""

import hashlib
import json
import os
from typing import Any, List

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from ntonix.cache.redis_client import (RedisClient, RedisError, mask_redis_url,
                                       parse_redis_address, parse_redis_url)
from ntonix.cache.sealed import (ENTRY_MAGIC, MALFORMED, UNAUTHENTICATED, Seal, decode_entry,
                                 decode_head, encode_entry, encode_head)
from ntonix.cache.shared import Follower, SharedTier
from ntonix.cache.store import Entry
from ntonix.config import ConfigError, load, shown

EXAMPLES = int(os.environ.get("NTONIX_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SECRET = b"a secret of the deployment"
RKEY = b"ntonix:v1:e:00ff"


def entry(**kw: Any) -> Entry:
    values = dict(code=200, phrase=b"OK",
                  headers=[(b"Content-Type", b"text/event-stream"),
                           (b"X-Model", b"caf\xe9 \tx")],  # obs-text and HTAB are values
                  chunks=[b"data: 1\n\n", b"", b"data: [DONE]\n\n"], sse=True,
                  stored_at=100.0, expires_at=200.0, times=[0.0, 0.01, 0.02], duration=0.5,
                  usage=(3, 4, 0))
    values.update(kw)
    return Entry(**values)


def body_with(head: Any, body: bytes = b"") -> bytes:
    h = json.dumps(head).encode() if not isinstance(head, bytes) else head
    return b"%d\n" % len(h) + h + body


def good_head(**kw: Any) -> dict:
    head = {"code": 200, "phrase": "OK", "headers": [["Content-Type", "application/json"]],
            "sse": False, "sizes": [2], "times": None, "duration": 0.1, "usage": None,
            "stored_at": 100.0, "ttl": 60.0}
    head.update(kw)
    return head


# -- entries: authenticated

def test_an_entry_round_trips_under_its_secret():
    seal = Seal(SECRET)
    e = entry()
    got, why = seal.open_entry(RKEY, seal.seal_entry(RKEY, e, 60.0), 110.0, 50.0)
    assert why is None
    assert (got.code, got.phrase, got.headers, got.chunks, got.sse, got.times, got.usage,
            got.duration) == (e.code, e.phrase, e.headers, e.chunks, e.sse, e.times, e.usage,
                              e.duration)
    assert got.expires_at == 110.0 + 50.0


@pytest.mark.parametrize("change", ["other secret", "no secret", "other key", "a byte",
                                    "the tag", "truncated", "old format"])
def test_an_entry_not_sealed_by_this_secret_for_this_key_is_refused(change):
    seal = Seal(SECRET)
    data = seal.seal_entry(RKEY, entry(), 60.0)
    key = RKEY
    if change == "other secret":
        data = Seal(b"another deployment's secret").seal_entry(RKEY, entry(), 60.0)
    elif change == "no secret":
        data = Seal().seal_entry(RKEY, entry(), 60.0)
    elif change == "other key":
        key = b"ntonix:v1:e:0100"  # a good entry moved to another question
    elif change == "a byte":
        data = data[:-3] + b"X" + data[-2:]
    elif change == "the tag":
        data = data[:10] + bytes([data[10] ^ 1]) + data[11:]
    elif change == "truncated":
        data = data[:-1]
    elif change == "old format":
        data = encode_entry(entry())
    got, why = seal.open_entry(key, data, 110.0, 50.0)
    assert got is None
    assert why == (MALFORMED if change == "old format" else UNAUTHENTICATED)


def test_without_a_secret_entries_are_still_validated():
    seal = Seal()
    assert not seal.authenticated
    poisoned = good_head(headers=[["X-A", "a\r\nSet-Cookie: evil=1"]])
    data = seal.seal_body(RKEY, body_with(poisoned, b"{}"))
    assert seal.open_entry(RKEY, data, 0.0, 10.0) == (None, MALFORMED)


def test_an_entry_lives_no_longer_than_its_writer_said():
    seal = Seal(SECRET)
    data = seal.seal_entry(RKEY, entry(stored_at=100.0), 60.0)
    # Redis says an hour left (or no expiry: -1): the entry says 60 s from 100.
    got, _ = seal.open_entry(RKEY, data, 130.0, 3600.0)
    assert got.expires_at == pytest.approx(160.0)
    got, _ = seal.open_entry(RKEY, data, 130.0, float("inf"))
    assert got.expires_at == pytest.approx(160.0)
    got, _ = seal.open_entry(RKEY, data, 170.0, 3600.0)
    assert got.expires_at == 170.0  # already over: served once, not kept


# -- entries: validated

HOP_AND_FRAMING = ["Connection", "Keep-Alive", "Transfer-Encoding", "Content-Length", "TE",
                   "Trailer", "Upgrade", "Proxy-Connection", "Date", "Server", "Age",
                   "X-Request-ID", "X-Cache", "X-Backend", "Host"]


def test_hop_by_hop_framing_and_per_delivery_headers_are_never_taken_from_redis():
    headers = [[n, "x"] for n in HOP_AND_FRAMING] + [["Content-Type", "application/json"]]
    got = decode_entry(body_with(good_head(headers=headers), b"{}"), 0.0, 10.0)
    assert got.headers == [(b"Content-Type", b"application/json")]


@pytest.mark.parametrize("name, value", [
    ("X-A", "a\r\nSet-Cookie: evil=1"), ("X-A", "a\nb"), ("X-A", "a\rb"), ("X-A", "a\x00b"),
    ("X-A", "a\x7fb"), ("X-A", " leading"), ("X-A", "trailing\t"), ("X-A", "\u0100"),
    ("X A", "v"), ("X-A:", "v"), ("", "v"), ("X\r\nY", "v"), ("Ü", "v"), ("X(A)", "v"),
])
def test_header_names_and_values_outside_rfc_9110_refuse_the_entry(name, value):
    assert decode_entry(body_with(good_head(headers=[[name, value]]), b"{}"), 0.0, 10.0) is None


@pytest.mark.parametrize("value", ["", "a", "a b", "a\tb", "caf\u00e9", "!#$%&'*+-.^_`|~"])
def test_header_values_in_the_grammar_pass(value):
    got = decode_entry(body_with(good_head(headers=[["X-A", value]]), b"{}"), 0.0, 10.0)
    assert got.headers == [(b"X-A", value.encode("latin-1"))]


MALFORMED_BODIES = {
    "empty": b"",
    "no length": b"{}",
    "length not digits": b" 2\n{}",
    "length with sign": b"+2\n{}",
    "length with underscore": b"1_0\n" + b"{}" * 5,
    "length past the end": b"99\n{}",
    "bad JSON": body_with(b"{not json"),
    "bad UTF-8": body_with(b'{"phrase": "\xff\xfe"}'),
    "UTF-16 JSON": body_with(json.dumps(good_head()).encode("utf-16")),
    "deep nesting": body_with(b"[" * 100_000 + b"]" * 100_000),
    "NaN": body_with(json.dumps(good_head(duration=float("nan"))).encode()),
    "a list": body_with([1, 2]),
    "a huge integer": body_with(b'{"code": ' + b"9" * 5000 + b"}"),
    "code a string": body_with(good_head(code="200"), b"{}"),
    "code a bool": body_with(good_head(code=True), b"{}"),
    "code 500": body_with(good_head(code=500), b"{}"),
    "phrase an int": body_with(good_head(phrase=200), b"{}"),
    "phrase with CRLF": body_with(good_head(phrase="OK\r\nX: y"), b"{}"),
    "headers a dict": body_with(good_head(headers={"a": "b"}), b"{}"),
    "a header of three": body_with(good_head(headers=[["a", "b", "c"]]), b"{}"),
    "a header value an int": body_with(good_head(headers=[["a", 1]]), b"{}"),
    "too many headers": body_with(good_head(headers=[["a", "b"]] * 1000), b"{}"),
    "sizes missing": body_with(good_head(sizes=None), b"{}"),
    "a negative size": body_with(good_head(sizes=[-1, 3]), b"{}"),
    "a float size": body_with(good_head(sizes=[2.0]), b"{}"),
    "sizes too big": body_with(good_head(sizes=[10 ** 12]), b"{}"),
    "sizes short of the body": body_with(good_head(sizes=[1]), b"{}"),
    "a huge count of sizes": body_with(good_head(sizes=[0] * 1_000_001), b""),
    "times not one per chunk": body_with(good_head(times=[0.0, 1.0]), b"{}"),
    "a time a century away": body_with(good_head(times=[3e9]), b"{}"),
    "a negative time": body_with(good_head(times=[-1.0]), b"{}"),
    "sse a string": body_with(good_head(sse="yes"), b"{}"),
    "usage of two": body_with(good_head(usage=[1, 2]), b"{}"),
    "usage negative": body_with(good_head(usage=[1, -2, 0]), b"{}"),
    "duration a string": body_with(good_head(duration="1"), b"{}"),
    "stored_at a list": body_with(good_head(stored_at=[]), b"{}"),
    "ttl infinite": body_with(good_head(ttl=1e400), b"{}"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED_BODIES))
def test_a_malformed_entry_is_none_and_never_raises(name):
    body = MALFORMED_BODIES[name]
    assert decode_entry(body, 0.0, 10.0) is None
    # Sealed properly (as a gateway with the secret, or anyone without one,
    # could): still refused, as malformed.
    seal = Seal(SECRET)
    assert seal.open_entry(RKEY, seal.seal_body(RKEY, body), 0.0, 10.0) == (None, MALFORMED)


def test_a_good_body_decodes():
    got = decode_entry(body_with(good_head(), b"{}"), 0.0, 10.0)
    assert got is not None and got.chunks == [b"{}"] and got.code == 200


@FUZZ
@given(st.binary(max_size=2000))
@example(b"5\n{}")
@example(b"2\n[]")
@example(b"0\n")
def test_any_bytes_given_to_decode_entry_are_an_entry_or_none(data):
    got = decode_entry(data, 0.0, 10.0)
    assert got is None or isinstance(got, Entry)
    seal = Seal(SECRET)
    got, why = seal.open_entry(RKEY, data, 0.0, 10.0)
    assert got is None and why in (MALFORMED, UNAUTHENTICATED)
    got, why = seal.open_entry(RKEY, seal.seal_body(RKEY, data), 0.0, 10.0)
    assert (got is None) == (why is not None)


TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats() | TEXT)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12)
FIELDS = ["code", "phrase", "headers", "sse", "sizes", "times", "duration", "usage",
          "stored_at", "ttl"]


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES), st.binary(max_size=40))
def test_any_head_near_an_entry_is_an_entry_or_none(changes, body):
    # Each field replaced by anything JSON can say, so that every check is reached.
    head = good_head(sizes=[len(body)])
    head.update(changes)
    try:
        data = body_with(json.dumps(head, allow_nan=True).encode(), body)
    except (ValueError, UnicodeEncodeError):
        return
    got = decode_entry(data, 0.0, 10.0)
    assert got is None or isinstance(got, Entry)
    if got is not None:
        for n, v in got.headers:
            assert b"\r" not in v and b"\n" not in v and b"\x00" not in v


# -- live records

def test_a_head_round_trips_and_a_poisoned_one_is_refused():
    data = encode_head(200, b"OK", [(b"Content-Type", b"text/event-stream"),
                                    (b"Transfer-Encoding", b"chunked")], True)
    head = decode_head(data)
    assert (head.code, head.phrase, head.headers, head.sse) == (
        200, b"OK", [(b"Content-Type", b"text/event-stream")], True)
    bad = json.dumps({"code": 200, "phrase": "OK", "sse": True,
                      "headers": [["X-A", "a\r\nSet-Cookie: evil=1"]]}).encode()
    assert decode_head(bad) is None
    assert decode_head(json.dumps({"code": 101, "phrase": "", "sse": True,
                                   "headers": []}).encode()) is None


@FUZZ
@given(st.binary(max_size=500) | JSON_VALUES.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_given_to_the_head_decoder_are_a_head_or_none(data):
    decode_head(data)


STREAM = b"ntonix:v1:s:00ff:0123456789abcdef-1"


def fields(seal: Seal, n: bytes, kind: bytes, data: bytes, stream: bytes = STREAM) -> list:
    return [b"k", kind, b"n", n, b"d", data, b"m", seal.record_tag(stream, n, kind, data)]


def test_records_are_tagged_for_their_stream_and_position():
    seal = Seal(SECRET)
    ok = fields(seal, b"0", b"data", b"x")
    record, why = seal.open_record(STREAM, b"1-0", ok)
    assert why is None and (record.kind, record.seq, record.data) == (b"data", 0, b"x")
    # Another stream, another position, another kind or other bytes: refused.
    assert seal.open_record(STREAM + b"0", b"1-0", ok) == (None, UNAUTHENTICATED)
    moved = list(ok)
    moved[3] = b"1"
    assert seal.open_record(STREAM, b"1-0", moved) == (None, UNAUTHENTICATED)
    ended = list(ok)
    ended[1] = b"end"
    assert seal.open_record(STREAM, b"1-0", ended) == (None, UNAUTHENTICATED)
    assert seal.open_record(STREAM, b"1-0", fields(Seal(b"other secret!!!!!"), b"0", b"data",
                                                   b"x")) == (None, UNAUTHENTICATED)
    assert seal.open_record(STREAM, b"1-0", ok[:6]) == (None, MALFORMED)  # no tag


@FUZZ
@given(JSON_VALUES, JSON_VALUES | st.lists(st.binary(max_size=10), max_size=10))
def test_any_record_as_xread_could_give_it_is_a_record_or_refused(rid, flat):
    got, why = Seal(SECRET).open_record(STREAM, rid, flat)
    assert got is None and why in (MALFORMED, UNAUTHENTICATED)


# -- the tier over a Redis that lies

class FakeRedis:
    """Replies from a script, commands kept."""

    def __init__(self) -> None:
        self.sent: List[tuple] = []
        self.values: dict = {}
        self.blocking_reply: Any = []

    def execute(self, *args: Any) -> defer.Deferred:
        self.sent.append(args)
        cmd = args[0]
        if cmd == b"GET":
            v = self.values.get(args[1])
            return defer.fail(v) if isinstance(v, Exception) else defer.succeed(v)
        if cmd == b"PTTL":
            return defer.succeed(60_000 if args[1] in self.values else -2)
        return defer.succeed(1)

    def blocking(self, *args: Any, timeout: float) -> defer.Deferred:
        self.sent.append(args)
        return defer.succeed(self.blocking_reply)


def tier(secret: bytes = SECRET) -> "tuple[SharedTier, FakeRedis, Clock]":
    clock = Clock()
    clock.advance(1000)
    redis = FakeRedis()
    return SharedTier(redis, "ntonix:v1:", clock, 5.0, Seal(secret)), redis, clock


def result(d: defer.Deferred) -> Any:
    out = []
    d.addBoth(out.append)
    assert out, "not fired"
    return out[0]


def test_a_refused_entry_is_a_miss_counted_and_deleted_if_unchanged():
    t, redis, _ = tier()
    key = b"\x00\xff"
    ekey = t._key(b"e", key)
    bad = Seal(b"someone else's secret").seal_entry(ekey, entry(), 60.0)
    redis.values[ekey] = bad
    assert result(t.get(key)) is None
    assert t.rejected == {("entry", UNAUTHENTICATED): 1} and t.hits == 0
    eval_ = [c for c in redis.sent if c[0] == b"EVAL"]
    assert eval_ and eval_[0][3] == ekey and eval_[0][4] == hashlib.sha1(bad).hexdigest()
    # Its own entries pass.
    t.put(key, entry(stored_at=1000.0), 60.0)
    stored = [c for c in redis.sent if c[0] == b"SET"][-1]
    redis.values[ekey] = stored[2]
    assert isinstance(result(t.get(key)), Entry) and t.hits == 1
    assert t.as_json()["rejected"] == 1 and t.as_json()["authenticated"] is True


def test_a_key_of_another_type_is_a_miss_not_a_redis_failure():
    t, redis, _ = tier()
    ekey = t._key(b"e", b"k")
    redis.values[ekey] = RedisError("WRONGTYPE Operation against a key holding the wrong kind")
    for _ in range(5):
        assert result(t.get(b"k")) is None
    assert t.failures == 0 and t.usable and t.rejected == {("entry", MALFORMED): 5}
    assert (b"DEL", ekey) in redis.sent


def test_refusals_are_logged_at_most_once_a_minute_and_never_their_bytes():
    t, redis, clock = tier()
    ekey = t._key(b"e", b"k")
    redis.values[ekey] = b"NXE2" + b"\x00" * 32 + b"SECRET-LOOKING BYTES"
    seen: List[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        for _ in range(10):
            result(t.get(b"k"))
        clock.advance(61)
        result(t.get(b"k"))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    lines = [e for e in seen if e.get("log_namespace") == "ntonix.cache.shared"]
    assert [e["n"] for e in lines] == [1, 10]
    assert all("SECRET-LOOKING" not in repr(e) for e in lines)


def test_a_lease_value_no_gateway_makes_names_no_stream():
    t, redis, _ = tier()
    lkey = t._key(b"l", b"k")
    redis.values[lkey] = b"../../anything\r\n"
    orig = redis.execute
    redis.execute = lambda *a: defer.succeed(None) if a[0] == b"SET" else orig(*a)
    assert result(t.acquire(b"k")) == (False, None)
    assert result(t.leader(b"k")) is None
    redis.values[lkey] = b"0123456789abcdef-7"
    assert result(t.leader(b"k")) == b"0123456789abcdef-7"


class StubFlight:
    def __init__(self) -> None:
        self.subscribers = [object()]
        self.committed: Any = None
        self.written: List[bytes] = []
        self.ended: Any = None

    def commit(self, exchange: Any, response: Any, producer: Any) -> None:
        self.committed = (response.code, exchange.headers)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def end(self, complete: bool, why: Any) -> None:
        self.ended = (complete, why)


def follow(t: SharedTier, redis: FakeRedis, records: list) -> "tuple[StubFlight, list]":
    token = b"0123456789abcdef-1"
    redis.blocking_reply = [[t._stream(b"k", token), records]]
    flight = StubFlight()
    took_over: list = []
    f = Follower(t, b"k", token, flight, lambda: took_over.append(True))
    # One read: the follower would read on after it.
    f._got(result(t.read(b"k", token, b"0")))
    return flight, took_over


def record(t: SharedTier, seal: Seal, n: int, kind: bytes, data: bytes) -> list:
    stream = t._stream(b"k", b"0123456789abcdef-1")
    return [b"%d-0" % n, fields(seal, b"%d" % n, kind, data, stream)]


def test_a_follower_relays_nothing_unauthenticated_and_takes_over():
    t, redis, _ = tier()
    forged = Seal(b"not the deployment's secret")
    head = encode_head(200, b"OK", [(b"Set-Cookie", b"evil=1")], True)
    flight, took_over = follow(t, redis, [record(t, forged, 0, b"head", head)])
    assert flight.committed is None and flight.written == [] and took_over == [True]
    assert t.rejected == {("record", UNAUTHENTICATED): 1} and t.takeovers == 1


def test_a_follower_stops_an_answer_at_its_first_bad_record():
    t, redis, _ = tier()
    good, forged = t.seal, Seal(b"not the deployment's secret")
    head = encode_head(200, b"OK", [(b"Content-Type", b"text/event-stream")], True)
    flight, took_over = follow(t, redis, [
        record(t, good, 0, b"head", head), record(t, good, 1, b"data", b"data: 1\n\n"),
        record(t, forged, 2, b"data", b"data: evil\n\n"),
        record(t, good, 3, b"end", b"")])
    assert flight.committed == (200, [(b"Content-Type", b"text/event-stream")])
    assert flight.written == [b"data: 1\n\n"]
    assert flight.ended[0] is False and took_over == []


def test_without_a_secret_a_follower_still_refuses_a_poisoned_head():
    t, redis, _ = tier(secret=b"")
    head = json.dumps({"code": 200, "phrase": "OK", "sse": True,
                       "headers": [["X-A", "a\r\nSet-Cookie: evil=1"]]}).encode()
    flight, took_over = follow(t, redis, [record(t, Seal(), 0, b"head", head)])
    assert flight.committed is None and took_over == [True]
    assert t.rejected == {("record", MALFORMED): 1}


@pytest.mark.parametrize("reply", [
    [[b"s"]], [[b"s", b"x"]], [[b"s", [[b"1-0"]]]], [[b"s", [[b"1-0", [b"k"]]]]],
    [[b"s", [[1, [b"k", b"head"]]]]], [[b"s", [None]]], [None],
])
def test_a_reply_that_is_no_stream_ends_the_following(reply):
    t, redis, _ = tier()
    redis.blocking_reply = reply
    got = result(t.read(b"k", b"0123456789abcdef-1", b"0"))
    assert got == [None] and t.rejected == {("record", MALFORMED): 1}


# -- secrets never shown

PASSWORD = "hunter2-p@ss/word"
QUOTED = "hunter2-p%40ss%2Fword"


@pytest.mark.parametrize("url", [
    f"redis://:{QUOTED}@h:notaport/0", f"redis://:{QUOTED}@h:70000/0",
    f"http://:{QUOTED}@h:6379/0", f"redis://:{QUOTED}@h/db1", f"redis://:{QUOTED}@h/0?x=1",
    f"redis://alice:{QUOTED}@h/0", f"redis://:{QUOTED}@/0", "redis://:hunter2-p/1@h:6379/0",
    "redis://:hunter2-p@ss@h:x/0", "redis://alice:hunter2-pw@h:6379/0#frag",
])
def test_a_bad_redis_url_is_reported_without_its_password(url):
    with pytest.raises(ConfigError) as e:
        load({}, {"NTONIX_CACHE_REDIS_URL": url})
    text = str(e.value)
    assert "cache.redis_url" in text and "hunter2" not in text and "alice" not in text, text
    with pytest.raises(ValueError) as e2:
        parse_redis_address(url)
    assert "hunter2" not in str(e2.value)


def test_mask_redis_url():
    assert mask_redis_url("redis://:pw@h:1/0") == "redis://***@h:1/0"
    assert mask_redis_url("rediss://default:p@w@h/0") == "rediss://***@h/0"
    assert mask_redis_url("redis://h:1/0") == "redis://h:1/0"
    assert mask_redis_url(":pw@h") == "***@h"


def test_rediss_urls_parse_for_tls_and_are_refused_where_tls_cannot_be_said():
    a = parse_redis_address(f"rediss://:{QUOTED}@redis.internal:6380/2")
    assert (a.host, a.port, a.db, a.password, a.tls) == ("redis.internal", 6380, 2, PASSWORD,
                                                         True)
    assert PASSWORD not in repr(a)
    with pytest.raises(ValueError, match="TLS") as e:
        parse_redis_url(f"rediss://:{QUOTED}@redis.internal:6380/2")
    assert "hunter2" not in str(e.value)
    c = RedisClient.from_url(Clock(), "rediss://127.0.0.1:6380/0")
    assert c.tls is not None and (c.host, c.port) == ("127.0.0.1", 6380)
    assert RedisClient.from_url(Clock(), "redis://127.0.0.1/0").tls is None


def test_the_secret_is_never_shown_and_its_absence_is_warned_of(tmp_path):
    env = {"NTONIX_CACHE_REDIS_URL": f"redis://:{QUOTED}@h:6379/0"}
    cfg = load({}, env)
    assert any("cache.redis_secret is not" in w for w in cfg.warnings)
    secret = "s3cret-of-sixteen-chars"
    cfg = load({}, {**env, "NTONIX_CACHE_REDIS_SECRET": secret})
    assert not any("redis_secret" in w for w in cfg.warnings)
    doc = json.dumps(shown(cfg))
    assert secret not in doc and "hunter2" not in doc and "h:6379/0" in doc
    with pytest.raises(ConfigError) as e:
        load({}, {**env, "NTONIX_CACHE_REDIS_SECRET": "tooshort"})
    assert "16 characters" in str(e.value) and "tooshort" not in str(e.value)
    path = tmp_path / "ntonix.json"
    path.write_text(json.dumps({"cache": {"redis_secret": 1234567890123456789}}))
    with pytest.raises(ConfigError) as e:
        load({}, {}, str(path))
    assert "cache.redis_secret" in str(e.value) and "1234567890123456789" not in str(e.value)


def test_the_console_shows_the_configuration_masked():
    from ntonix.console import Helpers

    cfg = load({}, {"NTONIX_CACHE_REDIS_URL": f"redis://:{QUOTED}@h:6379/0",
                    "NTONIX_CACHE_REDIS_SECRET": "s3cret-of-sixteen-chars"})

    class Gw:
        config = cfg

    text = Helpers(Gw(), None).config()
    assert "hunter2" not in text and "s3cret-of" not in text and "***@h:6379/0" in text


def test_a_ca_file_that_cannot_be_read_is_a_configuration_error(tmp_path):
    env = {"NTONIX_CACHE_REDIS_URL": "rediss://h:6379/0",
           "NTONIX_CACHE_REDIS_CA_FILE": str(tmp_path / "missing.pem")}
    with pytest.raises(ConfigError, match="cannot be read"):
        load({}, env)
    (tmp_path / "x.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="no PEM certificate"):
        load({}, {**env, "NTONIX_CACHE_REDIS_CA_FILE": str(tmp_path / "x.pem")})


def test_old_entries_written_before_this_format_are_not_mistaken(tmp_path):
    # What an older gateway wrote: refused (a miss), never half-read.
    old = encode_entry(entry())
    assert not old.startswith(ENTRY_MAGIC)
    assert Seal(SECRET).open_entry(RKEY, old, 0.0, 10.0) == (None, MALFORMED)
