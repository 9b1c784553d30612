"""The gateway's URL space: one table dispatching on method and path.

Every answer, 404 and 405 included, is JSON, every answer carries
``X-Request-ID``, and the table is the list that ``GET /`` shows.
"""

import json
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import treq
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from ntonix._version import __version__
from ntonix.http.admin_view import AdminView, send_answer
from ntonix.http.errors import send_error, send_json_body
from ntonix.http.request import Request
from ntonix.http.admin_auth import listener_allows, token_ok
from ntonix.http.passthrough import PassthroughPolicy, path_problem
from ntonix.identity import bare_credential, credential_of
from ntonix.http.validate import (
    ROUTE_CHAT,
    ROUTE_COMPLETIONS,
    ROUTE_EMBEDDINGS,
    BadRequest,
    check_body,
    check_content_type,
    decode_json_body,
)
from ntonix.observe.access import (
    CLIENT_CLOSED,
    GATEWAY_ERROR,
    UPSTREAM_ERROR,
    RequestInfo,
    log_access,
)
from ntonix.upstream.headers import sane_request_id, upstream_header_block
from ntonix.upstream.relay import ClientSink, Exchange
from ntonix.upstream.usage import inject_include_usage

if TYPE_CHECKING:
    from ntonix.gateway import Gateway

log = Logger(namespace="ntonix.http.routes")

Handler = Callable[[Request], None]

FORWARDED = {
    b"/v1/chat/completions": ROUTE_CHAT,
    b"/v1/completions": ROUTE_COMPLETIONS,
    b"/v1/embeddings": ROUTE_EMBEDDINGS,
}
# Metric labels: known paths only, so a scanner cannot blow up cardinality.
ROUTE_LABELS = {**{p: r for p, r in FORWARDED.items()},
                b"/v1/models": "models", b"/": "root", b"/health": "health",
                b"/livez": "health", b"/readyz": "health",
                b"/backends": "backends", b"/cache/stats": "cache_stats",
                b"/admission": "admission",
                b"/metrics": "metrics", b"/metrics/prometheus": "metrics"}


def send_json(request: Request, obj: Any, status: int = 200) -> None:
    send_json_body(request, status,
                   json.dumps(obj, indent=None, separators=(",", ":")).encode() + b"\n")


def backends_json(gateway: "Gateway") -> Dict[str, Any]:
    """GET /backends: the backends, their state, and the scorer's counts."""
    doc = {"now": gateway.reactor.seconds(), "algorithm": gateway.config.balancer.algorithm,
           "backends": [b.as_json() for b in gateway.backends]}
    scorer = getattr(gateway.balancer, "as_json", None)
    if scorer is not None:
        doc["scorer"] = scorer()
    share = getattr(gateway, "share", None)
    if share is not None:
        # What this process shares with its other workers and gateways.
        doc["share"] = share.as_json()
    return doc


# The gateway's internals: served on the admin listener, and on the public
# port only to a request bearing admin.token.
ADMIN_PATHS = frozenset({b"/metrics", b"/metrics/prometheus", b"/backends", b"/cache/stats",
                         b"/admission"})


