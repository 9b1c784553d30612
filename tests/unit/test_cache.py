"""Cache keys, the LRU store and its arithmetic, TTL over a Clock."""

import pytest
from twisted.internet.task import Clock

from ntonix.cache.key import cache_key, canonical, is_sampled
from ntonix.identity import Identity
from ntonix.cache.store import ENTRY_OVERHEAD, Entry, ResponseStore

BASE = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}


IDENTITY = Identity(b"test secret")


def key(doc=None, route="chat", fmt=b"any", auth=b"Bearer a", scope="credential"):
    return cache_key(route, doc if doc is not None else BASE,
                     IDENTITY.credential_hash(auth), scope, fmt)


def test_key_ignores_order_whitespace_number_form_and_delivery_fields():
    reordered = {"messages": [{"content": "hi", "role": "user"}], "temperature": 0.0,
                 "model": "m", "stream": True, "stream_options": {"include_usage": True},
                 "user": "alice"}
    assert key(reordered) == key()
    assert canonical({"a": 1.0, "b": [2.0, 2.5]}) == b'{"a":1,"b":[2,2.5]}'


@pytest.mark.parametrize("change", [
    {"model": "other"},
    {"temperature": 0.5},
    {"messages": [{"role": "user", "content": "hi!"}]},
    {"max_tokens": 5},
    {"seed": 1},
])
def test_key_changes_with_what_changes_the_answer(change):
    assert key({**BASE, **change}) != key()


def test_key_separates_routes_delivery_and_credentials():
    assert key(route="completions") != key()
    # One entry serves both framings, except answers kept in their own.
    assert key({**BASE, "stream": True}) == key()
    assert key(fmt=b"sse") != key() and key(fmt=b"json") != key(fmt=b"sse")
    assert key(auth=b"Bearer b") != key()
    assert key(auth=None) != key()
    assert key(auth=b"Bearer b", scope="global") == key(auth=b"Bearer a", scope="global")


def test_big_conversations_differing_deep_inside_never_share_a_key():
    import random
    rng = random.Random(4)
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζήτα", "\U0001f600"]
    turns = [{"role": ["user", "assistant"][i % 2],
              "content": " ".join(rng.choice(words) for _ in range(400))} for i in range(40)]
    one = {**BASE, "messages": turns}
    assert len(canonical(one)) > 100_000
    middle = [dict(t) for t in turns]
    text = middle[20]["content"]
    middle[20]["content"] = text[:1000] + ("x" if text[1000] != "x" else "y") + text[1001:]
    other = {**BASE, "messages": middle}
    assert key(one) != key(other)
    assert key(one) == key({**BASE, "messages": [dict(t) for t in turns]})


def test_sampled_rules():
    assert is_sampled({"messages": []})  # temperature omitted means 1
    assert is_sampled({"messages": [], "temperature": 0.7})
    assert not is_sampled({"messages": [], "temperature": 0})
    assert not is_sampled({"messages": [], "temperature": 0.9, "seed": 4})
    assert not is_sampled({"input": "embed me"})


def entry(clock, size, ttl=100.0):
    return Entry(code=200, phrase=b"OK", headers=[], chunks=[b"x" * size], sse=False,
                 stored_at=clock.seconds(), expires_at=clock.seconds() + ttl)


def test_lru_order_and_byte_accounting_under_eviction():
    clock = Clock()
    unit = ENTRY_OVERHEAD + 1000
    store = ResponseStore(max_bytes=3 * unit, ttl=100, max_entry_bytes=10_000,
                          now=clock.seconds)
    for k in (b"a", b"b", b"c"):
        assert store.put(k, entry(clock, 1000))
    assert store.size_bytes == 3 * unit and len(store) == 3
    assert store.get(b"a") is not None  # a is now the most recently used
    store.put(b"d", entry(clock, 1000))
    assert store.get(b"b") is None and store.stats.evictions == 1
    assert [k for k in store.entries] == [b"c", b"a", b"d"]
    store.put(b"e", entry(clock, 2000))  # needs two slots: evicts c and a
    assert list(store.entries) == [b"d", b"e"] and store.stats.evictions == 3
    assert store.size_bytes == unit + ENTRY_OVERHEAD + 2000
    store.put(b"d", entry(clock, 10))  # replacing re-counts
    assert store.size_bytes == ENTRY_OVERHEAD + 10 + ENTRY_OVERHEAD + 2000


def test_entry_cap_and_whole_cache_cap():
    clock = Clock()
    store = ResponseStore(max_bytes=5000, ttl=100, max_entry_bytes=1000, now=clock.seconds)
    assert not store.put(b"big", entry(clock, 2000))
    assert store.stats.too_large == 1 and len(store) == 0 and store.size_bytes == 0


def test_ttl_with_clock_lazy_and_swept():
    clock = Clock()
    store = ResponseStore(max_bytes=10 ** 6, ttl=10, max_entry_bytes=10 ** 6, now=clock.seconds)
    store.put(b"a", entry(clock, 10, ttl=10))
    store.put(b"b", entry(clock, 10, ttl=20))
    clock.advance(9.9)
    assert store.get(b"a") is not None
    clock.advance(0.1)
    assert store.get(b"a") is None and store.stats.expired == 1
    clock.advance(10)
    assert store.sweep() == 1 and store.stats.expired == 2
    assert len(store) == 0 and store.size_bytes == 0


def test_stats_arithmetic():
    clock = Clock()
    store = ResponseStore(max_bytes=1000, ttl=10, max_entry_bytes=1000, now=clock.seconds)
    store.stats.hits, store.stats.misses = 3, 1
    doc = store.as_json(True)
    assert doc["hit_rate"] == 0.75 and doc["max_size_bytes"] == 1000
    assert set(doc) >= {"enabled", "hits", "misses", "hit_rate", "evictions", "expired",
                        "entries", "size_bytes", "max_size_bytes", "coalesced", "bypasses"}
    store.stats.hits = store.stats.misses = 0
    assert store.as_json(True)["hit_rate"] == 0.0
