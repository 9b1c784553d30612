"""The supervisor's admin listener: the workers' figures, as one gateway's."""

from typing import Any, List

from twisted.internet import defer
from twisted.logger import Logger

from ntonix.http.errors import send_error, send_json_body
from ntonix.http.routes import send_json
from ntonix.workers.merge import merge_expositions, summed_metrics
from ntonix.workers.supervisor import Supervisor

log = Logger(namespace="ntonix.workers")


class SupervisorRouter:
    """The admin listener of a supervisor: the workers' figures, together."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def handle(self, request: Any) -> None:
        sup = self.supervisor
        path = request.path
        if request.method not in (b"GET", b"HEAD"):
            return send_error(request, 405, "only GET here", "method_not_allowed")

        def answer(d: "defer.Deferred[Any]", render: Any) -> None:
            def done(result: Any) -> None:
                if not request.disconnected and not request.finished:
                    render(result)
            d.addCallback(done)
            d.addErrback(lambda f: (log.failure("admin request {path}", f, path=path),
                                    None if request.finished or request.disconnected else
                                    send_error(request, 500, "internal gateway error",
                                               "internal_error")))

        if path == b"/metrics/prometheus" or (path == b"/metrics" and b"text/plain" in (
                request.getHeader(b"accept") or b"")):
            def page(replies: List[Any]) -> None:
                live = [p for _, p in sorted(sup.workers.items()) if p.alive]
                for p, r in zip(live, replies):
                    if r:
                        sup.last_metrics[p.index] = r["text"]
                # A worker slow to answer counts with its last page.
                texts = [sup.last_metrics[p.index] for p in live if p.index in sup.last_metrics]
                text = merge_expositions(texts, sup.retired_metrics)
                text += ("# HELP ntonix_workers Worker processes running\n"
                         "# TYPE ntonix_workers gauge\n"
                         f"ntonix_workers {sum(1 for p in sup.workers.values() if p.alive)}.0\n")
                request.setResponseCode(200)
                request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
                body = text.encode()
                request.setHeader(b"Content-Length", b"%d" % len(body))
                request.write(body)
                request.finish()
            return answer(sup.ask_all("metrics"), page)
        if path == b"/readyz":
            path = b"/health"
        if path in (b"/metrics", b"/cache/stats", b"/admission", b"/health"):
            def status(replies: List[Any]) -> None:
                alive = [r for r in replies if r]
                if path == b"/metrics":
                    send_json(request, summed_metrics([r["metrics"] for r in alive], sup.as_json()))
                elif path == b"/cache/stats":
                    send_json(request, {"workers": [r["cache"] for r in alive]})
                elif path == b"/admission":
                    send_json(request, {"workers": [r["admission"] for r in alive]})
                else:
                    # As one gateway: ready while some worker can send a
                    # request to some backend and is not draining.
                    ok = any(r.get("backends_available") and not r["draining"] for r in alive)
                    send_json(request, {"status": "healthy" if ok else "unhealthy",
                                        "workers": sup.as_json()}, 200 if ok else 503)
            return answer(sup.ask_all("status"), status)
        if path == b"/livez":
            return send_json(request, {"status": "alive", "workers": sup.as_json()})
        if path == b"/workers":
            return send_json(request, {"workers": sup.as_json()})
        if path == b"/backends":
            first = sup.workers.get(0)
            if first is None or not first.alive:
                return send_error(request, 503, "worker 0 (the health checks) is not running",
                                  "no_worker")
            return answer(first.channel.call("backends", 5.0, sup.reactor),
                          lambda r: send_json_body(request, 200, r["body"].encode()))
        send_error(request, 404, f"no route {path.decode('latin-1')} on the supervisor's "
                   "admin listener", "not_found")