class Router:
    def __init__(self, gateway: "Gateway", admin: bool = False,
                 admin_view: Optional[AdminView] = None) -> None:
        self.gateway = gateway
        self.admin = admin  # the admin listener's router: internals, no API
        self._policy: Optional[Tuple[Any, PassthroughPolicy]] = None
        self.admin_view = admin_view
        self.routes: Dict[Tuple[bytes, bytes], Tuple[Handler, str]] = {
            (b"GET", b"/"): (self.root, "this list"),
            (b"GET", b"/health"): (self.health, "gateway health (readiness)"),
            (b"GET", b"/livez"): (self.live, "liveness: 200 while the process serves"),
            (b"GET", b"/readyz"): (self.health, "readiness: 503 when no backend can answer "
                                   "or the gateway is draining"),
            (b"GET", b"/backends"): (self.backends, "backends and their state"),
            (b"GET", b"/admission"): (self.admission, "the admission queue: who waits, "
                                                      "who was refused"),
            (b"GET", b"/cache/stats"): (self.cache_stats, "response cache counters"),
            (b"GET", b"/metrics"): (self.metrics, "metrics as JSON (Prometheus text on Accept)"),
            (b"GET", b"/metrics/prometheus"): (self.prometheus, "metrics as Prometheus text"),
            (b"GET", b"/v1/models"): (self.models, "models of all healthy backends"),
        }
        for path, route in FORWARDED.items():
            self.routes[(b"POST", path)] = (self._forwarder(route), f"forwarded ({route})")
        if admin_view is not None:
            # One worker of several: its own figures are a part of the
            # gateway's, so the admin routes answer with the whole (chosen
            # here, once: a single gateway pays nothing per request).
            for path in ADMIN_PATHS:
                self.routes[(b"GET", path)] = (self._gateway_wide,
                                               self.routes[(b"GET", path)][1])

    def handle(self, request: Request) -> None:
        request_id = sane_request_id(request.given_request_id)
        request.addHeader(b"X-Request-ID", request_id)
        request.request_id = request_id
        self._track(request, request_id)
        if self.gateway.draining:
            # Shutting down: finish this answer, then close the connection.
            request.keep_alive = False
        path = request.path
        method = b"GET" if request.method == b"HEAD" else request.method
        entry = self.routes.get((method, path))
        lower = request.requestHeaders.lower
        if lower.count(b"authorization") > 1 or lower.count(b"x-api-key") > 1 \
                or (b"x-api-key" in lower and b"authorization" in lower
                    and bare_credential(request.getHeader(b"authorization") or b"")
                    != bare_credential(request.getHeader(b"x-api-key") or b"")):
            # Which one would count? The cache scope, the tenant and the
            # backend could each read a different one: refuse them all.
            return send_error(request, 400, "more than one credential (Authorization, "
                              "x-api-key) and they differ", "duplicate_credentials")
        if self.admin:
            if not listener_allows(request, self.gateway.config.admin):
                return None
            if path.startswith(b"/v1/"):
                return send_error(request, 404, "the API is served on the public port, not "
                                  "the admin listener", "not_found")
        elif path in ADMIN_PATHS and not self._admin_allowed(request):
            return None
        if entry is None and method == b"GET" and path.startswith(b"/v1/models/"):
            return self.model(request, path[len(b"/v1/models/"):])
        if entry is None and self._passes_through(request.method, path):
            # The rest of the OpenAI surface (and what servers add to it) goes
            # to a backend as it is, when proxy.passthrough lists it:
            # streamed, never cached, retried before the first byte only
            # where sending it twice is harmless.
            why = path_problem(path)
            if why is not None:
                return send_error(request, 400, f"{path.decode('latin-1')!r}: {why}",
                                  "invalid_path")
            if not self._passthrough_policy().allows(request.method, path):
                return send_error(request, 404, f"{request.method.decode('latin-1')} "
                                  f"{path.decode('latin-1')} is not relayed to the backends "
                                  "(proxy.passthrough)", "not_found")
            return self._passthrough(request)
        if entry is None:
            allowed = sorted(m.decode() for (m, p) in self.routes if p == path)
            if allowed:
                request.setHeader(b"Allow", ", ".join(allowed).encode())
                return send_error(request, 405, f"method {request.method.decode('latin-1')} "
                                  f"not allowed on {path.decode('latin-1')}; use "
                                  + " or ".join(allowed), "method_not_allowed")
            return send_error(request, 404, f"no route {path.decode('latin-1')!r}; "
                              "GET / lists the endpoints", "not_found")
        entry[0](request)

    def _track(self, request: Request, request_id: bytes) -> None:
        gw = self.gateway
        path = request.path
        info = RequestInfo(
            request_id=request_id.decode("ascii"), method=request.method.decode("latin-1"),
            path=path.decode("latin-1"), client=request.client_ip,
            received_at=gw.reactor.seconds(),
            route=ROUTE_LABELS.get(path) or (
                "passthrough" if self._passes_through(request.method, path) else "unknown"))
        request.info = info
        gw.metrics.active += 1

        def done(result: Any) -> None:
            gw.metrics.active -= 1
            info.finished_at = gw.reactor.seconds()
            if result is not None:  # the connection went away first
                info.outcome = CLIENT_CLOSED
            elif info.upstream_failed or (request.code >= 500 and info.backend):
                # A 5xx relayed from the backend is its failure too.
                info.outcome = UPSTREAM_ERROR
            elif request.code >= 500:
                info.outcome = GATEWAY_ERROR
            try:
                if gw.access_log_enabled:
                    log_access(info, request.code, request.sent_length)
                gw.metrics.finished(info, request.code)
            except Exception:
                log.failure("accounting request {request_id}", request_id=info.request_id)

        request.when_done(done)
        if (request.method != b"POST" or path not in FORWARDED) \
                and not self._passes_through(request.method, path):
            # Answers made here: their head is written now, with no upstream.
            request.setHeader(b"Server-Timing", info.timing(gw.reactor.seconds()).encode())

    # -- information
    def root(self, request: Request) -> None:
        endpoints = [f"{m.decode()} {p.decode()}" for (m, p) in self.routes]
        send_json(request, {
            "name": "NTONIX",
            "description": "AI inference gateway for OpenAI-compatible LLM backends",
            "version": __version__,
            "endpoints": endpoints,
            "routes": {f"{m.decode()} {p.decode()}": doc for (m, p), (_, doc) in
                       self.routes.items()},
        })

    def health(self, request: Request) -> None:
        total = len(self.gateway.backends)
        up = sum(1 for b in self.gateway.backends if b.available)
        status, code = "healthy", 200
        shared = self.gateway.cache.shared
        if shared is not None and shared.degraded:
            # Still serving, from this gateway's own cache tier.
            status = "degraded"
        if self.gateway.draining:
            status, code = "draining", 503
        elif not up:
            # No backend could answer (none configured, or all circuits
            # open): a load balancer in front should send traffic elsewhere.
            status, code = "unhealthy", 503
        doc = {"status": status, "backends_available": up, "backends_total": total,
               "uptime_seconds": round(self.gateway.uptime(), 3)}
        if shared is not None:
            doc["cache_tier"] = "degraded" if shared.degraded else "ok"
        send_json(request, doc, code)

    def live(self, request: Request) -> None:
        # Answering at all is the proof of life; draining is not death.
        send_json(request, {"status": "alive",
                            "uptime_seconds": round(self.gateway.uptime(), 3)})

    def backends(self, request: Request) -> None:
        send_json(request, backends_json(self.gateway))

    def admission(self, request: Request) -> None:
        send_json(request, self.gateway.admission.as_json())

    def models(self, request: Request) -> None:
        """Ask every available backend, merge their lists, drop duplicates."""

        def answer(models: Optional[Dict[str, Any]]) -> None:
            if request.disconnected:
                return
            if models is None:
                send_error(request, 502, "no backend answered GET /v1/models",
                           "upstream_unreachable")
            else:
                send_json(request, {"object": "list", "data": list(models.values())})

        self._merged_models(request, answer)

    def _merged_models(self, request: Request,
                       then: Callable[[Optional[Dict[str, Any]]], None]) -> None:
        """``then(models by id)`` from every available backend's list, or
        ``then(None)`` when none answered; 503 at once when none is available."""
        live = [b for b in self.gateway.backends if b.available]
        if not live:
            request.setHeader(b"Retry-After", b"1")
            return send_error(request, 503, "no backend available", "no_backend_available")
        timeout = self.gateway.config.health.timeout_seconds
        headers = Headers({b"X-Request-ID": [request.request_id]})
        auth = request.requestHeaders.getRawHeaders(b"authorization")
        if auth:
            headers.setRawHeaders(b"Authorization", auth)

        def ask(b: Any) -> defer.Deferred:
            d = self.gateway.upstream.treq.get(b.base_url + b"/v1/models", headers=headers,
                                               allow_redirects=False)
            # Read non-200 bodies too, so the connection goes back to the pool.
            d.addCallback(lambda r: treq.json_content(r) if r.code == 200
                          else treq.content(r).addCallback(lambda _: None))
            d.addTimeout(timeout, self.gateway.reactor)
            return d

        def merged(results: List[Tuple[bool, Any]]) -> None:
            seen: Dict[str, Any] = {}
            answered = False
            for ok, doc in results:
                if ok and isinstance(doc, dict) and isinstance(doc.get("data"), list):
                    answered = True
                    for m in doc["data"]:
                        if isinstance(m, dict) and isinstance(m.get("id"), str):
                            seen.setdefault(m["id"], m)
            # Models named in the configuration are served even when the
            # backend does not list them (an Ollama model pulled on demand).
            for b in live:
                for name in sorted(b.models):
                    answered = True
                    seen.setdefault(name, {"id": name, "object": "model", "created": 0,
                                           "owned_by": "ntonix"})
            then(seen if answered else None)

        dl = defer.DeferredList([ask(b) for b in live], consumeErrors=True)
        dl.addCallback(merged)
        dl.addErrback(lambda f: log.failure("merging models", f))

    def model(self, request: Request, model_id: bytes) -> None:
        """One model, from the merged list of every available backend."""
        wanted = model_id.decode("utf-8", "replace")

        def found(models: Optional[Dict[str, Any]]) -> None:
            if request.disconnected:
                return
            if models is None:
                send_error(request, 502, "no backend answered GET /v1/models",
                           "upstream_unreachable")
            elif wanted in models:
                send_json(request, models[wanted])
            else:
                send_error(request, 404, f"The model {wanted!r} does not exist",
                           "model_not_found")

        self._merged_models(request, found)

    def cache_stats(self, request: Request) -> None:
        send_json(request, self.gateway.cache.as_json())

    def metrics(self, request: Request) -> None:
        """JSON by default; Prometheus text when the client asks for it in
        Accept, as a Prometheus scraper does."""
        accept = (request.getHeader(b"accept") or b"").lower()
        if b"openmetrics" in accept or b"text/plain" in accept:
            return self.prometheus(request)
        send_json(request, self.gateway.metrics.as_json(self.gateway))

    def prometheus(self, request: Request) -> None:
        data, content_type = self.gateway.metrics.prometheus(request.getHeader(b"accept"))
        request.setHeader(b"Content-Type", content_type.encode())
        request.setHeader(b"Content-Length", b"%d" % len(data))
        request.write(data)
        request.finish()

    def _gateway_wide(self, request: Request) -> None:
        """The admin view's answer: the figures of every worker together."""
        assert self.admin_view is not None
        path = request.path
        d = self.admin_view(path, request.getHeader(b"accept") or b"")

        def failed(f: Any) -> None:
            log.warn("no gateway-wide answer for {path}: {why}", path=path.decode("latin-1"),
                     why=f.getErrorMessage() or f.type.__name__)
            if not (request.finished or request.disconnected):
                request.setHeader(b"Retry-After", b"1")
                send_error(request, 503, "the gateway-wide figures are not available now "
                           "(the supervisor did not answer); try again", "admin_view_unavailable")

        d.addCallbacks(lambda answer: send_answer(request, answer), failed)
        d.addErrback(lambda f: log.failure("answering {path}", f, path=path.decode("latin-1")))

    # -- forwarding
    def _forwarder(self, route: str) -> Handler:
        def forward(request: Request) -> None:
            try:
                check_content_type(request.content_type)
                doc = check_body(route, decode_json_body(
                    request.body, self.gateway.config.server.max_json_depth))
            except BadRequest as e:
                return send_error(request, e.status, e.message, e.code)
            self._forward(request, route, doc, request.body)
        return forward

    def _admin_allowed(self, request: Request) -> bool:
        """On the public port, an admin route needs admin.token; answers and
        returns False when it is not given."""
        token = self.gateway.config.admin.token
        if not token:
            send_error(request, 404, f"{request.path.decode('latin-1')} is served on the admin "
                       "listener (admin.http_port), or here with admin.token", "not_found")
            return False
        return token_ok(request, token)

    def _tenant(self, request: Request) -> Tuple[Optional[bytes], Optional[bytes]]:
        """What the request says of its tenant: the tenant header's value
        when a trusted proxy sent it, and the credential (the admission
        queue hashes it before it keeps or shows anything)."""
        ident = self.gateway.identity
        named = None
        if ident.header:
            named = request.getHeader(ident.header)
            if named is not None and not ident.trusts(request.client_ip):
                # Anyone may send the header; only a listed proxy names tenants.
                self.gateway.metrics.tenant_header_ignored += 1
                named = None
        return named, credential_of(request)

    def _passes_through(self, method: bytes, path: bytes) -> bool:
        """Whether a request is relayed as it is: any method but HEAD (whose
        answer has no body to relay) on a /v1/ path the table does not name
        and that is not a model's own page."""
        return (path.startswith(b"/v1/") and method != b"HEAD"
                and path not in ROUTE_LABELS
                and not (method == b"GET" and path.startswith(b"/v1/models/")))

    def _passthrough_policy(self) -> PassthroughPolicy:
        entries = self.gateway.config.proxy.passthrough
        policy = self._policy
        if policy is None or policy[0] is not entries:  # a reload changed it
            policy = self._policy = (entries, PassthroughPolicy.from_entries(entries))
        return policy[1]

    def _passthrough(self, request: Request) -> None:
        headers = upstream_header_block(request.requestHeaders.raw, request.requestHeaders.lower,
                                        request.client_ip, request.request_id, request.secure,
                                        len(request.body),
                                        self.gateway.identity.trusts(request.client_ip))
        exchange = Exchange(self.gateway, request.method, request.uri, headers, request.body,
                            request.request_id, False, ClientSink(request), info=request.info,
                            tenant=self._tenant(request), passthrough=True)
        exchange.sink.exchange = exchange
        exchange.start()

    def _forward(self, request: Request, route: str, doc: dict, body: bytes) -> None:
        gw = self.gateway
        stream = doc.get("stream") is True
        model = doc.get("model")
        if not isinstance(model, str):
            model = None
        elif gw.unserved(model):
            return send_error(request, 404, f"The model {model!r} does not exist: no backend "
                              "serves it (GET /v1/models lists what they serve)",
                              "model_not_found")
        cache = gw.cache
        decision = cache.decide(route, doc, stream, request) if cache.enabled else None
        request.info.sse = stream
        if decision is not None and decision.lookup and cache.answer_from_cache(decision, request):
            return
        strip_usage = False
        if stream and route != ROUTE_EMBEDDINGS and "stream_options" not in doc \
                and gw.config.proxy.stream_usage:
            # Ask for the usage chunk (to count tokens); it is taken out
            # before the client, who did not ask, sees it.
            asked = inject_include_usage(body)
            if asked is not None:
                body, strip_usage = asked, True
        headers = upstream_header_block(request.requestHeaders.raw, request.requestHeaders.lower,
                                        request.client_ip, request.request_id, request.secure,
                                        len(body), self.gateway.identity.trusts(request.client_ip))
        if decision is None or not decision.store:
            sink: Any = ClientSink(request, decision.label if decision else None)
        else:
            sink = cache.new_flight(decision)
            sink.join(request, decision.label, decision.include_usage)
        request.info.cache = decision.label.decode() if decision else None

        def go_upstream() -> None:
            exchange = Exchange(gw, request.method, request.uri, headers, body,
                                request.request_id, stream, sink, info=request.info, model=model,
                                route=gw.route_context(route, doc, stream),
                                tenant=self._tenant(request), account=True,
                                strip_usage=strip_usage)
            sink.exchange = exchange
            exchange.start()

        if cache.shared is not None and decision is not None and decision.lookup:
            # Another gateway may have the answer, or be getting it.
            cache.resolve_shared(decision, sink, go_upstream)
        else:
            go_upstream()
