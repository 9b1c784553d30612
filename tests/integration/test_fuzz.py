"""A property-based fuzzer (hypothesis) against the real ``twistd ntonix``.

Each example is one client connection carrying bytes made from valid requests
(chat, completions, embeddings, the GET routes; Content-Length or chunked
bodies) by mutation: header lines cut, spliced in, duplicated and reordered;
request line parts swapped; chunked bodies re-cut with odd sizes, extensions
and trailers; transfer-coding lists (one header or two); bodies nested around
and far past server.max_json_depth; then random bytes inserted, removed,
duplicated or overwritten anywhere. The bytes go over a real socket (sometimes in pieces), and then:

- the connection ends (the gateway closes it) within ``BOUND`` seconds;
- everything the gateway sent is well-formed HTTP/1.1: status lines, header
  lines, Content-Length or chunked framing, nothing left over; a 4xx has an
  OpenAI-shaped JSON error body, a 2xx a JSON body (or an event stream of
  JSON events); no 5xx (the backend is healthy) but a 501 for a transfer
  coding the gateway does not decode;
- no traceback in the gateway's log;
- a valid chat completion on a new connection still succeeds.

The gateway and its mock backend are child processes (plain blocking sockets
here: no reactor runs in the test), with short head, body and keep-alive
deadlines so that every connection ends quickly. The example budget is fixed
and derandomized for CI; ``NTONIX_FUZZ_EXAMPLES=3000`` raises it.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import LISTENING, gateway_env, twistd_argv

EXAMPLES = int(os.environ.get("NTONIX_FUZZ_EXAMPLES", "400"))
BOUND = 5.0  # seconds a connection may stay open after the client has sent all
DEADLINE = 0.5  # the gateway's head, body and idle deadlines
MAX_BODY = 20000
BAD_LOG = ("Traceback", "Unhandled", "CRITICAL")


# -- the processes under test

class Child:
    """A child process whose output (stdout and stderr) is kept."""

    def __init__(self, argv: List[str], env: Dict[str, str]) -> None:
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.lines: List[str] = []
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            with self.lock:
                self.lines.append(raw.decode("utf-8", "replace"))

    def text(self, start: int = 0) -> str:
        with self.lock:
            return "".join(self.lines[start:])

    def mark(self) -> int:
        with self.lock:
            return len(self.lines)

    def wait_for(self, pattern: "re.Pattern[bytes]", timeout: float = 30.0) -> "re.Match":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = pattern.search(self.text().encode())
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.proc.args[:3]} did not start:\n{self.text()}")

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reader.join(5)
        return self.proc.returncode


@pytest.fixture(scope="module")
def gateway():
    env = gateway_env()
    mock = Child([sys.executable, "-m", "ntonix_mock", "--port", "0", "--id", "fuzz"], env)
    mock_port = int(mock.wait_for(re.compile(rb"listening on [0-9.]+:(\d+)")).group(1))
    gw = Child(twistd_argv([
        "--port", "0", "--bind", "127.0.0.1", "--backend", f"127.0.0.1:{mock_port}",
        "--set", f"server.header_timeout_seconds={DEADLINE}",
        "--set", f"server.body_timeout_seconds={DEADLINE}",
        "--set", f"server.idle_timeout_seconds={DEADLINE}",
        "--set", f"server.max_body_bytes={MAX_BODY}",
        "--set", "admin.http_port=-1",
    ]), env)
    try:
        gw.port = int(gw.wait_for(LISTENING).group(2))
        gw.mock_port = mock_port
        yield gw
    finally:
        gw.stop()
        mock.stop()
    assert not any(s in gw.text() for s in BAD_LOG), gw.text()[-5000:]


# -- what a client sends: valid requests, then mutations

CRLF = b"\r\n"
PROMPT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(
    ["hello", "", "\ud800", "\x00", "a\nb", "\u2028", "😀"])
# (The admin routes live on the admin listener, not on this port.)
GET_PATHS = [b"/health", b"/v1/models", b"/", b"/livez", b"/readyz", b"/nope", b"/health?x=1",
             b"http://fuzz/health"]
POST_ROUTES = [b"/v1/chat/completions", b"/v1/completions", b"/v1/embeddings",
               b"http://fuzz/v1/chat/completions", b"/v1/chat/completions?a=b"]
METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT",
           b"TRACE", b"PRI", b"get", b"P0ST", b"", b"GET GET"]
TARGETS = [b"*", b"", b"/", b"//", b"/v1/chat/completions#frag", b"/%00", b"/%zz",
           b"http://", b"https://fuzz:99999/health", b"ftp://fuzz/", b"fuzz:443",
           b"/" + b"a" * 3000, b"/health\x00", b"/h\x7fealth", b"/\xff", b"/a b",
           # Paths out of normal form, encoded or not, and management routes:
           # refused before any backend sees them (docs/security.md).
           b"/v1/../metrics", b"/v1/%2e%2e/metrics", b"/v1/%2E%2e/admin", b"/v1/a%2fb",
           b"/v1//models", b"/v1/./x", b"/v1/a%5c..", b"/v1/load_lora_adapter",
           b"/v1/responses/%2e%2e/x", b"/v1/rerank;x=1"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1",
            b"HTTP/1.1 ", b"HTTP/11", b"HTTP/", b"", b"HTTP/1.1\x00"]
INTERESTING_HEADERS = [
    b"Authorization: Bearer sk-fuzz-a", b"Authorization: Bearer sk-fuzz-b", b"x-api-key: k",
    b"X-Forwarded-For: 6.6.6.6", b"Forwarded: for=6.6.6.6", b"X-Tenant: oncall",
    b"Content-Length: 0", b"Content-Length: 5", b"Content-Length: -1", b"Content-Length: 1e3",
    b"Content-Length: 0x10", b"Content-Length: 5, 5", b"Content-Length: +5",
    b"Content-Length: 99999999999999999999999", b"Content-Length: 20001",
    b"Content-Length:", b"Content-Length : 5",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: identity", b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: chunked, chunked", b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, gzip", b"Transfer-Encoding:\tchunked",
    b"Transfer-Encoding: CHUNKED", b"Transfer-Encoding : chunked", b"Transfer-Encoding:",
    b"Host: fuzz", b"Host: other", b"Host:", b"Host: a b", b"Host: [::1", b"HOST: fuzz",
    b"Connection: close", b"Connection: keep-alive", b"Connection: upgrade",
    b"Connection: close, keep-alive", b"Connection: Upgrade, HTTP2-Settings",
    b"Upgrade: websocket", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA",
    b"Expect: 100-continue", b"Expect: 100-Continue", b"Expect: nothing",
    b"X-Request-ID: fuzz-1", b"X-Request-ID: \x01bad", b"X-Request-ID: " + b"r" * 400,
    b"X-Request-ID: a\rb", b"X-Request-ID: \xff\xfe",
    b"Authorization: Bearer sk-fuzz", b"Authorization:",
    b"Content-Type: text/plain", b"Content-Type: application/json; charset=utf-8",
    b"Content-Type: APPLICATION/JSON", b"Content-Type: application/jsonx",
    b"Content-Type:", b"Accept: text/plain", b"Accept: application/openmetrics-text",
    b"Accept: text/event-stream", b"Accept-Encoding: gzip, br", b"Proxy-Connection: keep-alive",
    b"Keep-Alive: timeout=1", b"TE: trailers", b"Trailer: X-T", b"Cookie: a=b",
    b"X-Forwarded-For: 203.0.113.9", b"Forwarded: for=evil", b"Via: 1.1 fuzz",
    b" folded continuation", b"\tfolded", b"NoColonHere", b": no-name", b"X-Empty:",
    b"X Space: 1", b"X-Nul: a\x00b", b"\x00: x", b"X\x7fDel: 1", b"X-Obs: caf\xe9",
    b"X-Long: " + b"v" * 6000, b"X-Lf: a\nb", b"",
]


class Message:
    """One HTTP request as parts that mutations can change."""

    def __init__(self, method: bytes, target: bytes, version: bytes,
                 headers: List[bytes], body: bytes, chunked: bool) -> None:
        self.method, self.target, self.version = method, target, version
        self.headers, self.body, self.chunked = headers, body, chunked
        # Whether the gateway must answer it 2xx as it is (before mutations).
        self.expect_ok = target != b"/nope"
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            self.expect_ok = False
        # Chunked framing, as (size line, data, line end) per chunk, and the end.
        self.chunks: List[Tuple[bytes, bytes, bytes]] = []
        self.last_chunk = b"0\r\n\r\n"
        if chunked:
            self.rechunk([len(body)] if body else [])

    def rechunk(self, sizes: List[int]) -> None:
        self.chunks, at = [], 0
        for n in sizes:
            if at >= len(self.body):
                break
            data = self.body[at:at + n]
            at += len(data)
            self.chunks.append((b"%x" % len(data), data, CRLF))
        if at < len(self.body):
            self.chunks.append((b"%x" % (len(self.body) - at), self.body[at:], CRLF))

    def serialize(self, eol: bytes = CRLF) -> bytes:
        line = b" ".join(p for p in (self.method, self.target, self.version))
        head = eol.join([line, *self.headers]) + eol + eol
        if not self.chunked:
            return head + self.body
        return head + b"".join(size + CRLF + data + end
                               for size, data, end in self.chunks) + self.last_chunk


@st.composite
def valid_message(draw) -> Message:
    version = draw(st.sampled_from([b"HTTP/1.1"] * 4 + [b"HTTP/1.0"]))
    headers = [b"Host: fuzz"] if version == b"HTTP/1.1" or draw(st.booleans()) else []
    if draw(st.booleans()):
        headers.append(draw(st.sampled_from([b"Connection: close", b"Connection: keep-alive"])))
    if draw(st.booleans()):
        headers.append(b"X-Request-ID: fuzz-%d" % draw(st.integers(0, 999)))
    if draw(st.integers(0, 3)) == 0:
        method = draw(st.sampled_from([b"GET", b"GET", b"HEAD"]))
        return Message(method, draw(st.sampled_from(GET_PATHS)), version, headers, b"", False)
    target = draw(st.sampled_from(POST_ROUTES))
    text = draw(PROMPT)
    if b"embeddings" in target:
        doc = {"model": "mock-llm", "input": draw(st.sampled_from([text, [text, "x"]]))}
    elif target.startswith(b"/v1/completions"):
        doc = {"model": "mock-llm", "prompt": text, "max_tokens": draw(st.integers(1, 8))}
    else:
        doc = {"model": "mock-llm", "messages": [{"role": "user", "content": text}],
               "max_tokens": draw(st.integers(1, 8))}
    if b"embeddings" not in target and draw(st.booleans()):
        doc["stream"] = draw(st.booleans())
    if draw(st.booleans()):
        doc["temperature"] = draw(st.sampled_from([0, 0.7]))
    body = json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    headers.append(b"Content-Type: application/json")
    chunked = version == b"HTTP/1.1" and draw(st.integers(0, 3)) == 0
    headers.append(b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % len(body))
    if draw(st.integers(0, 5)) == 0:
        headers.append(b"Expect: 100-continue")
    order = draw(st.permutations(range(len(headers))))
    return Message(b"POST", target, version, [headers[i] for i in order], body, chunked)


def _index(draw, seq) -> int:
    return draw(st.integers(0, max(len(seq) - 1, 0)))


def m_drop_header(draw, m: Message) -> None:
    if m.headers:
        del m.headers[_index(draw, m.headers)]


def m_duplicate_header(draw, m: Message) -> None:
    if m.headers:
        line = m.headers[_index(draw, m.headers)]
        m.headers.insert(draw(st.integers(0, len(m.headers))), line)


def m_reorder_headers(draw, m: Message) -> None:
    order = draw(st.permutations(range(len(m.headers))))
    m.headers = [m.headers[i] for i in order]


def m_splice_header(draw, m: Message) -> None:
    line = draw(st.sampled_from(INTERESTING_HEADERS)
                | st.binary(max_size=40).map(lambda b: b"X-Fuzz: " + b))
    m.headers.insert(draw(st.integers(0, len(m.headers))), line)


def m_cut_header(draw, m: Message) -> None:
    """Cut one header line short (possibly inside its name)."""
    if m.headers:
        i = _index(draw, m.headers)
        m.headers[i] = m.headers[i][:draw(st.integers(0, len(m.headers[i])))]


def m_header_value(draw, m: Message) -> None:
    if m.headers:
        i = _index(draw, m.headers)
        name = m.headers[i].split(b":", 1)[0]
        value = draw(st.binary(max_size=20) | st.sampled_from(
            [b"", b" ", b"0", b"-0", b"00000000000000000000005", b"1 2", b"\t5\t", b"5 ",
             b"chunked", b" chunked", b"chunked,", b",chunked"]))
        m.headers[i] = name + b":" + value


def m_header_spacing(draw, m: Message) -> None:
    if m.headers:
        i = _index(draw, m.headers)
        name, _, value = m.headers[i].partition(b":")
        pad = draw(st.sampled_from([b" ", b"\t", b"  ", b"\x0b", b"\x0c"]))
        m.headers[i] = draw(st.sampled_from([
            name + pad + b":" + value, pad + name + b":" + value, name + b":" + value + pad,
            name.upper() + b":" + value, name.lower() + b":" + value]))


def m_method(draw, m: Message) -> None:
    m.method = draw(st.sampled_from(METHODS) | st.binary(min_size=1, max_size=8))


def m_target(draw, m: Message) -> None:
    m.target = draw(st.sampled_from(TARGETS + GET_PATHS + POST_ROUTES)
                    | st.binary(max_size=30).map(lambda b: b"/" + b))


def m_version(draw, m: Message) -> None:
    m.version = draw(st.sampled_from(VERSIONS))


def m_content_length(draw, m: Message) -> None:
    """A Content-Length that does not match the body."""
    m.headers = [h for h in m.headers if not h.lower().startswith(b"content-length")]
    n = draw(st.integers(0, len(m.body) + 10) | st.just(MAX_BODY + 1))
    m.headers.insert(draw(st.integers(0, len(m.headers))), b"Content-Length: %d" % n)


def m_to_chunked(draw, m: Message) -> None:
    if not m.chunked:
        m.headers = [h for h in m.headers if not h.lower().startswith(b"content-length")]
        m.headers.append(b"Transfer-Encoding: chunked")
        m.chunked = True
        m.rechunk([len(m.body)])


def m_chunk_sizes(draw, m: Message) -> None:
    """Cut the chunked body at odd places, some chunks with extensions."""
    if not m.chunked:
        return
    m.rechunk(draw(st.lists(st.integers(1, 40), max_size=12)))
    for i in range(len(m.chunks)):
        size, data, end = m.chunks[i]
        kind = draw(st.sampled_from(["as is"] * 3 + ["upper", "zeros", "ext", "ext2", "space",
                                                      "off by one", "no crlf", "lf"]))
        if kind == "upper":
            size = size.upper()
        elif kind == "zeros":
            size = b"000" + size
        elif kind == "ext":
            size += b";name=value"
        elif kind == "ext2":
            size += draw(st.sampled_from([b";x", b'; q="a;b"', b";" + b"e" * 300, b";=", b";\x00"]))
        elif kind == "space":
            size += b" "
        elif kind == "off by one":
            size = b"%x" % (len(data) + draw(st.sampled_from([-1, 1])))
        elif kind == "no crlf":
            end = b""
        elif kind == "lf":
            end = b"\n"
        m.chunks[i] = (size, data, end)
    m.last_chunk = draw(st.sampled_from([
        b"0\r\n\r\n", b"0\r\n\r\n", b"0;ext=1\r\n\r\n", b"00\r\n\r\n", b"0\r\nX-T: 1\r\n\r\n",
        b"0\r\n", b"", b"0\r\n\r\n0\r\n\r\n", b"0\r\nbad trailer\r\n\r\n", b"0\n\n",
        b"ffffffffffffffffff\r\n", b"-1\r\n\r\n", b"0x0\r\n\r\n"]))


# Transfer-Encoding lists: chunked alone is decoded; any other coding is
# answered 501 (or 400 when llhttp finds the framing malformed).
CODINGS = [b"chunked", b"Chunked", b"chunked ", b",chunked", b"gzip, chunked",
           b"identity, chunked", b"deflate,chunked", b"x-custom, chunked", b"identity",
           b"gzip", b"chunked, gzip", b"chunked, chunked", b"chunked,", b"compress"]


def m_transfer_coding(draw, m: Message) -> None:
    """Chunked framing under a drawn list of codings, in one or two headers."""
    m.headers = [h for h in m.headers if not h.lower().startswith((b"content-length",
                                                                   b"transfer-encoding"))]
    coding = draw(st.sampled_from(CODINGS))
    lines = [b"Transfer-Encoding: " + coding]
    if b"," in coding and draw(st.booleans()):  # the same list in two headers
        lines = [b"Transfer-Encoding: " + c.strip() for c in coding.split(b",") if c.strip()]
    for line in lines:
        m.headers.insert(draw(st.integers(0, len(m.headers))), line)
    if not m.chunked:
        m.chunked = True
        m.rechunk([len(m.body)])


def m_nest_json(draw, m: Message) -> None:
    """A body nested a drawn number of levels, around server.max_json_depth
    (64) and far past it (the cache key's recursion once failed at ~500)."""
    levels = draw(st.sampled_from([1, 2, 10, 63, 64, 65, 66, 100, 500, 1000, 5000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b'[{"b":', b"}]")]))
    inner = opener * levels + draw(st.sampled_from([b"1", b'"]]"', b"[]", b"{}"])) + closer * levels
    m.body = (b'{"model": "mock-llm", "temperature": 0, "max_tokens": 2, "messages": '
              b'[{"role": "user", "content": "nest"}], "x": ' + inner + b"}")
    if m.chunked:
        m.rechunk([len(m.body)])
    else:
        m.headers = [h for h in m.headers if not h.lower().startswith(b"content-length")]
        m.headers.append(b"Content-Length: %d" % len(m.body))


