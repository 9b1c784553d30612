"""Token usage read from answers as they are relayed.

A JSON answer carries ``usage`` near its end: the relay keeps its last bytes
and reads them once it ended (``usage_numbers``). A stream carries it in its last chunk, and only when the
request asked for it (``stream_options.include_usage``); when the client did
not, the gateway asks the backend for it anyway and takes that one chunk out
before the client sees it, so the client gets exactly the events it asked
for. Taking a chunk out needs event boundaries: a partial event (rarely more
than one read) is held until its end; past ``HOLD_LIMIT`` (a backend that
never ends an event) the tap gives up stripping and relays as it is.
Nothing is ever made up: no usage in the answer, no tokens counted.
"""

import json
import re
from typing import List, Optional, Tuple

HOLD_LIMIT = 64 * 1024
_NUMBER = {name: re.compile(rb'"%s"\s*:\s*(\d+)' % name.encode())
           for name in ("prompt_tokens", "completion_tokens", "cached_tokens")}
_BOUNDARY = re.compile(rb"\r?\n\r?\n")


def inject_include_usage(body: bytes) -> Optional[bytes]:
    """``body`` (a JSON object without ``stream_options``) asking for the
    usage chunk; None when it cannot be done by splicing."""
    i = body.find(b"{")
    if i < 0 or body[:i].strip():
        return None
    return body[:i + 1] + b'"stream_options":{"include_usage":true},' + body[i + 1:]


def usage_numbers(blob: bytes) -> Optional[Tuple[int, int, int]]:
    """(prompt, completion, cached prompt) tokens of the last ``usage``
    object in ``blob``."""
    at = blob.rfind(b'"usage"')
    if at < 0:
        return None
    tail = blob[at:]
    p = _NUMBER["prompt_tokens"].search(tail)
    c = _NUMBER["completion_tokens"].search(tail)
    if p is None and c is None:
        return None
    cached = _NUMBER["cached_tokens"].search(tail)
    return (int(p.group(1)) if p else 0, int(c.group(1)) if c else 0,
            int(cached.group(1)) if cached else 0)


class UsageTap:
    """Reads (and with ``strip`` takes out) a stream's usage chunk."""

    __slots__ = ("strip", "partial", "usage", "events", "gave_up")

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.partial = b""
        self.usage: Optional[Tuple[int, int, int]] = None
        self.events = 0  # data events seen
        self.gave_up = False

    def feed(self, data: bytes) -> bytes:
        """What of ``data`` the client gets (all of it, unless stripping)."""
        self.events += data.count(b"data:")
        buf = self.partial + data if self.partial else data
        cut = _last_boundary(buf)
        if cut < 0:
            complete, self.partial = b"", buf
        else:
            complete, self.partial = buf[:cut], buf[cut:]
        if complete and b'"usage"' in complete:
            complete = self._read_usage(complete)
        if not self.strip:
            if len(self.partial) > HOLD_LIMIT:
                self.partial = b""  # only ever looked at: nothing to hold
            return data
        if len(self.partial) > HOLD_LIMIT:
            self.strip, self.gave_up = False, True
            complete, self.partial = complete + self.partial, b""
        return complete

    def end(self) -> bytes:
        """The answer ended: what is still held back, if anything."""
        rest, self.partial = self.partial, b""
        return rest if self.strip else b""

    def _read_usage(self, complete: bytes) -> bytes:
        out = []
        for block in split_events(complete):
            if b'"usage"' in block and b'"usage":null' not in block \
                    and b'"usage": null' not in block:
                found = usage_numbers(block)
                if found is not None:
                    self.usage = found
                    if self.strip and is_usage_only(block):
                        continue
            out.append(block)
        return b"".join(out)


def _last_boundary(buf: bytes) -> int:
    """The offset just past the last event boundary in ``buf``, or -1."""
    i = buf.rfind(b"\n\n")
    j = buf.rfind(b"\r\n\r\n")
    if i < 0 and j < 0:
        return -1
    return max(i + 2 if i >= 0 else -1, j + 4 if j >= 0 else -1)


def split_events(data: bytes) -> List[bytes]:
    """``data`` (whole events) as one bytes per event, separators kept."""
    out = []
    pos = 0
    for m in _BOUNDARY.finditer(data):
        out.append(data[pos:m.end()])
        pos = m.end()
    if pos < len(data):
        out.append(data[pos:])
    return out


def is_usage_only(block: bytes) -> bool:
    """One SSE event that is the final usage chunk: no choices, only usage."""
    if b'"usage"' not in block:
        return False
    payload = b"\n".join(line[5:].lstrip() for line in block.splitlines()
                         if line.startswith(b"data:"))
    try:
        doc = json.loads(payload)
    except ValueError:
        return False
    return isinstance(doc, dict) and not doc.get("choices") and isinstance(doc.get("usage"), dict)
