"""Just enough of Server-Sent Events to find a stream's first real token.

A backend often sends a role-only prelude (``"delta": {"role": "assistant"}``)
or keep-alive comments long before the first token. Those do not show that
the model is generating; the first event with content, a finish reason, usage,
an error or ``[DONE]`` does.
"""

import json
import re
from typing import Any, Optional, Tuple

_EVENT_END = re.compile(rb"\r?\n\r?\n")


def _is_content(payload: bytes) -> bool:
    if payload.strip() == b"[DONE]":
        return True
    try:
        doc: Any = json.loads(payload)
    except ValueError:
        return True  # not ours to judge: let it through
    if not isinstance(doc, dict):
        return True
    if doc.get("error") or (doc.get("usage") and not doc.get("choices")):
        return True
    for choice in doc.get("choices") or []:
        if not isinstance(choice, dict):
            return True
        if choice.get("finish_reason") or choice.get("text"):
            return True
        delta = choice.get("delta") or {}
        if isinstance(delta, dict) and any(v for k, v in delta.items() if k != "role"):
            return True
    return False


def first_content_end(buf: bytes, start: int = 0) -> Tuple[Optional[int], int]:
    """Scan complete events in ``buf`` from ``start``.

    Returns (end offset of the first content event or None, offset up to
    which complete events were scanned), so that a caller can resume.
    """
    pos = start
    while True:
        m = _EVENT_END.search(buf, pos)
        if m is None:
            return None, pos
        event = buf[pos:m.start()]
        pos = m.end()
        data = [line[5:].lstrip(b" ") for line in event.splitlines()
                if line.startswith(b"data:")]
        if data and _is_content(b"\n".join(data)):
            return pos, pos