def m_body_bytes(draw, m: Message) -> None:
    if m.body:
        at = draw(st.integers(0, len(m.body)))
        m.body = m.body[:at] + draw(st.binary(min_size=1, max_size=6)) + m.body[at + 1:]
        if m.chunked:
            m.rechunk([len(m.body)])


STRUCTURE_MUTATIONS = [m_drop_header, m_duplicate_header, m_reorder_headers, m_splice_header,
                       m_splice_header, m_cut_header, m_header_value, m_header_spacing, m_method,
                       m_target, m_version, m_content_length, m_to_chunked, m_chunk_sizes,
                       m_chunk_sizes, m_body_bytes, m_transfer_coding, m_transfer_coding,
                       m_nest_json, m_nest_json, m_nest_json]
SPECIAL_BYTES = [b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"\x00", b" ", b"\t", b":", b";", b"\xff",
                 b"0\r\n\r\n", b"HTTP/1.1", b"GET / HTTP/1.1\r\n"]


def byte_mutation(draw, raw: bytes, others: List[bytes]) -> bytes:
    at = draw(st.integers(0, len(raw)))
    op = draw(st.sampled_from(["insert", "insert", "delete", "overwrite", "truncate",
                               "duplicate", "splice"]))
    if op == "insert":
        return raw[:at] + draw(st.binary(min_size=1, max_size=16)
                               | st.sampled_from(SPECIAL_BYTES)) + raw[at:]
    if op == "delete":
        return raw[:at] + raw[at + draw(st.integers(1, 16)):]
    if op == "overwrite":
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    if op == "truncate":
        return raw[:at]
    if op == "duplicate":
        end = min(len(raw), at + draw(st.integers(1, 64)))
        to = draw(st.integers(0, len(raw)))
        return raw[:to] + raw[at:end] + raw[to:]
    # splice: the start of one (mutated) request, the rest of another
    other = draw(st.sampled_from(others)) if others else raw
    return raw[:at] + other[draw(st.integers(0, len(other))):]


