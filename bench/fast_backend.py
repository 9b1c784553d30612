"""A fast canned LLM backend for bench/proxy_bench.py.

    .venv/bin/python bench/fast_backend.py --port 0
    # prints "fast-backend listening on 127.0.0.1:PORT"

The mock (``python -m ntonix_mock``) is a twisted.web server and answers about
6,400 requests/s on a core: less than a gateway can relay, so a bench in front
of it measures the mock. This one answers the same shapes with much less work
per request: one process, a bare epoll loop (no reactor, no buffering of what
the socket takes at once), httptools for parsing, answers built once.

- ``POST /v1/chat/completions``: a fixed ``chat.completion`` (Content-Length),
  or, when the body has ``"stream": true``, a chunked SSE stream of
  ``max_tokens`` token events (first after ``ttft_ms``, then one every
  ``itl_ms``; with ``itl_ms`` 0, as fast as the reader reads), a final event
  and ``data: [DONE]``, as the mock sends. A stream stops generating while
  the reader does not read (what is unsent stays bounded by one burst).
- ``GET /health``: 200. ``POST /control`` with a JSON object of ``ttft_ms``,
  ``itl_ms``: sets them, as the mock's /control does.

Load only on 127.0.0.1; for benchmarks, not a model of any real server's
faults (the mock has those).
"""

import argparse
import heapq
import json
import os
import re
import select
import socket
import sys
import time
from typing import Dict, List, Optional, Tuple

import httptools

VOCAB = ("the of and to in is that for it as with was on be at by this had not are "
         "model token stream gateway cache backend latency answer prompt reactor").split()
CHUNK_HEAD = (b'{"id":"chatcmpl-fast","object":"chat.completion.chunk","created":1700000000,'
              b'"model":"mock-llm","system_fingerprint":"fp_mock","choices":[{"index":0,')


