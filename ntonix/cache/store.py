"""A byte-bounded LRU of complete answers, with a TTL per entry.

Single-threaded by design (one reactor), so no locks. Get and put are O(1)
(an OrderedDict); the sweep of expired entries is a scan, run from a timer.
"""

from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import attrs

# Per-entry bookkeeping that the byte count includes, beside bodies and headers.
ENTRY_OVERHEAD = 256


@attrs.define
class Entry:
    """A complete 200 answer: its head and its body as the chunks it came in.

    ``times`` (streams only) are the chunk offsets in seconds from the first
    one, for paced replay.
    """

    code: int
    phrase: bytes
    headers: List[Tuple[bytes, bytes]]
    chunks: List[bytes]
    sse: bool
    stored_at: float
    expires_at: float
    times: Optional[List[float]] = None
    size: int = 0
    # Seconds the backend took for the whole answer (paces a JSON answer
    # replayed as a stream).
    duration: float = 0.0
    # (prompt, completion, cached prompt) tokens, when the answer said.
    usage: Optional[tuple] = None

    def compute_size(self) -> int:
        head = sum(len(n) + len(v) for n, v in self.headers)
        return ENTRY_OVERHEAD + head + sum(len(c) for c in self.chunks) \
            + 8 * len(self.times or ())


@attrs.define
class CacheStats:
    hits: int = 0
    misses: int = 0
    bypasses: int = 0
    coalesced: int = 0
    evictions: int = 0
    expired: int = 0
    stores: int = 0
    too_large: int = 0
    # Hits and joins served in the other framing; answers that could not be.
    converted: int = 0
    unconvertible: int = 0


class ResponseStore:
    def __init__(self, max_bytes: int, ttl: float, max_entry_bytes: int,
                 now: Callable[[], float]) -> None:
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.max_entry_bytes = max_entry_bytes
        self.now = now
        self.entries: "OrderedDict[bytes, Entry]" = OrderedDict()
        self.size_bytes = 0
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: bytes) -> Optional[Entry]:
        """The fresh entry for ``key`` (now the most recently used), or None."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self.now():
            self._drop(key)
            self.stats.expired += 1
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> bool:
        """Store ``entry``, evicting the least recently used to make room.

        False when it is larger than an entry may be, or than the whole cache.
        """
        entry.size = entry.compute_size()
        if entry.size > min(self.max_entry_bytes, self.max_bytes):
            self.stats.too_large += 1
            return False
        if key in self.entries:
            self._drop(key)
        while self.entries and self.size_bytes + entry.size > self.max_bytes:
            oldest = next(iter(self.entries))
            self._drop(oldest)
            self.stats.evictions += 1
        self.entries[key] = entry
        self.size_bytes += entry.size
        self.stats.stores += 1
        return True

    def sweep(self) -> int:
        """Drop every expired entry; returns how many."""
        now = self.now()
        dead = [k for k, e in self.entries.items() if e.expires_at <= now]
        for k in dead:
            self._drop(k)
        self.stats.expired += len(dead)
        return len(dead)

    def clear(self) -> int:
        n = len(self.entries)
        self.entries.clear()
        self.size_bytes = 0
        return n

    def _drop(self, key: bytes) -> None:
        entry = self.entries.pop(key)
        self.size_bytes -= entry.size

    def as_json(self, enabled: bool) -> dict:
        s = self.stats
        looked = s.hits + s.misses
        return {
            "enabled": enabled, "hits": s.hits, "misses": s.misses,
            "hit_rate": round(s.hits / looked, 4) if looked else 0.0,
            "evictions": s.evictions, "expired": s.expired, "entries": len(self.entries),
            "size_bytes": self.size_bytes, "max_size_bytes": self.max_bytes,
            "coalesced": s.coalesced, "bypasses": s.bypasses, "stores": s.stores,
            "too_large": s.too_large, "ttl_seconds": self.ttl,
            "converted": s.converted, "unconvertible": s.unconvertible,
        }
