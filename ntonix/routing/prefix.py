"""What each backend's prefix (KV) cache probably holds.

A prompt is rendered to bytes (the model, then the messages in order), cut
into fixed-size blocks, and each block hashed together with the hash before
it, so that one block hash stands for the whole prefix up to its end: two
prompts share block ``i`` exactly when their first ``i + 1`` blocks are equal.
This is the scheme of vLLM's automatic prefix caching and of the Gateway API
Inference Extension's prefix scorer, on rendered text rather than tokens (the
gateway has no tokenizer): the blocks do not line up with the server's, but
a shared prefix is shared in both.

The index remembers, per backend, the blocks the gateway sent there, bounded
by a capacity with least-recently-used eviction: a model of the backend's own
LRU cache. Lookups go through one dictionary from block hash to the backends
that hold it, so that matching a prompt costs the blocks it matches, not the
number of backends.
"""

import json
from collections import OrderedDict
from typing import Any, Dict, Hashable, List, Mapping

import xxhash

_xxh = xxhash.xxh3_64_intdigest


def render_prompt(route: str, doc: Mapping[str, Any]) -> bytes:
    """The bytes a backend's prefix cache is keyed on, near enough: the model
    (caches are per model and adapter), then the messages in order."""
    model = doc.get("model")
    parts: List[str] = [model if isinstance(model, str) else "", "\x00"]
    if route == "chat":
        for m in doc.get("messages") or ():
            if not isinstance(m, dict):
                continue
            role = m.get("role")
            content = m.get("content")
            parts.append(role if isinstance(role, str) else "")
            parts.append("\x1e")
            if isinstance(content, str):
                parts.append(content)
            elif content is not None:
                parts.append(json.dumps(content, sort_keys=True, ensure_ascii=False))
            parts.append("\x1f")
    else:
        prompt = doc.get("prompt")
        parts.append(prompt if isinstance(prompt, str)
                     else json.dumps(prompt, ensure_ascii=False))
    return "".join(parts).encode("utf-8", "surrogatepass")


def block_hashes(data: bytes, block_bytes: int, max_blocks: int) -> List[int]:
    """Chained hashes of the full leading blocks of ``data`` (at most
    ``max_blocks``); a tail shorter than a block is not cacheable."""
    out: List[int] = []
    prev = b""
    n = min(len(data) // block_bytes, max_blocks)
    for i in range(n):
        h = _xxh(prev + data[i * block_bytes:(i + 1) * block_bytes])
        out.append(h)
        prev = h.to_bytes(8, "little")
    return out


class PrefixIndex:
    """Per backend, an LRU of the block hashes sent there."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._holders: Dict[int, Dict[Hashable, None]] = {}
        self._lru: Dict[Hashable, "OrderedDict[int, None]"] = {}

    def blocks_of(self, backend: Hashable) -> int:
        lru = self._lru.get(backend)
        return len(lru) if lru is not None else 0

    def match(self, hashes: List[int]) -> Dict[Hashable, int]:
        """Backend -> number of leading blocks of ``hashes`` it holds (only
        backends holding at least the first)."""
        holders = self._holders
        first = holders.get(hashes[0]) if hashes else None
        if not first:
            return {}
        matched = dict.fromkeys(first, 1)
        alive = list(first)
        for i in range(1, len(hashes)):
            hs = holders.get(hashes[i])
            if not hs:
                break
            alive = [b for b in alive if b in hs]
            if not alive:
                break
            for b in alive:
                matched[b] = i + 1
        return matched

    def add(self, backend: Hashable, hashes: List[int]) -> None:
        """``hashes`` were sent to ``backend``: most recent now."""
        lru = self._lru.get(backend)
        if lru is None:
            lru = self._lru[backend] = OrderedDict()
        holders = self._holders
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            hs = holders.get(h)
            if hs is None:
                holders[h] = {backend: None}
            else:
                hs[backend] = None
        while len(lru) > self.capacity:
            old, _ = lru.popitem(last=False)
            self._drop(old, backend)

    def _drop(self, h: int, backend: Hashable) -> None:
        hs = self._holders.get(h)
        if hs is not None:
            hs.pop(backend, None)
            if not hs:
                del self._holders[h]

    def forget(self, backend: Hashable) -> None:
        """A backend left, or its cache is known to be gone (it restarted)."""
        lru = self._lru.pop(backend, None)
        for h in lru or ():
            self._drop(h, backend)

    def resize(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        for backend, lru in self._lru.items():
            while len(lru) > capacity_blocks:
                old, _ = lru.popitem(last=False)
                self._drop(old, backend)