@st.composite
def mutated_request(draw) -> Tuple[bytes, bool]:
    """Bytes of one mutated request, and whether it is still a valid one
    (nothing mutated) that must be answered 2xx."""
    m = draw(valid_message())
    mutations = draw(st.lists(st.sampled_from(STRUCTURE_MUTATIONS), max_size=4))
    for mutate in mutations:
        mutate(draw, m)
    eol = draw(st.sampled_from([CRLF] * 9 + [b"\n"]))
    raw = m.serialize(eol)
    # Byte mutations mostly end at the parser: half the requests get none,
    # so that validation, routing and the relay are reached as often.
    n_bytes = draw(st.sampled_from([0, 0, 0, 1, 2, 3]))
    others = [m.serialize()]
    for _ in range(n_bytes):
        raw = byte_mutation(draw, raw, others)
    return raw, m.expect_ok and not mutations and not n_bytes and eol == CRLF


# A last request that closes the connection: the common case then ends at
# once instead of at the gateway's keep-alive deadline.
CLOSER = b"GET /health HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n\r\n"


class Case(NamedTuple):
    payload: bytes
    pieces: Tuple[int, ...]  # where the payload is cut into separate sends
    pristine: bool  # every request valid and unmutated: all answers 2xx


@st.composite
def cases(draw) -> Case:
    requests = draw(st.lists(mutated_request(), min_size=0, max_size=3))
    payload = b"".join(raw for raw, _ in requests)
    # Mostly with the closer; without it, a connection whose requests were
    # all answered ends at the keep-alive deadline.
    if draw(st.sampled_from([True, True, True, False])):
        payload += CLOSER
    pieces = tuple(sorted(set(draw(st.lists(st.integers(1, max(len(payload) - 1, 1)),
                                            max_size=3)))))
    return Case(payload, pieces, bool(requests) and all(p for _, p in requests))