def chunk(event: bytes) -> bytes:
    """One SSE event as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(event), event)


def sse(delta: bytes, finish: bytes = b"null") -> bytes:
    return chunk(b"data: " + CHUNK_HEAD + b'"delta":' + delta
                 + b',"logprobs":null,"finish_reason":' + finish + b"}]}\n\n")


def response(status: bytes, ctype: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: %d\r\nX-Backend-Id: fast\r\n\r\n" % len(body) + body)


COMPLETION = response(b"200 OK", b"application/json", json.dumps({
    "id": "chatcmpl-fast", "object": "chat.completion", "created": 1700000000,
    "model": "mock-llm", "system_fingerprint": "fp_mock",
    "choices": [{"index": 0, "message": {"role": "assistant",
                                         "content": " ".join(VOCAB[:16])},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20},
}, separators=(",", ":")).encode())
HEALTH = response(b"200 OK", b"application/json", b'{"status":"ok","id":"fast"}')
NOT_FOUND = response(b"404 Not Found", b"application/json",
                     b'{"error":{"message":"no route","type":"invalid_request_error",'
                     b'"code":"not_found"}}')
BAD = response(b"400 Bad Request", b"application/json",
               b'{"error":{"message":"bad request","type":"invalid_request_error",'
               b'"code":"invalid_json"}}')
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
               b"Transfer-Encoding: chunked\r\nX-Backend-Id: fast\r\n\r\n"
               + sse(b'{"role":"assistant","content":""}'))
TOKENS = [sse(b'{"content":%s}' % json.dumps(w if i == 0 else " " + w).encode())
          for i, w in enumerate(VOCAB)]
STREAM_END = sse(b"{}", b'"stop"') + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"
STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
TOKENS_RE = re.compile(rb'"max(?:_completion)?_tokens"\s*:\s*(\d+)')
BURST = 64  # tokens written per turn when itl_ms is 0


class Server:
    def __init__(self, host: str, port: int) -> None:
        self.ttft = 0.0
        self.itl = 0.0
        self.ep = select.epoll()
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind((host, port))
        self.lsock.listen(4096)
        self.lsock.setblocking(False)
        self.ep.register(self.lsock.fileno(), select.EPOLLIN)
        self.conns: Dict[int, Conn] = {}
        self.timers: List[Tuple[float, int, "Stream"]] = []
        self.seq = 0

    def later(self, delay: float, stream: "Stream") -> None:
        self.seq += 1
        heapq.heappush(self.timers, (time.monotonic() + delay, self.seq, stream))

    def run(self) -> None:
        """Until the process that started this one is gone (then exit: a
        bench killed outright leaves no backend behind)."""
        lfd = self.lsock.fileno()
        conns, timers = self.conns, self.timers
        parent = os.getppid()
        check = time.monotonic() + 1.0
        while True:
            timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else 1.0
            if time.monotonic() > check:
                if os.getppid() != parent:
                    return
                check = time.monotonic() + 1.0
            for fd, ev in self.ep.poll(min(timeout, 1.0)):
                if fd == lfd:
                    self.accept()
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                if ev & select.EPOLLOUT:
                    c.flush()
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and not c.closed:
                    c.read()
            if timers:
                now = time.monotonic()
                while timers and timers[0][0] <= now:
                    heapq.heappop(timers)[2].tick()

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, for one: try later
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c = Conn(self, sock)
            self.conns[c.fd] = c
            self.ep.register(c.fd, select.EPOLLIN)

    def control(self, body: bytes) -> bytes:
        try:
            knobs = json.loads(body)
            for k in knobs:
                if k not in ("ttft_ms", "itl_ms", "reset_stats"):
                    raise ValueError(k)
            self.ttft = float(knobs.get("ttft_ms", self.ttft * 1000)) / 1000
            self.itl = float(knobs.get("itl_ms", self.itl * 1000)) / 1000
        except (ValueError, TypeError, AttributeError):
            return BAD
        return response(b"200 OK", b"application/json", json.dumps(
            {"ttft_ms": self.ttft * 1000, "itl_ms": self.itl * 1000}).encode())


class Conn:
    """One client connection: requests in order, one answer at a time."""

    def __init__(self, server: Server, sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.fd = sock.fileno()
        self.parser = httptools.HttpRequestParser(self)
        self.out = bytearray()
        self.closed = False
        self.close_after = False
        self.url = b""
        self.body: List[bytes] = []
        self.pending: List[Tuple[bytes, bytes, bytes, bool]] = []
        self.stream: Optional[Stream] = None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.pending.append((self.parser.get_method(), self.url, b"".join(self.body),
                             self.parser.should_keep_alive()))

    # I/O
    def read(self) -> None:
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.send(BAD)
            self.close_after = True
        self.answer()

    def answer(self) -> None:
        while self.pending and self.stream is None and not self.closed:
            method, url, body, keep_alive = self.pending.pop(0)
            path = url.split(b"?", 1)[0]
            if not keep_alive:
                self.close_after = True
            if method == b"POST" and path == b"/v1/chat/completions":
                if STREAM_RE.search(body):
                    m = TOKENS_RE.search(body)
                    self.stream = Stream(self, int(m.group(1)) if m else 16)
                    return
                self.send(COMPLETION)
            elif path == b"/health":
                self.send(HEALTH)
            elif method == b"POST" and path == b"/control":
                self.send(self.server.control(body))
            else:
                self.send(NOT_FOUND)
            if self.close_after:
                break
        self.maybe_close()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self.out:
            self.out += data
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.close()
            return
        if n < len(data):
            self.out += data[n:]
            self.server.ep.modify(self.fd, select.EPOLLIN | select.EPOLLOUT)

    def flush(self) -> None:
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.out[:n]
        if not self.out:
            self.server.ep.modify(self.fd, select.EPOLLIN)
            if self.stream is not None and self.stream.waiting:
                self.stream.waiting = False
                self.server.later(0, self.stream)
            self.maybe_close()

    def maybe_close(self) -> None:
        if self.close_after and not self.out and self.stream is None:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stream = None
        self.server.conns.pop(self.fd, None)
        try:
            self.server.ep.unregister(self.fd)
        except OSError:
            pass
        self.sock.close()


class Stream:
    """Token events at the server's pace, until ``n`` are sent."""

    def __init__(self, conn: Conn, n: int) -> None:
        self.conn = conn
        self.n = n
        self.sent = 0
        self.waiting = False
        conn.send(STREAM_HEAD)
        conn.server.later(conn.server.ttft, self)

    def tick(self) -> None:
        conn = self.conn
        if conn.closed or conn.stream is not self:
            return
        if conn.out:  # the reader is behind: wait for the socket to drain
            self.waiting = True
            return
        itl = conn.server.itl
        for _ in range(1 if itl > 0 else BURST):
            if self.sent >= self.n:
                conn.stream = None
                conn.send(STREAM_END)
                conn.answer()
                return
            conn.send(TOKENS[self.sent % len(TOKENS)])
            self.sent += 1
            if conn.out:
                break
        if conn.closed:
            return
        if conn.out:
            self.waiting = True
        else:
            conn.server.later(itl, self)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8001, help="listening port, 0 for any")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    args = p.parse_args(argv)
    server = Server(args.bind, args.port)
    server.ttft, server.itl = args.ttft_ms / 1000, args.itl_ms / 1000
    sys.stdout.write(f"fast-backend listening on {args.bind}:{server.lsock.getsockname()[1]}\n")
    sys.stdout.flush()
    try:
        server.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
