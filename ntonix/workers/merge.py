"""One gateway's figures from its workers' figures.

Prometheus pages are merged per series: counters, histograms and most gauges
summed, state-like gauges (every worker reports the same backends) the
largest. The pages of workers that were replaced still count for counters
and histograms, so totals never go down. The JSON ``/metrics`` is summed the
same way; ``/cache/stats`` and ``/admission`` give the sums at the top and
each worker's document under ``"workers"``.
"""

from typing import Any, Dict, List, Optional

from prometheus_client.parser import text_string_to_metric_families

# Gauges whose meaning across workers is the largest, not the sum.
# (Every worker reports the same backends: their state is not additive.)
MAX_GAUGES = frozenset({"ntonix_uptime_seconds", "ntonix_build_info", "ntonix_redis_up",
                        "ntonix_backend_circuit_state", "ntonix_backend_latency_avg_seconds",
                        "ntonix_backend_loading", "ntonix_backend_prefix_blocks"})


def merge_expositions(texts: List[str], retired: Optional[List[str]] = None) -> str:
    """One Prometheus text page from the workers' pages: counters,
    histograms and most gauges summed per series; state-like gauges the
    largest. ``retired``: the last pages of workers that were replaced,
    whose counters and histograms still count (so totals never go down)."""
    families: Dict[str, Dict[str, Any]] = {}
    pages = [(t, False) for t in texts] + [(t, True) for t in retired or ()]
    for text, old_worker in pages:
        for fam in text_string_to_metric_families(text):
            if old_worker and fam.type not in ("counter", "histogram"):
                continue
            f = families.setdefault(fam.name, {"type": fam.type, "help": fam.documentation,
                                               "samples": {}})
            for sm in fam.samples:
                key = (sm.name, tuple(sorted(sm.labels.items())))
                old = f["samples"].get(key)
                if old is None:
                    f["samples"][key] = sm.value
                elif fam.name in MAX_GAUGES:
                    f["samples"][key] = max(old, sm.value)
                else:
                    f["samples"][key] = old + sm.value
    lines = []
    for name, f in families.items():
        shown = name + "_total" if f["type"] == "counter" else name
        lines.append(f"# HELP {shown} {_escape_help(f['help'])}")
        lines.append(f"# TYPE {shown} {f['type']}")
        for (sample, labels), value in f["samples"].items():
            label_text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{sample}{{{label_text}}} {_number(value)}" if labels
                         else f"{sample} {_number(value)}")
    return "\n".join(lines) + "\n"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 2 ** 53:
        return f"{int(value)}.0"
    return repr(value)


def summed_metrics(docs: List[Dict[str, Any]], workers: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The JSON /metrics of one gateway, summed over the workers."""
    out: Dict[str, Any] = {}
    for key in ("requests_total", "requests_active", "requests_success", "requests_error",
                "cache_hits", "cache_misses", "connections_active", "connections_total",
                "memory_cache_bytes", "process_resident_memory_bytes"):
        out[key] = sum(d.get(key, 0) for d in docs)
    looked = out["cache_hits"] + out["cache_misses"]
    out["cache_hit_rate"] = round(out["cache_hits"] / looked, 4) if looked else 0.0
    out["uptime_seconds"] = max((d.get("uptime_seconds", 0) for d in docs), default=0)
    out["backends"] = docs[0].get("backends", []) if docs else []
    out["workers"] = workers
    return out


# Each worker keeps its own store: its counts and sizes add up (the
# gateway-wide capacity is the sum of the workers' too).
_CACHE_SUMS = ("hits", "misses", "evictions", "expired", "entries", "size_bytes",
               "max_size_bytes", "coalesced", "bypasses", "stores", "too_large", "converted",
               "unconvertible", "in_flight")
_SHARED_SUMS = ("errors", "hits", "led", "followed", "takeovers")


def merged_cache_stats(docs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The JSON /cache/stats of one gateway from its workers' documents."""
    out: Dict[str, Any] = {"enabled": any(d.get("enabled") for d in docs)}
    out.update(_sums(docs, _CACHE_SUMS))
    looked = out["hits"] + out["misses"]
    out["hit_rate"] = round(out["hits"] / looked, 4) if looked else 0.0
    # A setting: the same in every worker.
    out["ttl_seconds"] = docs[0].get("ttl_seconds") if docs else None
    shared = [d["shared"] for d in docs if d.get("shared")]
    if shared:
        tier = _sums(shared, _SHARED_SUMS)
        # The tier is one Redis: degraded as soon as one worker cannot reach it.
        tier["state"] = "degraded" if any(s.get("state") == "degraded" for s in shared) \
            else "ok"
        out["shared"] = tier
    out["workers"] = docs
    return out


def merged_admission(docs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The JSON /admission of one gateway from its workers' documents.

    Counts add up (waiting, admitted, refused, each backend's requests in
    flight); the settings shown (queue size, timeout, each backend's
    max_concurrency) are the configured ones, which every worker applies to
    its own queue."""
    first = docs[0] if docs else {}
    tenants: Dict[Any, Dict[str, Any]] = {}
    for d in docs:
        for t in d.get("tenants", ()):
            key = (t["tenant"], t["priority"])
            seen = tenants.get(key)
            if seen is None:
                tenants[key] = dict(t)
            else:
                seen["waiting"] += t["waiting"]
                seen["oldest_wait_seconds"] = max(seen["oldest_wait_seconds"],
                                                  t["oldest_wait_seconds"])
    refused: Dict[Any, int] = {}
    for d in docs:
        for r in d.get("refused", ()):
            key = (r["priority"], r["tenant"], r["reason"])
            refused[key] = refused.get(key, 0) + r["count"]
    in_flight: Dict[str, Dict[str, Any]] = {}
    for d in docs:
        for b in d.get("backends", ()):
            slot = in_flight.setdefault(b["name"], dict(b, in_flight=0))
            slot["in_flight"] += b["in_flight"]
    rates = [d["drain_rate_per_second"] for d in docs
             if d.get("drain_rate_per_second") is not None]
    return {
        "waiting": sum(d.get("waiting", 0) for d in docs),
        "by_priority": _summed_maps(d.get("by_priority", {}) for d in docs),
        "tenants": list(tenants.values()),
        "queue_size": first.get("queue_size"),
        "queue_timeout_seconds": first.get("queue_timeout_seconds"),
        "drain_rate_per_second": round(sum(rates), 3) if rates else None,
        # The longest any worker's queue tells its clients to wait.
        "retry_after_seconds": max((d["retry_after_seconds"] for d in docs
                                    if d.get("retry_after_seconds") is not None), default=None),
        "admitted": _summed_maps(d.get("admitted", {}) for d in docs),
        "refused": [{"priority": p, "tenant": t, "reason": r, "count": n}
                    for (p, t, r), n in sorted(refused.items())],
        "backends": list(in_flight.values()),
        "workers": docs,
    }


def _sums(docs: List[Dict[str, Any]], keys: Any) -> Dict[str, Any]:
    return {k: sum(d.get(k, 0) for d in docs) for k in keys}


def _summed_maps(maps: Any) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = out.get(k, 0) + v
    return out