# -- what the gateway sends back, checked

class Answer(NamedTuple):
    status: int
    headers: Dict[bytes, List[bytes]]
    body: bytes


STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9]) [\t\x20-\x7e]*")
HEADER_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([\t\x20-\x7e\x80-\xff]*)")


def parse_answers(data: bytes, sent: bytes, eof: bool) -> List[Answer]:
    """Every answer in ``data``; AssertionError on anything not well-formed.

    ``eof``: the gateway closed the connection cleanly (else it was reset,
    and the last answer may be cut short by the reset).
    """
    answers: List[Answer] = []
    pos = 0
    head_only_ok = b"HEAD" in sent  # HEAD answers carry a length but no body
    while pos < len(data):
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            assert not eof, f"incomplete answer head at {pos}"
            break
        lines = data[pos:end].split(b"\r\n")
        m = STATUS_LINE.fullmatch(lines[0])
        assert m, f"bad status line {lines[0][:200]!r}"
        status = int(m.group(1))
        headers: Dict[bytes, List[bytes]] = {}
        for line in lines[1:]:
            h = HEADER_LINE.fullmatch(line)
            assert h, f"bad header line {line[:200]!r}"
            headers.setdefault(h.group(1).lower(), []).append(h.group(2).strip(b" \t"))
        pos = end + 4
        if status == 100:
            assert len(lines) == 1, lines
            continue
        # Nothing may follow an answer that said it ends the connection.
        assert not (answers and closes(answers[-1])), \
            f"answer {status} sent after one that closes the connection"
        # 501: a transfer coding other than chunked alone (checked below).
        assert 200 <= status < 300 or 400 <= status < 500 or status == 501, f"status {status}"
        te, cl = headers.get(b"transfer-encoding"), headers.get(b"content-length")
        assert not (te and cl), "both Transfer-Encoding and Content-Length"
        if head_only_ok and (pos == len(data) or data.startswith(b"HTTP/1.", pos)) \
                and (te or cl and cl != [b"0"]):
            answers.append(Answer(status, headers, b""))
            continue
        if te:
            assert te == [b"chunked"], te
            body = []
            while True:
                line_end = data.find(b"\r\n", pos)
                if line_end < 0:
                    assert not eof, "chunked answer cut short"
                    break
                size_line = data[pos:line_end]
                assert re.fullmatch(rb"[0-9a-fA-F]+", size_line), f"chunk size {size_line!r}"
                size = int(size_line, 16)
                pos = line_end + 2
                if size == 0:
                    if data.startswith(b"\r\n", pos) or not eof and pos >= len(data) - 1:
                        pos += 2
                    else:
                        raise AssertionError(f"no end after the last chunk: {data[pos:pos + 50]!r}")
                    break
                chunk = data[pos:pos + size]
                if len(chunk) < size or data[pos + size:pos + size + 2] != b"\r\n":
                    assert not eof, "chunk cut short or not followed by CRLF"
                    body.append(chunk)
                    pos = len(data)
                    break
                body.append(chunk)
                pos += size + 2
            payload = b"".join(body)
        elif cl:
            assert len(cl) == 1 and re.fullmatch(rb"[0-9]+", cl[0]), cl
            n = int(cl[0])
            payload = data[pos:pos + n]
            assert len(payload) == n or not eof, f"body of {len(payload)} bytes, not {n}"
            pos += n
        elif status in (204, 304):
            payload = b""
        else:
            # Delimited by the close (an HTTP/1.0 client's stream): the last
            # answer, and whatever follows is its body; an answer written
            # after it would be read as the end of this body.
            payload, pos = data[pos:], len(data)
            later = re.search(rb"HTTP/1\.1 [1-5][0-9][0-9] [A-Za-z ]*\r\n", payload)
            assert not later, ("an answer written inside a close-delimited answer's body: "
                               f"{payload[:300]!r}")
        complete = eof or pos < len(data)
        answers.append(Answer(status, headers, payload))
        if complete:
            check_body(status, headers, payload)
    return answers


