"""Cache keys: what makes two requests the same question.

The key is xxh3_128 over the request's canonical JSON (sorted keys, compact
separators, integral floats written as integers so that 1 and 1.0 match)
without the fields that do not change the answer (``stream``,
``stream_options``, ``user``), plus the route, and by default the keyed hash
of the credential (``identity.py``), so a hit never gives a client what its
own credential could not get. A streamed and a plain request for the same prompt
share a key: one answer serves both, converted (``convert.py``). Requests
whose answers cannot be converted faithfully (``n`` > 1) get a key per
format. The whole request is hashed, so conversations of any length that
differ anywhere never share an entry.
"""

import json
from typing import Any

import xxhash

IGNORED_FIELDS = frozenset({"stream", "stream_options", "user"})


def _normalise(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2 ** 63 else value
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    return value


def canonical(doc: dict) -> bytes:
    body = {k: v for k, v in doc.items() if k not in IGNORED_FIELDS}
    return json.dumps(_normalise(body), sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode("utf-8", "surrogatepass")


def cache_key(route: str, doc: dict, credential: bytes,
              scope: str = "credential", fmt: bytes = b"any") -> bytes:
    """``credential``: the keyed hash of the request's credential.
    ``fmt``: ``any`` (one entry for both framings), or ``sse`` / ``json``
    for an answer that is only ever served as it came."""
    h = xxhash.xxh3_128()
    h.update(route.encode())
    h.update(b"\x00" + fmt + b"\x00")
    if scope == "credential":
        h.update(credential)
    h.update(b"\x00")
    h.update(canonical(doc))
    return h.digest()


def convertible(doc: dict) -> bool:
    """Whether the answer to ``doc`` may be served in the other framing:
    one choice only."""
    n = doc.get("n", 1)
    return n is None or n == 1


def is_sampled(doc: dict) -> bool:
    """Whether the request asks for a fresh random draw.

    Temperature above 0, or omitted (OpenAI's default is 1), samples; a fixed
    ``seed`` makes the draw repeatable. Embeddings have no sampling.
    """
    if "messages" not in doc and "prompt" not in doc:
        return False
    if doc.get("seed") is not None:
        return False
    t = doc.get("temperature", 1)
    return not (isinstance(t, (int, float)) and not isinstance(t, bool) and t <= 0)
