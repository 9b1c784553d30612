"""The admin routes' answer made outside the Router: the contract between a
worker's Router and the supervisor that has the gateway-wide figures.

With ``server.workers`` > 1 each worker sees only its own requests, cache
and queue. The public port's admin routes (``/metrics``, ``/cache/stats``,
...) then answer with what an ``AdminView`` gives: a whole ``Answer``,
computed once for the gateway by the supervisor, the same bytes as its
admin listener serves. An ``AdminView`` promises to fire or fail within its
own bound; the Router answers a failure with 503.
"""

from typing import Any, Protocol

import attrs
from twisted.internet import defer


@attrs.frozen
class Answer:
    """A whole HTTP answer: status, Content-Type and body."""

    status: int
    content_type: bytes
    body: bytes

    def to_message(self) -> dict:
        """As a channel message (JSON): the bodies are UTF-8 text."""
        return {"status": self.status, "content_type": self.content_type.decode("latin-1"),
                "body": self.body.decode("utf-8")}

    @classmethod
    def from_message(cls, msg: dict) -> "Answer":
        return cls(int(msg["status"]), msg["content_type"].encode("latin-1"),
                   msg["body"].encode("utf-8"))


class AdminView(Protocol):
    def __call__(self, path: bytes, accept: bytes) -> "defer.Deferred[Answer]":
        """The gateway-wide answer to GET ``path`` (with this Accept header);
        fails (never hangs) when it cannot be had within the view's bound."""


def send_answer(request: Any, answer: Answer) -> None:
    """Write ``answer`` to ``request``, whole, unless the client has gone."""
    if request.finished or request.disconnected:
        return
    request.setResponseCode(answer.status)
    request.setHeader(b"Content-Type", answer.content_type)
    request.setHeader(b"Content-Length", b"%d" % len(answer.body))
    request.write(answer.body)
    request.finish()
