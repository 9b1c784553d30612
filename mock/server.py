"""A mock OpenAI-compatible LLM server.

It answers like vLLM or llama.cpp would, deterministically for a given prompt, at
a pace set by its knobs (time to first token, time between tokens, tokens per
answer), and it misbehaves on request (500s, hangs before the headers, resets
mid-stream). ``GET /stats`` counts what it was sent, so tests can prove what a
gateway in front of it did or did not forward; ``POST /control`` changes the
knobs of a running server.

Streams are push producers registered on the request: when the reader stops
reading, the transport pauses the stream and no more tokens are generated,
exactly as a real server's socket would push back.
"""

import json
import random
from typing import Any, Dict, List, Optional

import attrs
import xxhash
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.web import http, server
from twisted.web.resource import Resource
from zope.interface import implementer

log = Logger(namespace="ntonix_mock")

# A fixed vocabulary keeps answers readable and their byte size predictable.
VOCAB = (
    "the of and to in is that for it as with was on be at by this had not are but "
    "from or have an they which one you were all we her she there would their will "
    "when who him been has more if no out so said what up its about into than them "
    "can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through "
    "model token stream gateway cache backend latency answer prompt reactor"
).split()

CREATED = 1_700_000_000  # fixed so that answers are byte-for-byte repeatable


@attrs.define
class Knobs:
    """What shapes the mock's answers; every field can be changed at run time."""

    ttft_ms: float = 0.0
    itl_ms: float = 0.0
    tokens: int = 16
    fail_rate: float = 0.0
    hang_rate: float = 0.0
    reset_rate: float = 0.0
    reset_after: int = 4
    model: str = "mock-llm"
    embedding_dims: int = 16

    def update(self, changes: Dict[str, Any]) -> List[str]:
        """Apply ``changes``; returns the problems (unknown or mistyped keys)."""
        problems = []
        names = {f.name: f for f in attrs.fields(Knobs)}
        for key, value in changes.items():
            f = names.get(key)
            if f is None:
                problems.append(f"unknown knob {key!r}")
                continue
            want = f.type if isinstance(f.type, type) else type(getattr(self, key))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, want) or isinstance(value, bool):
                problems.append(f"knob {key!r} expects {want.__name__}")
                continue
            setattr(self, key, value)
        return problems


@attrs.define
class Stats:
    requests: int = 0
    by_path: Dict[str, int] = attrs.Factory(dict)
    completed: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    active: int = 0
    disconnects: int = 0
    pauses: int = 0
    faults_500: int = 0
    faults_hang: int = 0
    faults_reset: int = 0
    bytes_sent: int = 0
    last_headers: Dict[str, str] = attrs.Factory(dict)

    def as_json(self, backend_id: str) -> Dict[str, Any]:
        d = attrs.asdict(self)
        d["id"] = backend_id
        return d


def prompt_text(route: str, body: Dict[str, Any]) -> str:
    """The part of a request the answer depends on, as one string."""
    if route == "chat":
        parts = []
        for m in body.get("messages") or []:
            if isinstance(m, dict):
                c = m.get("content")
                parts.append(f"{m.get('role')}:{c if isinstance(c, str) else json.dumps(c)}")
        return "\n".join(parts)
    if route == "completions":
        p = body.get("prompt", "")
        return p if isinstance(p, str) else json.dumps(p)
    return json.dumps(body.get("input"), sort_keys=True)


def answer_seed(model: str, text: str) -> int:
    return xxhash.xxh64_intdigest(f"{model}\x00{text}".encode("utf-8", "surrogatepass"))


def error_body(message: str, type_: str, code: Optional[str]) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


