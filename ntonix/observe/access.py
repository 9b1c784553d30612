"""Per-request facts, the access log event and the Server-Timing header."""

from typing import Any, Optional

import attrs
from twisted.logger import Logger

access_log = Logger(namespace="ntonix.access")

OK, CLIENT_CLOSED, UPSTREAM_ERROR, GATEWAY_ERROR = (
    "ok", "client_closed", "upstream_error", "gateway_error")


@attrs.define
class RequestInfo:
    """What the gateway learns about one request as it handles it."""

    request_id: str
    method: str
    path: str
    client: str
    received_at: float
    route: str = "other"
    cache: Optional[str] = None
    backend: Optional[str] = None
    retries: int = 0
    upstream_sent_at: Optional[float] = None
    upstream_head_at: Optional[float] = None
    first_byte_at: Optional[float] = None
    finished_at: Optional[float] = None
    sse: bool = False
    chunks: int = 0
    outcome: str = OK
    upstream_failed: bool = False
    gateway_seconds: Optional[float] = None
    upstream_seconds: Optional[float] = None
    queue_seconds: Optional[float] = None  # waited for a free backend
    tokens: Optional[tuple] = None  # (prompt, completion) from the answer's usage

    def timing(self, now: float) -> str:
        """Set and return the Server-Timing value for a head written ``now``.

        gateway = (upstream request sent - request received)
                + (client head written - upstream head or first token);
        upstream = everything between (one shared answer waited for counts
        as upstream time for those who joined it).
        """
        sent = self.upstream_sent_at if self.upstream_sent_at is not None else now
        head = self.upstream_head_at if self.upstream_head_at is not None else sent
        head = max(head, sent)
        gateway = max(0.0, sent - self.received_at) + max(0.0, now - head)
        upstream = max(0.0, head - sent)
        self.gateway_seconds, self.upstream_seconds = gateway, upstream
        timing = f"gateway;dur={gateway * 1000:.3f}, upstream;dur={upstream * 1000:.3f}"
        if self.queue_seconds is not None:
            # Part of the gateway's time: the wait in the admission queue.
            timing += f", queue;dur={self.queue_seconds * 1000:.3f}"
        return timing


def ms(start: Optional[float], end: Optional[float]) -> Optional[float]:
    if start is None or end is None:
        return None
    return round((end - start) * 1000, 3)


def log_access(info: RequestInfo, status: int, bytes_sent: int) -> None:
    total = ms(info.received_at, info.finished_at)
    ttfb = ms(info.received_at, info.first_byte_at)
    access_log.info(
        "{client} {method} {path} {status} {bytes_sent}B {latency_ms}ms "
        "ttfb={ttfb_ms}ms cache={cache} backend={backend} retries={retries} "
        "outcome={outcome} request_id={request_id}",
        request_id=info.request_id, client=info.client, method=info.method, path=info.path,
        status=status, bytes_sent=bytes_sent, latency_ms=total, ttfb_ms=ttfb,
        ttft_ms=ttfb if info.sse else None, stream=info.sse, chunks=info.chunks,
        cache=info.cache or "-", backend=info.backend or "-", retries=info.retries,
        outcome=info.outcome, gateway_ms=ms(0, info.gateway_seconds),
        upstream_ms=ms(0, info.upstream_seconds), queue_ms=ms(0, info.queue_seconds),
        prompt_tokens=info.tokens[0] if info.tokens else None,
        completion_tokens=info.tokens[1] if info.tokens else None,
    )


def annotate(request: Any, **changes: Any) -> None:
    """Update the request's info, when it has one."""
    info = getattr(request, "info", None)
    if info is not None:
        for k, v in changes.items():
            setattr(info, k, v)
