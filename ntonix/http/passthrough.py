"""Which requests outside the gateway's own routes reach a backend as they
are (``proxy.passthrough``), and which paths are fit to be relayed at all.

A backend's URL space holds more than inference: vLLM loads and unloads LoRA
adapters at run time (``/v1/load_lora_adapter``), llama.cpp saves and
restores slots. Those are the operator's, not a client's, so passthrough is
an allow-list of ``METHOD /path`` entries (``/path`` alone: GET and POST;
a last segment ``*``: anything below it), the inference routes of the
servers we front by default.

A path is relayed only in its normal form: no dot-segments, no empty
segments, no encoded dot, slash or backslash. Servers and proxies disagree
on how to read ``/v1/%2e%2e/metrics``; refusing it is the only reading that
cannot be turned against a backend.
"""

import re
from typing import FrozenSet, Iterable, Optional, Tuple

import attrs

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
# Methods that may be sent again after a backend failed with nothing
# relayed yet: they ask, they do not change anything.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS"})

DEFAULT_PASSTHROUGH = (
    # OpenAI Responses (vLLM), and its stored responses.
    "POST /v1/responses", "GET /v1/responses/*", "POST /v1/responses/*",
    "DELETE /v1/responses/*",
    # Anthropic Messages (vLLM, llama.cpp).
    "POST /v1/messages", "POST /v1/messages/count_tokens",
    # Audio, images, moderation, reranking and scoring, tokenizing.
    "POST /v1/audio/*", "POST /v1/images/*", "POST /v1/moderations",
    "POST /v1/rerank", "POST /v1/score", "POST /v1/classify",
    "POST /v1/tokenize", "POST /v1/detokenize",
)

_ENTRY = re.compile(r"(?:(GET|POST|PUT|PATCH|DELETE) )?(/v1(?:/[A-Za-z0-9._~:@!$&'()+,;=-]+)+"
                    r"(?:/\*)?)")
_BAD_ENCODED = re.compile(rb"%(?:2e|2f|5c)", re.I)


def entry_problem(entry: str) -> Optional[str]:
    """Why ``entry`` is not a passthrough entry (None when it is)."""
    m = _ENTRY.fullmatch(entry.strip())
    if m is None:
        return ("expected \"METHOD /v1/path\" (METHOD one of " + ", ".join(METHODS)
                + "; a last segment * for anything below)")
    if path_problem(m.group(2).replace("/*", "/x").encode()) is not None:
        return "the path must be in normal form (no . or .. segments)"
    return None


def path_problem(path: bytes) -> Optional[str]:
    """Why ``path`` (without its query) cannot be relayed as it is; None
    when it is in normal form."""
    if b"\\" in path or b"//" in path or _BAD_ENCODED.search(path):
        return "empty segments, backslashes and encoded dots or slashes are not relayed"
    for segment in path.split(b"/"):
        if segment in (b".", b".."):
            return "dot-segments (. and ..) are not relayed"
    return None


@attrs.frozen
class PassthroughPolicy:
    exact: FrozenSet[Tuple[bytes, bytes]]
    prefixes: Tuple[Tuple[bytes, bytes], ...]  # (method, path prefix ending in /)

    @classmethod
    def from_entries(cls, entries: Iterable[str]) -> "PassthroughPolicy":
        exact = set()
        prefixes = []
        for entry in entries:
            m = _ENTRY.fullmatch(entry.strip())
            if m is None:
                continue  # refused when the configuration was read
            methods = [m.group(1)] if m.group(1) else ["GET", "POST"]
            path = m.group(2)
            for method in methods:
                if path.endswith("/*"):
                    prefixes.append((method.encode(), path[:-1].encode()))
                else:
                    exact.add((method.encode(), path.encode()))
        return cls(frozenset(exact), tuple(prefixes))

    def allows(self, method: bytes, path: bytes) -> bool:
        if (method, path) in self.exact:
            return True
        return any(method == m and path.startswith(p) and len(path) > len(p)
                   for m, p in self.prefixes)
