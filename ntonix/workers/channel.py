"""Parent <-> worker messages: JSON objects in netstrings over the worker's
stdin and stdout (Twisted's NetstringReceiver: length-prefixed, so a message
of any size, a metrics page included, is one message).

A request is ``{"id": N, "op": NAME, ...}``; its answer ``{"re": N, ...}``
(``"error": text`` when it failed). Requests without an answer carry no id.
"""

import json
from typing import Any, Callable, Dict, Optional

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.basic import NetstringReceiver

log = Logger(namespace="ntonix.workers.channel")

# A worker's metrics page for hundreds of backends stays well below this.
MAX_MESSAGE = 64 * 1024 * 1024


class ChannelError(Exception):
    pass


def encode(msg: Dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


class Channel(NetstringReceiver):
    MAX_LENGTH = MAX_MESSAGE

    def __init__(self, handler: Optional[Callable[[Dict[str, Any]], Any]] = None) -> None:
        self.handler = handler  # op -> reply dict (or a Deferred of one)
        self.pending: Dict[int, defer.Deferred] = {}
        self.next_id = 0
        self.lost = False
        self.on_lost: Optional[Callable[[], None]] = None

    def send(self, msg: Dict[str, Any]) -> None:
        self.send_encoded(encode(msg))

    def send_encoded(self, data: bytes) -> None:
        """A message already encoded (``encode``): one encoding for many
        channels."""
        if not self.lost and self.transport is not None:
            self.sendString(data)

    def call(self, op: str, timeout: float, clock: Any, **args: Any) -> defer.Deferred:
        """Ask the other side; fires with its answer, or fails (ChannelError,
        or a TimeoutError after ``timeout``)."""
        if self.lost:
            return defer.fail(ChannelError("the worker is gone"))
        self.next_id += 1
        n = self.next_id
        d: defer.Deferred = defer.Deferred(lambda _: self.pending.pop(n, None))
        self.pending[n] = d
        self.send({"id": n, "op": op, **args})
        return d.addTimeout(timeout, clock)

    def tell(self, op: str, **args: Any) -> None:
        self.send({"op": op, **args})

    def stringReceived(self, data: bytes) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            log.warn("channel: a message that is not JSON, ignored")
            return
        if "re" in msg:
            d = self.pending.pop(msg["re"], None)
            if d is not None:
                if "error" in msg:
                    d.errback(ChannelError(msg["error"]))
                else:
                    d.callback(msg)
            return
        if self.handler is None:
            return
        n = msg.get("id")
        d = defer.maybeDeferred(self.handler, msg)
        if n is not None:
            d.addCallbacks(lambda reply: self.send({"re": n, **(reply or {})}),
                           lambda f: self.send({"re": n, "error": f.getErrorMessage()}))
        d.addErrback(lambda f: log.failure("channel request {op}", f, op=msg.get("op")))

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        pending, self.pending = self.pending, {}
        for d in pending.values():
            d.errback(ChannelError("the worker is gone"))
        if self.on_lost is not None:
            self.on_lost()
