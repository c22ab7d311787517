"""The server's Prometheus metrics (one registry per app, served at /metrics).

With ``serve --workers N`` every worker counts in files under
``$PROMETHEUS_MULTIPROC_DIR`` (``MULTIPROC_ENV``, a fresh folder the serve
process makes for its workers: prometheus_client's multiprocess mode), and
/metrics, whichever worker answers it, sums them all: the counters are the
server's, not one worker's, so they never go back between scrapes."""

from __future__ import annotations

import os

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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

        # prometheus_client chose its value store at import: files under
        # MULTIPROC_ENV when set (a --workers worker), else memory.
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self._version_served: str | None = None
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
        # across workers, the largest of the live ones: 1 while any worker serves the version
        self.version = Gauge("shrinkflow_model_version_info", "The model version being served (1 = live)",
                             ["version"], registry=self.registry, multiprocess_mode="livemax")

    def serving(self, version: str) -> None:
        """``version`` is now the one being served (the one before: 0, as
        a worker's file keeps every label it set)."""
        if self.multiprocess:
            if self._version_served is not None and self._version_served != version:
                self.version.labels(self._version_served).set(0)
        else:
            self.version.clear()
        self.version.labels(version).set(1)
        self._version_served = version

    def worker_stopped(self) -> None:
        """A --workers worker's shutdown: its live gauge (the version it
        served) leaves /metrics; its counts stay in the sums."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())

    def edge_reject(self, status: int, kind: str, path: str | None) -> None:
        """A request answered at the HTTP edge, before the app saw it
        (``httpedge.EdgeLimits.on_reject``)."""
        endpoint = endpoint_label(path)
        self.requests.labels(endpoint, str(status)).inc()
        self.errors.labels(endpoint, kind).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        from prometheus_client import CollectorRegistry, generate_latest

        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged)   # every worker's files, summed (the gauge: livemax)
        return generate_latest(merged)
