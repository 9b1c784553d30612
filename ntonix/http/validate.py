"""Checks on what a client sends, before anything goes upstream."""

import json
from typing import Any, Dict, Optional


ROUTE_CHAT, ROUTE_COMPLETIONS, ROUTE_EMBEDDINGS = "chat", "completions", "embeddings"


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


def decode_json_body(body: bytes) -> Any:
    """Parse a request body strictly: UTF-8, JSON, bounded nesting."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(400, f"request body is not UTF-8 (bad byte at offset {e.start})",
                         "invalid_encoding") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest(400, "request body JSON is nested too deeply", "invalid_json") from None
    except ValueError as e:
        raise BadRequest(400, f"request body is not valid JSON: {e}", "invalid_json") from None


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
