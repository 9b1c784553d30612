"""One gateway's figures from its workers' figures.

Prometheus pages are merged per series: counters, histograms and most gauges
summed, state-like gauges (every worker reports the same backends) the
largest. The pages of workers that were replaced still count for counters
and histograms, so totals never go down. The JSON ``/metrics`` is summed the
same way.
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
