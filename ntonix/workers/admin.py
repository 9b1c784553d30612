"""One gateway's admin answers when it runs as several worker processes.

Only the supervisor sees every worker. It computes each admin answer once,
``GatewayViews.answer(path, accept)``, and that answer is served twice: on
its own admin listener (``SupervisorRouter``), and to any worker whose
public port got an admin route with ``admin.token`` (the channel op
``admin_view``; ``SupervisorView`` is the worker's side). So the figures are
the same whichever port and whichever worker a client reaches.
"""

import json
from typing import TYPE_CHECKING, Any, Callable, Dict, List

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from ntonix.http.admin_auth import listener_allows
from ntonix.http.admin_view import Answer, send_answer
from ntonix.http.errors import error_json, send_error
from ntonix.workers.channel import ChannelError
from ntonix.workers.merge import (merge_expositions, merged_admission, merged_cache_stats,
                                  summed_metrics)

if TYPE_CHECKING:
    from ntonix.workers.supervisor import Supervisor, WorkerProcess

log = Logger(namespace="ntonix.workers")

# How long the supervisor waits for each worker's figures; a worker that is
# slower counts with its last ones (or not at all).
WORKER_ANSWER_SECONDS = 5.0
# A worker waits for the supervisor a little longer than that, so that an
# answer made without a slow worker still reaches it rather than a 503.
VIEW_SECONDS = WORKER_ANSWER_SECONDS + 1.0

PROMETHEUS_TEXT = b"text/plain; version=0.0.4; charset=utf-8"

View = Callable[[bytes], "defer.Deferred[Answer]"]


def json_answer(doc: Any, status: int = 200) -> Answer:
    """``doc`` as the Router's ``send_json`` encodes it."""
    return Answer(status, b"application/json",
                  json.dumps(doc, separators=(",", ":")).encode() + b"\n")


def error_answer(status: int, message: str, code: str) -> Answer:
    return Answer(status, b"application/json", error_json(status, message, code))


def wants_prometheus(accept: bytes) -> bool:
    """Whether a client asking for /metrics wants the text page (as a
    Prometheus scraper asks), like a single gateway's Router decides."""
    accept = accept.lower()
    return b"openmetrics" in accept or b"text/plain" in accept


