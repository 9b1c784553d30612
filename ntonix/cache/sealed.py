"""What the Redis tier writes, and what it believes of what it reads.

A shared Redis is reachable by more than the gateways, so nothing read from
it is trusted as it is:

- **Authenticated.** Every stored entry and every record of a live answer
  carries an HMAC-SHA256 tag under ``cache.redis_secret``: an entry's over
  its Redis key and its bytes, a record's over its stream's name, its number,
  its kind and its bytes. Without the secret nobody can write an entry or a
  record that a gateway takes, alter one, or move one to another question's
  key or into another answer or position. With no secret the tag is keyed
  with nothing: it still tells a gateway's own bytes from another format or
  from damage, not from a forgery (the configuration warns at start).
- **Validated.** Every field of an entry or a head record is checked for
  type and range before use (this module never raises on any input): header
  names against RFC 9110's token grammar, values against its field-value
  grammar (no CR, LF or NUL), the status and reason phrase likewise; chunk
  sizes must add up, pacing times must be as many as the chunks and bounded.
  Hop-by-hop, framing and per-delivery headers (``Connection``,
  ``Transfer-Encoding``, ``Content-Length``, ``Date``, ``X-Cache``, ...) are
  never taken from Redis: the gateway sets them for its own hop.

A refusal says why (``UNAUTHENTICATED`` or ``MALFORMED``); the tier counts
it, deletes a bad entry and treats it as a miss, and a follower given a bad
record stops following (``shared.py``).

Entry bytes: ``NXE2`` | tag (32 bytes) | the body, ``<head length>\\n`` then
the head (compact JSON) and the chunks' bytes one after the other.
"""

import hashlib
import hmac
import json
import math
import re
from typing import Any, List, Optional, Sequence, Tuple

import attrs

from ntonix.cache.flight import PER_RESPONSE
from ntonix.cache.store import Entry
from ntonix.upstream.headers import FRAMING, HOP_BY_HOP

UNAUTHENTICATED = "unauthenticated"
MALFORMED = "malformed"

ENTRY_MAGIC = b"NXE2"
TAG_BYTES = 32
# Domain separation: an entry's tag can never pass for a record's.
_ENTRY_DOMAIN = b"ntonix redis entry 2\x00"
_RECORD_DOMAIN = b"ntonix redis record 2\x00"

# Limits far above anything a gateway writes; beyond them the bytes are not
# a gateway's.
MAX_HEAD_BYTES = 1024 * 1024
MAX_HEADERS = 256
MAX_HEADER_BYTES = 64 * 1024
MAX_CHUNKS = 1_000_000
MAX_PHRASE = 256
# Paced replay waits this long at most for a chunk (a bigger offset would
# hold a client for ever).
MAX_PACE_SECONDS = 3600.0
MAX_TOKENS = 2 ** 53

# Never taken from Redis: set per hop or per delivery by the gateway itself.
NOT_FROM_REDIS = HOP_BY_HOP | FRAMING | PER_RESPONSE | frozenset({b"x-cache", b"x-backend"})

# RFC 9110 section 5.1: field-name = token; tchar as below.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Section 5.5: field-value = *field-content, where field-content is
# field-vchar [ 1*( SP / HTAB / field-vchar ) field-vchar ], field-vchar is
# VCHAR or obs-text: no CR, LF, NUL or other controls, no leading or
# trailing blanks.
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff](?:[\t\x20-\x7e\x80-\xff]*"
                          rb"[\x21-\x7e\x80-\xff])?)?")
# Section 4 of RFC 9112: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ).
_PHRASE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_LENGTH = re.compile(rb"[0-9]{1,7}")
_SEQ = re.compile(rb"[0-9]{1,12}")


class _Bad(Exception):
    """Internal: the bytes are not what a gateway writes."""


def _refuse_constant(name: str) -> Any:
    # json.loads takes NaN and Infinity, which no gateway writes.
    raise _Bad(f"JSON constant {name}")


