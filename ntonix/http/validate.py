"""Checks on what a client sends, before anything goes upstream."""

import json
from typing import Any, Dict, Optional


ROUTE_CHAT, ROUTE_COMPLETIONS, ROUTE_EMBEDDINGS = "chat", "completions", "embeddings"

# server.max_json_depth's default: far deeper than any OpenAI request (a tool's
# JSON schema nests about ten levels), far shallower than the ~1,000 frames
# of Python's recursion limit, which the cache key, the router and the
# relay's own recursive code share with the reactor's stack.
DEFAULT_MAX_JSON_DEPTH = 64
# Bodies up to this size are first checked by counting their brackets (C
# speed, about 0.7 ns a byte for both counts): fewer openers than the limit
# cannot nest deeper. Past it the count can cost more than the walk it would
# save (a long prompt is a few strings: its walk takes a microsecond).
_COUNT_FIRST_BYTES = 4096
_CONTAINERS = (dict, list)


class BadRequest(Exception):
    """The request cannot be forwarded; carries the status and a clear reason."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


def check_content_type(content_type: Optional[bytes]) -> None:
    """The request's Content-Type header value (None when absent) must say JSON."""
    ctype = (content_type or b"").decode("latin-1")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise BadRequest(415, "Content-Type must be application/json, not "
                         + (repr(ctype) if ctype else "missing"),
                         "unsupported_media_type")


def decode_json_body(body: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> Any:
    """Parse a request body strictly: UTF-8, JSON, nested ``max_depth``
    levels at most (``server.max_json_depth``), so that no code given the
    document later (the cache key, the scheduler) can recurse too deep."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(400, f"request body is not UTF-8 (bad byte at offset {e.start})",
                         "invalid_encoding") from None
    try:
        doc = json.loads(text)
    except RecursionError:
        # Past ~1,000 levels the C parser itself gives up.
        raise _too_deep(max_depth) from None
    except ValueError as e:
        raise BadRequest(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    if len(body) <= _COUNT_FIRST_BYTES and body.count(b"[") + body.count(b"{") <= max_depth:
        return doc
    if nested_deeper(doc, max_depth):
        raise _too_deep(max_depth)
    return doc


def nested_deeper(doc: Any, limit: int) -> bool:
    """Whether ``doc`` has containers nested more than ``limit`` deep (``[]``
    is one level, ``[{}]`` two).

    A walk of the parsed document, one level at a time, with no recursion,
    chosen over a scan of the raw bytes counting brackets outside strings
    (C-speed bytes methods: translate, split on quotes, but first undoing
    the ``\\\\`` and ``\\"`` escapes). Measured, as a share of ``json.loads``
    on the same body: a 200-message chat, walk 0.46, scan 1.2; a 43 KB code
    prompt, walk 0.02, scan 3.7; 100 agent turns with tools, walk 0.56,
    scan 0.94; only five tool schemas alone favoured the scan (0.4 against
    0.9). The scan's cost follows the bytes and the escapes, the walk's the
    number of values, and a prompt is mostly long strings.
    """
    if type(doc) not in _CONTAINERS:
        return False
    level = [doc]
    depth = 1
    while depth <= limit:
        deeper: list = []
        add = deeper.append
        for node in level:
            for value in (node.values() if type(node) is dict else node):
                if type(value) in _CONTAINERS:
                    add(value)
        if not deeper:
            return False
        level = deeper
        depth += 1
    return True


def _too_deep(max_depth: int) -> BadRequest:
    return BadRequest(400, f"request body JSON is nested too deeply: more than {max_depth} "
                      "levels of arrays and objects (server.max_json_depth)", "json_too_deep")


def check_body(route: str, doc: Any) -> Dict[str, Any]:
    """The parsed body if it has the shape the route needs, else BadRequest."""
    if not isinstance(doc, dict):
        raise BadRequest(400, "request body must be a JSON object", "invalid_request")
    if "stream" in doc and not isinstance(doc["stream"], bool):
        raise BadRequest(400, "stream must be true or false", "invalid_request")
    if route == ROUTE_CHAT:
        messages = doc.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(400, "messages must be a non-empty list", "invalid_messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise BadRequest(400, f"messages[{i}] must be an object", "invalid_messages")
            if not isinstance(m.get("role"), str) or not m["role"]:
                raise BadRequest(400, f"messages[{i}] has no role", "invalid_messages")
    elif route == ROUTE_COMPLETIONS:
        if "prompt" not in doc:
            raise BadRequest(400, "prompt is required", "invalid_request")
    elif route == ROUTE_EMBEDDINGS:
        if "input" not in doc:
            raise BadRequest(400, "input is required", "invalid_request")
    return doc