class GatewayViews:
    """The supervisor's admin answers: path -> view over the workers' figures."""

    def __init__(self, supervisor: "Supervisor") -> None:
        self.supervisor = supervisor
        self.views: Dict[bytes, View] = {
            b"/metrics": self.metrics,
            b"/metrics/prometheus": self.prometheus,
            b"/cache/stats": self.cache_stats,
            b"/admission": self.admission,
            b"/backends": self.backends,
            b"/workers": self.workers,
            b"/health": self.health,
            b"/readyz": self.health,
            b"/livez": self.live,
        }

    def answer(self, path: bytes, accept: bytes) -> "defer.Deferred[Answer]":
        """The answer to GET ``path``; never fails (an error is a 500 answer)."""
        view = self.views.get(path)
        if view is None:
            return defer.succeed(error_answer(
                404, f"no route {path.decode('latin-1')} on the supervisor's admin listener",
                "not_found"))

        def failed(f: Any) -> Answer:
            log.failure("admin view {path}", f, path=path.decode("latin-1"))
            return error_answer(500, "internal gateway error", "internal_error")

        return defer.maybeDeferred(view, accept).addErrback(failed)

    def serve_workers(self) -> None:
        """Answer the workers' ``admin_view`` op (their public port's admin
        routes), whether or not this process has an admin listener."""
        self.supervisor.handlers["admin_view"] = self._for_worker

    def _for_worker(self, proc: "WorkerProcess", msg: Dict[str, Any]) -> "defer.Deferred[Any]":
        d = self.answer(str(msg.get("path", "")).encode("latin-1"),
                        str(msg.get("accept", "")).encode("latin-1"))
        return d.addCallback(Answer.to_message)

    # -- the views
    def _statuses(self) -> "defer.Deferred[List[Dict[str, Any]]]":
        """The "status" document of every worker that answered in time."""
        d = self.supervisor.ask_all("status", WORKER_ANSWER_SECONDS)
        return d.addCallback(lambda replies: [r for r in replies if r])

    def prometheus(self, accept: bytes) -> "defer.Deferred[Answer]":
        sup = self.supervisor
        live = sup.live_workers()  # those asked, in the order of their replies

        def page(replies: List[Any]) -> Answer:
            for p, r in zip(live, replies):
                if r:
                    sup.last_metrics[p.index] = r["text"]
            # A worker slow to answer counts with its last page.
            texts = [sup.last_metrics[p.index] for p in live if p.index in sup.last_metrics]
            # Requests that may wait wait in the broker, not in a worker.
            texts.append(sup.broker.exposition())
            text = merge_expositions(texts, sup.retired_metrics)
            text += ("# HELP ntonix_workers Worker processes running\n"
                     "# TYPE ntonix_workers gauge\n"
                     f"ntonix_workers {len(live)}.0\n")
            return Answer(200, PROMETHEUS_TEXT, text.encode())

        return sup.ask_all("metrics", WORKER_ANSWER_SECONDS).addCallback(page)

    def metrics(self, accept: bytes) -> "defer.Deferred[Answer]":
        if wants_prometheus(accept):
            return self.prometheus(accept)
        return self._statuses().addCallback(lambda alive: json_answer(
            summed_metrics([r["metrics"] for r in alive], self.supervisor.as_json())))

    def cache_stats(self, accept: bytes) -> "defer.Deferred[Answer]":
        return self._statuses().addCallback(
            lambda alive: json_answer(merged_cache_stats([r["cache"] for r in alive])))

    def admission(self, accept: bytes) -> "defer.Deferred[Answer]":
        """The broker's queue when requests may wait (the gateway's one
        queue, with its slots), beside each worker's own document."""
        def doc(alive: List[Dict[str, Any]]) -> Answer:
            merged = merged_admission([r["admission"] for r in alive])
            broker = self.supervisor.broker
            if not broker.grants and not broker.admission.waiting \
                    and not broker.admission.refused:
                return json_answer(merged)  # no limit anywhere: nothing went through it
            return json_answer({**broker.as_json(), "workers": merged.get("workers", [])})
        return self._statuses().addCallback(doc)

    def health(self, accept: bytes) -> "defer.Deferred[Answer]":
        def judged(alive: List[Dict[str, Any]]) -> Answer:
            # As one gateway: ready while some worker can send a request to
            # some backend and is not draining.
            ok = any(r.get("backends_available") and not r["draining"] for r in alive)
            return json_answer({"status": "healthy" if ok else "unhealthy",
                                "workers": self.supervisor.as_json()}, 200 if ok else 503)
        return self._statuses().addCallback(judged)

    def live(self, accept: bytes) -> Answer:
        return json_answer({"status": "alive", "workers": self.supervisor.as_json()})

    def workers(self, accept: bytes) -> Answer:
        return json_answer({"workers": self.supervisor.as_json()})

    def backends(self, accept: bytes) -> "defer.Deferred[Answer]":
        """Worker 0's view: it runs the health checks and scrapes."""
        first = self.supervisor.workers.get(0)
        if first is None or not first.alive:
            return defer.succeed(error_answer(503, "worker 0 (the health checks) is not running",
                                              "no_worker"))
        d = first.channel.call("backends", WORKER_ANSWER_SECONDS, self.supervisor.reactor)
        return d.addCallbacks(
            lambda r: Answer(200, b"application/json", r["body"].encode()),
            lambda f: error_answer(503, "worker 0 (the health checks) did not answer: "
                                   + (f.getErrorMessage() or f.type.__name__), "no_worker"))


class SupervisorRouter:
    """The supervisor's admin listener: ``GatewayViews`` over HTTP."""

    def __init__(self, views: GatewayViews) -> None:
        self.views = views

    def handle(self, request: Any) -> None:
        if not listener_allows(request, self.views.supervisor.config.admin):
            return None
        if request.method not in (b"GET", b"HEAD"):
            return send_error(request, 405, "only GET here", "method_not_allowed")
        path = request.path
        d = self.views.answer(path, request.getHeader(b"accept") or b"")
        d.addCallback(lambda answer: send_answer(request, answer))
        d.addErrback(lambda f: log.failure("admin request {path}", f,
                                           path=path.decode("latin-1")))


@attrs.define
class SupervisorView:
    """A worker's ``AdminView``: the supervisor's answer over the channel,
    or a failure within ``timeout`` seconds."""

    context: Any  # its .channel, to the supervisor, opens after the gateway is built
    clock: Any
    timeout: float = VIEW_SECONDS

    def __call__(self, path: bytes, accept: bytes) -> "defer.Deferred[Answer]":
        channel = self.context.channel
        if channel is None:
            return defer.fail(ChannelError("no channel to the supervisor yet"))
        d = channel.call("admin_view", self.timeout, self.clock,
                         path=path.decode("latin-1"), accept=accept.decode("latin-1"))
        return d.addCallback(Answer.from_message)
