"""The server's Prometheus metrics (one registry per app, served at /metrics)."""

from __future__ import annotations

ENDPOINTS = ("/predict", "/feedback", "/health", "/metadata", "/metrics")


def endpoint_label(path: str | None) -> str:
    """The /metrics label of a request path: one of ENDPOINTS, /reports, or
    "other" (a label per unknown path would let clients grow the metrics)."""
    if path is None:
        return "other"
    return path if path in ENDPOINTS else "/reports" if path.startswith("/reports") else "other"


class Metrics:
    """Requests by endpoint and status, errors by endpoint and kind, latency,
    texts per model call, texts predicted, and the version being served."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("shrinkflow_requests_total", "HTTP requests", ["endpoint", "status"],
                                registry=self.registry)
        self.errors = Counter("shrinkflow_errors_total", "Requests answered with an error", ["endpoint", "kind"],
                              registry=self.registry)
        self.latency = Histogram("shrinkflow_request_latency_seconds", "Request latency", ["endpoint"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5),
                                 registry=self.registry)
        self.batch = Histogram("shrinkflow_batch_size", "Texts per model call",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)
        self.predictions = Counter("shrinkflow_predictions_total", "Texts predicted", registry=self.registry)
        self.version = Gauge("shrinkflow_model_version_info", "The model version being served (1 = live)",
                             ["version"], registry=self.registry)

    def serving(self, version: str) -> None:
        """``version`` is now the one being served."""
        self.version.clear()
        self.version.labels(version).set(1)

    def edge_reject(self, status: int, kind: str, path: str | None) -> None:
        """A request answered at the HTTP edge, before the app saw it
        (``httpedge.EdgeLimits.on_reject``)."""
        endpoint = endpoint_label(path)
        self.requests.labels(endpoint, str(status)).inc()
        self.errors.labels(endpoint, kind).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
