"""The fleet: the backends this gateway sends to, and what per-request code
asks of them.

It owns the backend list and the facts derived from it that are read on
every request (does any backend know its models, does any have a
concurrency limit: kept, not scanned), and answers the two questions of the
request path: which backends may take this request (``candidates``), and
which of those have room now (``room``). Admission, the balancer and the
Exchange take this object, not the whole Gateway. The configuration is read
through a getter because SIGHUP swaps it.
"""

from typing import Any, Callable, Dict, Iterable, List, Optional

from ntonix.config import Config
from ntonix.identity import Identity
from ntonix.routing.backend import Backend
from ntonix.routing.breaker import CLOSED

# Scraped queue lengths older than this many scrape intervals are not trusted.
FRESH_SCRAPES = 3


class Settings:
    """The settings admission reads, as in force now (a getter: SIGHUP
    swaps the configuration). Shared by every fleet view Admission takes."""

    def __init__(self, config: Callable[[], Config]) -> None:
        self._config = config

    @property
    def balancer_settings(self) -> Any:
        return self._config().balancer

    @property
    def tenant_settings(self) -> Any:
        return self._config().tenants


class Fleet(Settings):
    def __init__(self, config: Callable[[], Config], clock: Any) -> None:
        super().__init__(config)
        self.clock = clock
        self.backends: List[Backend] = []
        self.models_known = False
        self.limited = False
        # Models that are LoRA adapters on some backend (from /v1/models).
        self.adapters: frozenset = frozenset()
        # Who a request is (replaced on reload).
        self.identity: Optional[Identity] = None

    def weight_of(self, tenant: str) -> float:
        cls = self._config().tenants.classes.get(tenant)
        return float(cls.get("weight", 1)) if cls else 1.0

    @property
    def may_wait(self) -> bool:
        """Requests may have to wait for room: some backend has a limit."""
        return self.limited or bool(self._config().balancer.backend_queue_limit)

    # -- the list changed
    def changed(self) -> None:
        self.models_known = any(b.models_known for b in self.backends)
        self.limited = any(b.max_concurrency for b in self.backends)

    def models_changed(self) -> None:
        """A backend's reported list changed: recompute the adapters."""
        self.models_known = any(b.models_known for b in self.backends)
        self.adapters = frozenset(
            m for b in self.backends for m, entry in (b.reported or {}).items()
            if isinstance(entry, dict) and entry.get("parent"))

    # -- questions
    def find(self, name: str) -> Optional[Backend]:
        return next((b for b in self.backends if b.name == name), None)

    def candidates(self, exclude: Iterable[Backend] = (),
                   model: Optional[str] = None) -> List[Backend]:
        """The backends that may take a request for ``model`` now. One
        plain loop: at a hundred backends this is most of a pick's cost."""
        skip = exclude if isinstance(exclude, (set, frozenset, dict)) else set(exclude)
        out = []
        for b in self.backends:
            if b.draining or b.loading:
                continue
            br = b.breaker
            if br.state != CLOSED and not br.available():
                continue
            if skip and b in skip:
                continue
            if model is not None and (b.models or b.reported is not None) \
                    and not b.serves(model):
                continue
            out.append(b)
        return out

    def eligible(self, exchange: Any) -> List[Backend]:
        """The candidates for ``exchange``'s next attempt; raises LookupError
        when it has none at all (every backend down or not serving it)."""
        cands = self.candidates(exchange.tried, exchange.model)
        if not cands and exchange.tried:
            # A single backend: a stale pooled connection is the usual cause
            # of a connect-level failure, so the same backend may take it.
            cands = self.candidates((), exchange.model) if exchange.same_backend_ok else []
        if not cands:
            raise LookupError
        return cands

    def room(self, exchange: Any) -> List[Backend]:
        """Candidates for ``exchange`` with room; raises LookupError when it
        has no candidate at all."""
        cands = self.eligible(exchange)
        limit = self._config().balancer.backend_queue_limit
        if not limit and not self.limited:
            return cands  # no backend has a limit: all have room
        return [b for b in cands if self.has_room(b, limit)]

    def has_room(self, b: Backend, queue_limit: int) -> bool:
        cap = b.max_concurrency
        if cap and b.in_flight >= cap:
            return False
        return not self.queue_over(b, queue_limit)

    def queue_over(self, b: Backend, queue_limit: int) -> bool:
        """Its own metrics report a longer queue than ``queue_limit``."""
        if not queue_limit or b.load is None:
            return False
        fresh_after = self.clock.seconds() - \
            FRESH_SCRAPES * self._config().balancer.scrape_interval_seconds
        return b.load.at >= fresh_after and b.load.waiting > queue_limit

    def any_available(self, exclude: Iterable[Backend] = (),
                      model: Optional[str] = None) -> bool:
        skip = set(exclude)
        return any(b.available and b not in skip and (model is None or b.serves(model))
                   for b in self.backends)

    def unserved(self, model: str) -> bool:
        """No backend serves ``model``, as far as is known: every backend's
        list is known (configured or reported) and none names it."""
        if not self.models_known:
            return False
        live = [b for b in self.backends if not b.removed]
        return bool(live) and all(b.models_known and not b.serves(model) for b in live)

    def slots_json(self) -> List[Dict[str, Any]]:
        return [{"name": b.name, "in_flight": b.in_flight,
                 "max_concurrency": b.max_concurrency or None} for b in self.backends]