def tool_call_of(body: Dict[str, Any], seed: int) -> Optional[Dict[str, Any]]:
    """The tool call the mock answers with when the request offers tools
    (and does not say ``tool_choice: "none"``): the named tool, or the
    first, with one made-up word per declared parameter; deterministic."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    fns = [t.get("function") for t in tools
           if isinstance(t, dict) and isinstance(t.get("function"), dict)]
    if not fns:
        return None
    fn = fns[0]
    if isinstance(choice, dict):
        wanted = (choice.get("function") or {}).get("name")
        fn = next((f for f in fns if f.get("name") == wanted), fn)
    params = fn.get("parameters")
    props = params.get("properties") if isinstance(params, dict) else None
    names = sorted(props) if isinstance(props, dict) and props else ["query"]
    rng = random.Random(seed ^ 0x5EED)
    args = json.dumps({n: rng.choice(VOCAB) for n in names})
    return {"id": f"call_{seed:016x}", "type": "function",
            "function": {"name": str(fn.get("name", "tool")), "arguments": args}}


def arg_pieces(args: str) -> List[str]:
    """Arguments streamed as a server does: a few characters per event."""
    return [args[i:i + 8] for i in range(0, len(args), 8)]


@implementer(IPushProducer)
class TokenStream:
    """Writes one SSE event per token, pausing when the reader pushes back."""

    def __init__(self, mock: "MockLLM", request: server.Request, route: str,
                 body: Dict[str, Any], n_tokens: int, reset_at: Optional[int]) -> None:
        self.mock = mock
        self.request = request
        self.route = route
        self.model = body.get("model") or mock.knobs.model
        text = prompt_text(route, body)
        seed = answer_seed(self.model, text)
        self.rng = random.Random(seed)
        self.id = ("chatcmpl-" if route == "chat" else "cmpl-") + f"{seed:016x}"
        self.n_tokens = n_tokens
        self.prompt_tokens = len(text.split())
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        self.tool_call = tool_call_of(body, seed) if route == "chat" else None
        if self.tool_call is not None:
            self.arg_pieces = arg_pieces(self.tool_call["function"]["arguments"])
            self.n_tokens = len(self.arg_pieces)
        self.reset_at = reset_at
        self.sent = 0
        self.paused = False
        self.done = False
        self.timer: Optional[IDelayedCall] = None
        # A token event is this stream's fixed text around one JSON string:
        # built once, so that a token costs a concatenation, not a json.dumps
        # of the whole chunk (the bench runs the mock beside the gateway on
        # the same cores; its cost there is not the gateway's).
        marker = "\x00"
        event = self._event_bytes(self._chunk({"content": marker}, None, text=marker))
        # The token is the chunk's last string (the model name, which the
        # client chose, comes before it).
        self.token_prefix, self.token_suffix = event.rsplit(json.dumps(marker).encode(), 1)

    # -- IPushProducer
    def pauseProducing(self) -> None:
        if not self.paused:
            self.mock.stats.pauses += 1
        self.paused = True
        self._cancel_timer()

    def resumeProducing(self) -> None:
        if self.done or not self.paused:
            return
        self.paused = False
        self._schedule(0)

    def stopProducing(self) -> None:
        self._stop()

    # --
    def start(self) -> None:
        self.mock.stats.streams_started += 1
        self.request.registerProducer(self, True)
        if self.tool_call is not None:
            call = self.tool_call
            self._write_event(self._chunk({"role": "assistant", "content": None, "tool_calls": [
                {"index": 0, "id": call["id"], "type": "function",
                 "function": {"name": call["function"]["name"], "arguments": ""}}]}, None))
        else:
            self._write_event(self._chunk({"role": "assistant", "content": ""}, None)
                              if self.route == "chat" else None)
        self._schedule(self.mock.knobs.ttft_ms)

    def _schedule(self, delay_ms: float) -> None:
        if self.done or self.paused or (self.timer is not None and self.timer.active()):
            return
        self.timer = self.mock.clock.callLater(delay_ms / 1000.0, self._tick)

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _tick(self) -> None:
        self.timer = None
        # With no delay between tokens, emit a burst per reactor turn so that a
        # fast stream is fast but the reactor still serves everyone else.
        burst = 1 if self.mock.knobs.itl_ms > 0 else 256
        for _ in range(burst):
            if self.done or self.paused:
                return
            if self.reset_at is not None and self.sent >= self.reset_at:
                # Close after what was written is flushed (an abort would drop
                # it unsent): the reader sees a stream cut without its end.
                self.mock.stats.faults_reset += 1
                self._stop()
                self.request.channel.transport.loseConnection()
                return
            if self.sent >= self.n_tokens:
                self._finish()
                return
            if self.tool_call is not None:
                self._write_event(self._chunk({"tool_calls": [{"index": 0, "function": {
                    "arguments": self.arg_pieces[self.sent]}}]}, None))
                self.sent += 1
                continue
            word = self.rng.choice(VOCAB)
            token = word if self.sent == 0 else " " + word
            self.sent += 1
            self._write(self.token_prefix + json.dumps(token).encode() + self.token_suffix)
        self._schedule(self.mock.knobs.itl_ms)

    def _chunk(self, delta: Dict[str, Any], finish: Optional[str], text: str = "") -> Dict[str, Any]:
        if self.route == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": CREATED, "model": self.model,
                "system_fingerprint": "fp_mock", "choices": [choice]}

    @staticmethod
    def _event_bytes(payload: Dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def _write_event(self, payload: Optional[Dict[str, Any]]) -> None:
        if payload is not None:
            self._write(self._event_bytes(payload))

    def _write(self, data: bytes) -> None:
        self.mock.stats.bytes_sent += len(data)
        self.request.write(data)

    def _finish(self) -> None:
        self._write_event(self._chunk({}, "tool_calls" if self.tool_call else "stop"))
        if self.include_usage:
            usage = self._chunk({}, None)
            usage["choices"] = []
            usage["usage"] = usage_of(self.prompt_tokens, self.n_tokens)
            self._write_event(usage)
        self.request.write(b"data: [DONE]\n\n")
        self._stop()
        self.mock.stats.streams_completed += 1
        self.mock.stats.completed += 1
        self.request.unregisterProducer()
        self.request.finish()

    def _stop(self) -> None:
        self.done = True
        self._cancel_timer()


def usage_of(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class MockLLM(Resource):
    """The whole mock server as one resource; route by path."""

    isLeaf = True

    def __init__(self, backend_id: str, knobs: Knobs, clock: IReactorTime,
                 rng: Optional[random.Random] = None) -> None:
        super().__init__()
        self.backend_id = backend_id
        self.knobs = knobs
        self.clock = clock
        self.stats = Stats()
        # Fault decisions come from their own generator so that a seed makes a
        # test's sequence of faults repeatable.
        self.fault_rng = rng or random.Random()

    def render(self, request: server.Request) -> Any:
        path = request.path.decode("latin-1").split("?", 1)[0].rstrip("/") or "/"
        method = request.method.decode("latin-1")
        request.setHeader(b"X-Backend-Id", self.backend_id.encode())
        if path not in ("/stats", "/control"):
            self.stats.requests += 1
            self.stats.by_path[path] = self.stats.by_path.get(path, 0) + 1
            self.stats.last_headers = {
                k.decode("latin-1").lower(): b", ".join(v).decode("latin-1")
                for k, v in request.requestHeaders.getAllRawHeaders()
            }
        routes = {
            ("GET", "/health"): self._health,
            ("GET", "/v1/models"): self._models,
            ("GET", "/stats"): self._stats,
            ("POST", "/control"): self._control,
            ("POST", "/v1/chat/completions"): lambda r: self._generate(r, "chat"),
            ("POST", "/v1/completions"): lambda r: self._generate(r, "completions"),
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/responses"): self._responses,
        }
        handler = routes.get((method, path))
        if handler is None and method == "GET" and path.startswith("/v1/models/"):
            return self._model(request, path[len("/v1/models/"):])
        if handler is None:
            known = {p for (_, p) in routes}
            if path in known:
                return self._error(request, 405, f"method {method} not allowed on {path}",
                                   "invalid_request_error", "method_not_allowed")
            return self._error(request, 404, f"no route {path}", "invalid_request_error",
                               "not_found")
        return handler(request)

    # -- helpers
    def _json(self, request: server.Request, obj: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.stats.bytes_sent += len(data)
        if code == 200:
            self.stats.completed += 1
        return data

    def _error(self, request: server.Request, code: int, message: str, type_: str,
               err_code: Optional[str]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        return error_body(message, type_, err_code)

    def _read_json(self, request: server.Request) -> Any:
        try:
            body = json.loads(request.content.read().decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        return body if isinstance(body, dict) else None

    def _roll(self, rate: float) -> bool:
        return rate > 0 and self.fault_rng.random() < rate

    # -- routes
    def _health(self, request: server.Request) -> bytes:
        return self._json(request, {"status": "ok", "id": self.backend_id})

    def _stats(self, request: server.Request) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(self.stats.as_json(self.backend_id)).encode()

    def _control(self, request: server.Request) -> bytes:
        body = self._read_json(request)
        if body is None:
            return self._error(request, 400, "expected a JSON object of knobs",
                               "invalid_request_error", "invalid_json")
        if body.pop("reset_stats", False):
            self.stats = Stats()
        problems = self.knobs.update(body)
        if problems:
            return self._error(request, 400, "; ".join(problems), "invalid_request_error",
                               "invalid_knob")
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(attrs.asdict(self.knobs)).encode()

    def _models(self, request: server.Request) -> bytes:
        return self._json(request, {"object": "list", "data": [
            {"id": self.knobs.model, "object": "model", "created": CREATED,
             "owned_by": "ntonix-mock"}]})

    def _model(self, request: server.Request, model_id: str) -> bytes:
        if model_id != self.knobs.model:
            return self._error(request, 404, f"The model '{model_id}' does not exist",
                               "invalid_request_error", "model_not_found")
        return self._json(request, {"id": self.knobs.model, "object": "model",
                                    "created": CREATED, "owned_by": "ntonix-mock"})

    def _responses(self, request: server.Request) -> bytes:
        """The Responses API, not streamed: one output message."""
        body = self._read_json(request)
        if body is None:
            return self._error(request, 400, "request body must be a JSON object",
                               "invalid_request_error", "invalid_json")
        model = body.get("model") or self.knobs.model
        text = json.dumps(body.get("input"), sort_keys=True)
        seed = answer_seed(model, text)
        n = body.get("max_output_tokens")
        n_tokens = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 \
            else self.knobs.tokens
        rng = random.Random(seed)
        content = " ".join(rng.choice(VOCAB) for _ in range(n_tokens))
        prompt_tokens = len(text.split())
        return self._json(request, {
            "id": f"resp_{seed:016x}", "object": "response", "created_at": CREATED,
            "status": "completed", "model": model, "error": None,
            "incomplete_details": None, "instructions": None, "metadata": {},
            "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "output": [{"type": "message", "id": f"msg_{seed:016x}", "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": content,
                                     "annotations": []}]}],
            "usage": {"input_tokens": prompt_tokens, "output_tokens": n_tokens,
                      "total_tokens": prompt_tokens + n_tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}}})

    def _track(self, request: server.Request) -> None:
        self.stats.active += 1

        def gone(reason: Any) -> None:
            self.stats.active -= 1
            if reason is not None:
                self.stats.disconnects += 1

        request.notifyFinish().addCallbacks(lambda _: gone(None), gone)

    def _generate(self, request: server.Request, route: str) -> Any:
        body = self._read_json(request)
        if body is None:
            return self._error(request, 400, "request body must be a JSON object",
                               "invalid_request_error", "invalid_json")
        if self._roll(self.knobs.fail_rate):
            self.stats.faults_500 += 1
            return self._error(request, 500, f"injected failure on {self.backend_id}",
                               "server_error", "injected_failure")
        self._track(request)
        if self._roll(self.knobs.hang_rate):
            # Never answer: the head is never sent until the peer gives up.
            self.stats.faults_hang += 1
            return server.NOT_DONE_YET
        n = body.get("max_completion_tokens", body.get("max_tokens"))
        n_tokens = n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 \
            else self.knobs.tokens
        if body.get("stream") is True:
            reset_at = self.knobs.reset_after if self._roll(self.knobs.reset_rate) else None
            request.setHeader(b"Content-Type", b"text/event-stream")
            request.setHeader(b"Cache-Control", b"no-cache")
            TokenStream(self, request, route, body, n_tokens, reset_at).start()
            return server.NOT_DONE_YET
        self.clock.callLater(
            (self.knobs.ttft_ms + self.knobs.itl_ms * max(n_tokens - 1, 0)) / 1000.0,
            self._complete, request, route, body, n_tokens)
        return server.NOT_DONE_YET

    def _complete(self, request: server.Request, route: str, body: Dict[str, Any],
                  n_tokens: int) -> None:
        if request.finished or request._disconnected:
            return
        model = body.get("model") or self.knobs.model
        text = prompt_text(route, body)
        seed = answer_seed(model, text)
        rng = random.Random(seed)
        n = body.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 else 1
        contents = []
        for i in range(n):
            # The first choice is the one a stream of the same request sends.
            r = rng if i == 0 else random.Random(seed + i)
            contents.append(" ".join(r.choice(VOCAB) for _ in range(n_tokens)))
        call = tool_call_of(body, seed) if route == "chat" else None
        usage = usage_of(len(text.split()), n_tokens * n)
        if call is not None:
            usage = usage_of(len(text.split()), len(arg_pieces(call["function"]["arguments"])))
        if route == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": c},
                        "logprobs": None, "finish_reason": "stop"}
                       for i, c in enumerate(contents)]
            if call is not None:
                choices = [{"index": 0, "message": {"role": "assistant", "content": None,
                                                    "tool_calls": [call]},
                            "logprobs": None, "finish_reason": "tool_calls"}]
            obj = {"id": f"chatcmpl-{seed:016x}", "object": "chat.completion",
                   "created": CREATED, "model": model, "system_fingerprint": "fp_mock",
                   "choices": choices, "usage": usage}
        else:
            obj = {"id": f"cmpl-{seed:016x}", "object": "text_completion", "created": CREATED,
                   "model": model, "system_fingerprint": "fp_mock",
                   "choices": [{"index": i, "text": c, "logprobs": None,
                                "finish_reason": "stop"} for i, c in enumerate(contents)],
                   "usage": usage}
        request.write(self._json(request, obj))
        request.finish()

    def _embeddings(self, request: server.Request) -> bytes:
        body = self._read_json(request)
        if body is None or "input" not in body:
            return self._error(request, 400, "request body must be a JSON object with input",
                               "invalid_request_error", "invalid_json")
        if self._roll(self.knobs.fail_rate):
            self.stats.faults_500 += 1
            return self._error(request, 500, f"injected failure on {self.backend_id}",
                               "server_error", "injected_failure")
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) \
            else self.knobs.embedding_dims
        model = body.get("model") or self.knobs.model
        data = []
        for i, item in enumerate(inputs):
            rng = random.Random(answer_seed(model, json.dumps(item)))
            data.append({"object": "embedding", "index": i,
                         "embedding": [round(rng.uniform(-1, 1), 6) for _ in range(dims)]})
        tokens = sum(len(json.dumps(x).split()) for x in inputs)
        return self._json(request, {"object": "list", "data": data, "model": model,
                                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


class QuietSite(server.Site):
    """A Site with no per-request access log (the gateway in front keeps one)
    that knows its open connections, so that a test can kill it outright."""

    noisy = False
    displayTracebacks = False
    protocol = http.HTTPChannel  # plain HTTP/1.1, no protocol-negotiation wrapper

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.connections: set = set()

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        site = self
        lost = proto.connectionLost

        def connectionLost(reason: Any) -> None:
            site.connections.discard(proto)
            lost(reason)

        proto.connectionLost = connectionLost
        self.connections.add(proto)
        return proto

    def drop_connections(self) -> None:
        """Abort every open connection, as a crashed server's would be."""
        for proto in list(self.connections):
            if proto.transport is not None:
                proto.transport.abortConnection()

    def log(self, request: server.Request) -> None:
        pass


def make_site(backend_id: str, knobs: Knobs, clock: IReactorTime,
              rng: Optional[random.Random] = None) -> server.Site:
    return QuietSite(MockLLM(backend_id, knobs, clock, rng))
