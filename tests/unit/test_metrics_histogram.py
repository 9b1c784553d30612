"""Our scrape-time histograms expose exactly what prometheus-client's do."""

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from ntonix.observe.metrics import LATENCY_BUCKETS, LocalHistogram, _Histograms


def test_local_histogram_exposition_matches_prometheus_client():
    theirs = CollectorRegistry()
    h1 = Histogram("x_seconds", "doc", ["route"], buckets=LATENCY_BUCKETS, registry=theirs)
    ours = CollectorRegistry()
    h2 = LocalHistogram("x_seconds", "doc", ["route"])
    ours.register(_Histograms([h2]))
    # Values on bucket bounds, between them, and past the last.
    for v in (0.0, 0.001, 0.005, 0.0051, 0.3, 5.0, 70.0):
        for route in ("chat", "embeddings"):
            h1.labels(route).observe(v)
            h2.labels(route).observe(v)
    expected = [line for line in generate_latest(theirs).decode().splitlines()
                if "_created" not in line]
    assert generate_latest(ours).decode().splitlines() == expected