def _json(data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise _Bad(f"not JSON: {type(e).__name__}") from None


def _int(v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _Bad("an integer out of range")
    return v


def _number(v: Any, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad("not a number")
    f = float(v)
    if not (math.isfinite(f) and lo <= f <= hi):
        raise _Bad("a number out of range")
    return f


def _latin1(v: Any) -> bytes:
    if not isinstance(v, str):
        raise _Bad("not a string")
    try:
        return v.encode("latin-1")
    except UnicodeEncodeError:
        raise _Bad("not latin-1 text") from None


def _phrase(v: Any) -> bytes:
    b = _latin1(v)
    if len(b) > MAX_PHRASE or not _PHRASE.fullmatch(b):
        raise _Bad("not a reason phrase")
    return b


def _headers(v: Any) -> List[Tuple[bytes, bytes]]:
    """The header pairs fit for a client; _Bad when one is not a header."""
    if not isinstance(v, list) or len(v) > MAX_HEADERS:
        raise _Bad("headers not a list, or too many")
    out = []
    total = 0
    for pair in v:
        if not isinstance(pair, list) or len(pair) != 2:
            raise _Bad("a header not a [name, value] pair")
        name, value = _latin1(pair[0]), _latin1(pair[1])
        if not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise _Bad("a header name or value outside RFC 9110's grammar")
        total += len(name) + len(value)
        if total > MAX_HEADER_BYTES:
            raise _Bad("headers too long")
        if name.lower() not in NOT_FROM_REDIS:
            out.append((name, value))
    return out


def _encode_headers(headers: List[Tuple[bytes, bytes]]) -> list:
    return [[n.decode("latin-1"), v.decode("latin-1")] for n, v in headers]


# -- entries

def _entry_head(entry: Entry, ttl: float) -> bytes:
    head = {"code": entry.code, "phrase": entry.phrase.decode("latin-1"),
            "headers": _encode_headers(entry.headers),
            "sse": entry.sse, "sizes": [len(c) for c in entry.chunks], "times": entry.times,
            "duration": entry.duration, "usage": list(entry.usage) if entry.usage else None,
            "stored_at": entry.stored_at, "ttl": ttl}
    h = json.dumps(head, separators=(",", ":")).encode()
    return b"%d\n" % len(h) + h


def encode_entry(entry: Entry, ttl: float = 0.0) -> bytes:
    """An entry's body (what the tag covers, after the magic): the head as
    JSON, then the chunks. ``ttl``: the lifetime it is stored with, kept in
    the head so that a reader never keeps it longer, whatever Redis says."""
    return b"".join([_entry_head(entry, ttl), *entry.chunks])


def _entry(data: bytes, now: float, ttl_left: float, at: int = 0) -> Entry:
    """The entry whose body starts at ``at`` in ``data``."""
    nl = data.find(b"\n", at, at + 9)
    if nl < 0 or not _LENGTH.fullmatch(data, at, nl):
        raise _Bad("no head length")
    size = int(data[at:nl])
    start = nl + 1
    if size > MAX_HEAD_BYTES or start + size > len(data):
        raise _Bad("head length out of range")
    head = _json(data[start:start + size])
    if not isinstance(head, dict):
        raise _Bad("head not an object")
    # Chunks are copied once, out of the value as Redis sent it.
    body = memoryview(data)[start + size:]
    if _int(head.get("code"), 100, 599) != 200:
        raise _Bad("an entry is a 200")  # only complete 200s are stored
    sizes = head.get("sizes")
    if not isinstance(sizes, list) or len(sizes) > MAX_CHUNKS:
        raise _Bad("sizes not a list, or too many")
    chunks = []
    at = 0
    for s in sizes:
        s = _int(s, 0, len(body) - at)
        chunks.append(body[at:at + s].tobytes())
        at += s
    if at != len(body):
        raise _Bad("sizes do not add up to the body")
    times = head.get("times")
    if times is not None:
        if not isinstance(times, list) or len(times) != len(chunks):
            raise _Bad("times not one per chunk")
        times = [_number(t, 0.0, MAX_PACE_SECONDS) for t in times]
    usage = head.get("usage")
    if usage is not None:
        if not isinstance(usage, list) or len(usage) != 3:
            raise _Bad("usage not three counts")
        usage = tuple(_int(u, 0, MAX_TOKENS) for u in usage)
    sse = head.get("sse")
    if not isinstance(sse, bool):
        raise _Bad("sse not a boolean")
    # Never longer than the writer's own TTL, whatever TTL the key has.
    stored_at = _number(head.get("stored_at", now), -1e12, 1e12)
    ttl = _number(head.get("ttl", 0.0), 0.0, 1e9)
    if ttl > 0:
        ttl_left = min(ttl_left, stored_at + ttl - now)
    if not math.isfinite(ttl_left):
        ttl_left = 0.0  # no lifetime known: served once, not kept
    return Entry(code=200, phrase=_phrase(head.get("phrase")), headers=_headers(head.get("headers")),
                 chunks=chunks, sse=sse, stored_at=now, expires_at=now + max(0.0, ttl_left),
                 times=times, duration=_number(head.get("duration") or 0.0, 0.0, 1e9),
                 usage=usage or None)


def decode_entry(data: Any, now: float, ttl_left: float) -> Optional[Entry]:
    """An Entry from ``encode_entry``'s bytes, or None when they are not:
    never raises, whatever ``data`` is."""
    if not isinstance(data, bytes):
        return None
    try:
        return _entry(data, now, ttl_left)
    except _Bad:
        return None


# -- the head record of a live answer

@attrs.frozen
class Head:
    """A live answer's status line and headers, as a follower relays them."""

    code: int
    phrase: bytes
    headers: List[Tuple[bytes, bytes]]
    sse: bool


def encode_head(code: int, phrase: bytes, headers: List[Tuple[bytes, bytes]], sse: bool) -> bytes:
    return json.dumps({"code": code, "phrase": phrase.decode("latin-1"), "sse": sse,
                       "headers": _encode_headers(headers)}, separators=(",", ":")).encode()


def decode_head(data: Any) -> Optional[Head]:
    """A Head from ``encode_head``'s bytes, or None: never raises."""
    if not isinstance(data, bytes) or len(data) > MAX_HEAD_BYTES:
        return None
    try:
        doc = _json(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("sse"), bool):
            return None
        # A final status: 1xx are the HTTP machinery's, never relayed.
        return Head(_int(doc.get("code"), 200, 599), _phrase(doc.get("phrase")),
                    _headers(doc.get("headers")), doc["sse"])
    except _Bad:
        return None


@attrs.frozen
class Record:
    """One record of a live answer's stream, checked."""

    rid: bytes  # Redis's id, to read on from
    kind: bytes  # head, data, end, fail
    seq: int
    data: bytes


# -- tags

@attrs.frozen
class Seal:
    """Tags under the deployment's ``cache.redis_secret`` (empty: keyed with
    nothing, which authenticates nothing)."""

    secret: bytes = attrs.field(default=b"", repr=False)

    @property
    def authenticated(self) -> bool:
        return bool(self.secret)

    def _tag(self, domain: bytes, *parts: Any, pieces: Sequence[Any] = ()) -> bytes:
        """The tag of ``parts`` then of one more part made of ``pieces``
        (bytes-like), each part's length first: no two lists of parts tag
        alike. Pieces are hashed where they lie, never joined."""
        m = hmac.new(self.secret, domain, hashlib.sha256)
        for p in parts:
            m.update(b"%d:" % len(p))
            m.update(p)
        if pieces:
            m.update(b"%d:" % sum(len(p) for p in pieces))
            for p in pieces:
                m.update(p)
        return m.digest()

    def seal_entry(self, rkey: bytes, entry: Entry, ttl: float) -> bytes:
        """The bytes stored at Redis key ``rkey``: the body is joined once,
        with the magic and the tag (an entry may be several MB)."""
        head = _entry_head(entry, ttl)
        tag = self._tag(_ENTRY_DOMAIN, rkey, pieces=[head, *entry.chunks])
        return b"".join([ENTRY_MAGIC, tag, head, *entry.chunks])

    def seal_body(self, rkey: bytes, body: bytes) -> bytes:
        """An entry's body (``encode_entry``'s bytes) sealed for ``rkey``."""
        return ENTRY_MAGIC + self._tag(_ENTRY_DOMAIN, rkey, body) + body

    def open_entry(self, rkey: bytes, data: Any, now: float,
                   ttl_left: float) -> Tuple[Optional[Entry], Optional[str]]:
        """(entry, None), or (None, why) for bytes read from ``rkey`` that are
        not an entry a gateway with this secret stored there. Never raises."""
        if not isinstance(data, bytes) or not data.startswith(ENTRY_MAGIC) \
                or len(data) < len(ENTRY_MAGIC) + TAG_BYTES:
            return None, MALFORMED
        at = len(ENTRY_MAGIC)
        start = at + TAG_BYTES
        # The body is hashed where it lies, not copied out first.
        tag = self._tag(_ENTRY_DOMAIN, rkey, pieces=[memoryview(data)[start:]])
        if not hmac.compare_digest(data[at:start], tag):
            return None, UNAUTHENTICATED
        try:
            return _entry(data, now, ttl_left, start), None
        except _Bad:
            return None, MALFORMED

    def record_tag(self, stream: bytes, seq: bytes, kind: bytes, data: bytes) -> bytes:
        """The tag of one record of ``stream`` (its ``n`` field as sent)."""
        return self._tag(_RECORD_DOMAIN, stream, seq, kind, data)

    def open_record(self, stream: bytes, rid: Any,
                    fields: Any) -> Tuple[Optional[Record], Optional[str]]:
        """A record of ``stream`` as XREAD returned it (its id, then its
        fields as a flat list): (record, None) or (None, why). Never raises."""
        if not isinstance(rid, bytes) or not isinstance(fields, list) or len(fields) % 2 \
                or not all(isinstance(f, bytes) for f in fields):
            return None, MALFORMED
        f = dict(zip(fields[::2], fields[1::2]))
        kind, n, data, tag = f.get(b"k"), f.get(b"n"), f.get(b"d"), f.get(b"m")
        if kind is None or n is None or data is None or tag is None:
            return None, MALFORMED
        if not hmac.compare_digest(tag, self.record_tag(stream, n, kind, data)):
            return None, UNAUTHENTICATED
        if not _SEQ.fullmatch(n) or kind not in (b"head", b"data", b"end", b"fail"):
            return None, MALFORMED
        return Record(rid, kind, int(n), data), None