def closes(answer: Answer) -> bool:
    """Whether ``answer`` ends the connection (says so, or is close-delimited)."""
    h = answer.headers
    said = any(b"close" in v.lower() for v in h.get(b"connection", []))
    return said or (answer.status not in (204, 304) and not h.get(b"content-length")
                    and not h.get(b"transfer-encoding"))


def check_body(status: int, headers: Dict[bytes, List[bytes]], body: bytes) -> None:
    ctype = b",".join(headers.get(b"content-type", [b""])).split(b";")[0].strip().lower()
    assert headers.get(b"x-request-id"), "no X-Request-ID"
    if status >= 400:
        assert ctype == b"application/json", ctype
        doc = json.loads(body)
        assert isinstance(doc, dict) and set(doc) == {"error"}, doc
        err = doc["error"]
        assert isinstance(err, dict) and {"message", "type", "code"} <= set(err), err
        assert isinstance(err["message"], str) and err["message"], err
        assert isinstance(err["type"], str) and err["type"], err
        assert err["code"] is None or isinstance(err["code"], str), err
        assert status != 501 or err["code"] == "transfer_coding_not_implemented", err
        return
    if ctype == b"application/json":
        assert isinstance(json.loads(body), dict), body[:200]
    elif ctype == b"text/event-stream":
        for event in body.decode("utf-8").split("\n\n"):
            for line in event.split("\n"):
                if line.startswith("data:"):
                    data = line[5:].strip()
                    assert data == "[DONE]" or isinstance(json.loads(data), dict), line
    else:
        # Prometheus text for /metrics/prometheus or an Accept asking for it.
        assert ctype in (b"text/plain", b"application/openmetrics-text"), ctype


