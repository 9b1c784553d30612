"""The batch of scheduler events one process sends its peers, and the check
that a batch read from a peer (a worker, or Redis: not trusted) is sound.

A batch is a JSON object with any of:

- ``prefixes``: ``[[backend, blocks], ...]``: block hashes (see
  ``routing/prefix.py``) this process sent to ``backend``, in order, as
  base64 of little-endian unsigned 64-bit integers (a fifth of the JSON of
  decimal numbers, and packed and unpacked by ``struct`` in one call);
- ``loads``: ``{backend: [in_flight, pending_prefill_tokens], ...}``: this
  process's whole view at the time (backends at zero left out). It
  replaces the last one from the same peer, so a lost batch is mended by
  the next;
- ``ttft``: ``[[backend, uncached_tokens, requests_ahead, seconds], ...]``
  and ``tpot``: ``[[backend, running, seconds_per_token], ...]``: latency
  observations, for every process's model of every backend.

``check_batch`` turns such an object into a ``Batch`` or raises
``BadBatch`` with the reason: every type, size and count is bounded, and
numbers are finite and in range. Backend names are only checked for shape
here; the process applying a batch keeps only the names it knows.
"""

import base64
import binascii
import math
import struct
from typing import Any, Dict, List, Optional, Sequence, Tuple

import attrs

# Bounds on one batch (a process flushes every few ms, far below these).
MAX_NAME = 300
MAX_PREFIX_ENTRIES = 4096
MAX_BLOCKS_PER_ENTRY = 65536  # balancer.prefix_max_blocks' own maximum
MAX_BLOCKS_PER_BATCH = 1 << 20
MAX_LOAD_ENTRIES = 4096
MAX_SAMPLES = 8192
# Values no real backend reaches; beyond them a batch is refused.
MAX_IN_FLIGHT = 1_000_000
MAX_PREFILL_TOKENS = 1_000_000_000
MAX_UNCACHED_TOKENS = 100_000_000
MAX_SECONDS = 3600.0

_B64_PER_BLOCK = 32 / 3  # 8 bytes as base64


class BadBatch(ValueError):
    """A batch that is not sound; the message says why."""


@attrs.define(slots=True)
class Batch:
    prefixes: List[Tuple[str, List[int]]] = attrs.Factory(list)
    loads: Optional[Dict[str, Tuple[int, int]]] = None
    ttft: List[Tuple[str, float, float, float]] = attrs.Factory(list)
    tpot: List[Tuple[str, float, float]] = attrs.Factory(list)


def encode_blocks(hashes: Sequence[int]) -> str:
    return base64.b64encode(struct.pack("<%dQ" % len(hashes), *hashes)).decode("ascii")


def decode_blocks(text: str) -> List[int]:
    raw = base64.b64decode(text, validate=True)
    if len(raw) % 8:
        raise BadBatch("a block list is not a whole number of 8-byte hashes")
    return list(struct.unpack("<%dQ" % (len(raw) // 8), raw))


def _name(v: Any) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME:
        raise BadBatch("a backend name that is not a short string")
    return v


def _int(v: Any, top: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
        raise BadBatch(f"a count that is not an integer from 0 to {top}")
    return v


def _number(v: Any, top: float) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise BadBatch("a value that is not a number")
    f = float(v)
    if not math.isfinite(f) or not 0 <= f <= top:
        raise BadBatch(f"a value that is not between 0 and {top:g}")
    return f


def _list(v: Any, top: int, what: str) -> list:
    if not isinstance(v, list):
        raise BadBatch(f"{what} is not a list")
    if len(v) > top:
        raise BadBatch(f"{what} has more than {top} entries")
    return v


def _row(v: Any, n: int, what: str) -> list:
    if not isinstance(v, list) or len(v) != n:
        raise BadBatch(f"an entry of {what} is not a list of {n}")
    return v


def check_batch(doc: Any) -> Batch:
    """``doc`` (decoded JSON from a peer) as a Batch; BadBatch if unsound."""
    if not isinstance(doc, dict):
        raise BadBatch("not an object")
    out = Batch()
    blocks = 0
    for item in _list(doc.get("prefixes", []), MAX_PREFIX_ENTRIES, "prefixes"):
        name, text = _row(item, 2, "prefixes")
        # Checked before decoding: a huge string is refused unread.
        if not isinstance(text, str) or len(text) > MAX_BLOCKS_PER_ENTRY * _B64_PER_BLOCK + 4:
            raise BadBatch("a block list that is not a string of at most "
                           f"{MAX_BLOCKS_PER_ENTRY} hashes")
        try:
            hashes = decode_blocks(text)
        except (binascii.Error, ValueError) as e:
            raise BadBatch(f"a block list that is not base64 of 8-byte hashes ({e})") from None
        blocks += len(hashes)
        if blocks > MAX_BLOCKS_PER_BATCH:
            raise BadBatch(f"more than {MAX_BLOCKS_PER_BATCH} blocks in one batch")
        out.prefixes.append((_name(name), hashes))
    loads = doc.get("loads")
    if loads is not None:
        if not isinstance(loads, dict) or len(loads) > MAX_LOAD_ENTRIES:
            raise BadBatch(f"loads is not an object of at most {MAX_LOAD_ENTRIES} backends")
        out.loads = {}
        for name, pair in loads.items():
            n, prefill = _row(pair, 2, "loads")
            out.loads[_name(name)] = (_int(n, MAX_IN_FLIGHT), _int(prefill, MAX_PREFILL_TOKENS))
    for item in _list(doc.get("ttft", []), MAX_SAMPLES, "ttft"):
        name, uncached, ahead, seconds = _row(item, 4, "ttft")
        out.ttft.append((_name(name), _number(uncached, MAX_UNCACHED_TOKENS),
                         _number(ahead, MAX_IN_FLIGHT), _number(seconds, MAX_SECONDS)))
    for item in _list(doc.get("tpot", []), MAX_SAMPLES, "tpot"):
        name, running, seconds = _row(item, 3, "tpot")
        out.tpot.append((_name(name), _number(running, MAX_IN_FLIGHT),
                         _number(seconds, MAX_SECONDS)))
    return out