# -- one connection

class Outcome(NamedTuple):
    data: bytes
    eof: bool  # closed cleanly (FIN), else reset
    seconds: float


def exchange(port: int, case: Case) -> Outcome:
    """Send ``case``, then read until the gateway closes: at most BOUND s."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    chunks, eof = [], True
    try:
        at = 0
        try:
            for cut in (*case.pieces, len(case.payload)):
                if cut > at:
                    sock.sendall(case.payload[at:cut])
                    at = cut
                    if cut < len(case.payload):
                        time.sleep(0.002)
        except OSError:
            pass  # the gateway closed first (an early answer): read what it said
        sent_at = time.monotonic()
        deadline = sent_at + BOUND
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"connection still open {BOUND:g}s after the request was sent; "
                    f"received so far: {b''.join(chunks)[:500]!r}")
            sock.settimeout(left)
            try:
                got = sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionResetError:
                eof = False
                break
            if not got:
                break
            chunks.append(got)
    finally:
        sock.close()
    return Outcome(b"".join(chunks), eof, time.monotonic() - sent_at)


def valid_chat(port: int, n: int) -> None:
    body = json.dumps({"model": "mock-llm", "max_tokens": 3,
                       "messages": [{"role": "user", "content": f"after {n}"}]}).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n"
           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    out = exchange(port, Case(req, (), True))
    answers = parse_answers(out.data, req, out.eof)
    assert out.eof and [a.status for a in answers] == [200], out.data[:500]
    assert json.loads(answers[0].body)["object"] == "chat.completion"


def test_fuzzed_requests_get_well_formed_answers(gateway):
    stats: Counter = Counter()
    slowest = [0.0]

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=cases())
    def one_connection(case: Case) -> None:
        mark = gateway.mark()
        out = exchange(gateway.port, case)
        slowest[0] = max(slowest[0], out.seconds)
        answers = parse_answers(out.data, case.payload, out.eof)
        stats["examples"] += 1
        stats["reset"] += not out.eof
        stats.update(f"status {a.status}" for a in answers)
        stats.update(f"{a.status} {json.loads(a.body)['error']['code']}" for a in answers
                     if a.status >= 400 and a.body)
        if not answers:
            stats["no answer"] += 1
        if case.pristine:
            # Later ones may be refused (after a request that closes, say).
            assert answers and 200 <= answers[0].status < 300, out.data[:500]
        valid_chat(gateway.port, stats["examples"])
        log = gateway.text(mark)
        assert not any(s in log for s in BAD_LOG), log[-3000:]

    started = time.monotonic()
    one_connection()
    took = time.monotonic() - started
    # After everything: still serving, and nothing went wrong on the way.
    valid_chat(gateway.port, -1)
    assert not any(s in gateway.text() for s in BAD_LOG), gateway.text()[-5000:]
    # No path out of normal form, and no management route, reached the backend.
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.mock_port}/stats", timeout=5) as r:
        reached = json.load(r)["by_path"]
    odd = [p for p in reached if ".." in p or "//" in p or "%2e" in p.lower()
           or "%2f" in p.lower() or "/./" in p or "lora" in p]
    assert not odd, odd
    print(f"\nfuzz: {stats['examples']} examples in {took:.1f}s, slowest connection "
          f"{slowest[0]:.2f}s; " + ", ".join(f"{k}: {v}" for k, v in sorted(stats.items())))


def _chat_http10(text: str, extra: bytes = b"") -> bytes:
    # temperature > 0: not cached, so always answered asynchronously (relayed).
    body = json.dumps({"model": "mock-llm", "temperature": 0.7, "max_tokens": 2,
                       "messages": [{"role": "user", "content": text}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.0\r\n%sContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (extra, len(body), body))


# Found by this fuzzer: these bytes got a second answer, a 400 for the bytes
# after the request, written after an answer that said the connection ends
# (inside the body of a close-delimited one), when the request was answered
# asynchronously.
@pytest.mark.parametrize("payload", [
    # The smallest: an HTTP/1.0 request answered asynchronously, one more byte.
    b"GET /v1/models HTTP/1.0\r\n\r\nX",
    b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\nX",
    # The relayed answer is close-delimited: the 400 corrupts its body.
    _chat_http10("close-delimited") + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    # Keep-alive asked, but a close-delimited answer ends the connection anyway.
    _chat_http10("keep-alive", b"Connection: keep-alive\r\n")
    + b"ET /health HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["http10", "connection-close", "close-delimited-body", "http10-keep-alive"])
def test_nothing_is_sent_after_a_closing_answer(gateway, payload):
    """Bytes after a request that ends the connection are ignored: its answer
    is the last thing sent (RFC 9112 section 9.6)."""
    out = exchange(gateway.port, Case(payload, (), True))
    assert out.eof and out.data.startswith(b"HTTP/1.1 200 ")
    assert out.data.count(b"HTTP/1.1 ") == 1, out.data.decode("latin-1")
    head, _, body = out.data.partition(b"\r\n\r\n")
    assert json.loads(body)["object"] in ("list", "chat.completion")
