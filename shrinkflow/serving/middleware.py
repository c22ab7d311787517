"""The token check and the request metrics, as one plain ASGI middleware.

The token rule covers every path but /health: the API, /docs and its
assets, /openapi.json, /reports/ and unknown paths (401 before any 404), so
it sits in front of the routing rather than in a route dependency, which
mounted static files and unknown paths never reach. Starlette's
BaseHTTPMiddleware (``@app.middleware``) would wrap every request in extra
tasks and streams, CPU that a 3.5 ms model call on 2 cores cannot spare.
"""

from __future__ import annotations

import hmac
import time

from shrinkflow.httpedge import TIMEOUT_SCOPE_KEY
from shrinkflow.serving.errors import error_response
from shrinkflow.serving.metrics import Metrics, endpoint_label

OPEN_PATHS = ("/health",)


def bearer_ok(headers: list[tuple[bytes, bytes]], token: str) -> bool:
    """Whether the request's ``Authorization`` header is ``Bearer <token>``
    (compared in constant time)."""
    given = dict(headers).get(b"authorization", b"")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


class TokenAndMetrics:
    """Answers 401 to a request without the bearer ``token`` (None: no token
    required) on any path but OPEN_PATHS; counts every request by endpoint
    and status, and its latency. A request the edge timed out mid-body is
    counted as a 408, whatever the app went on to answer into the closed
    connection."""

    def __init__(self, app, metrics: Metrics, token: str | None = None):
        self.app, self.metrics, self.token = app, metrics, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        path = scope["path"]
        endpoint = endpoint_label(path)
        if self.token and path not in OPEN_PATHS and not bearer_ok(scope["headers"], self.token):
            self.metrics.requests.labels(endpoint, "401").inc()
            return await error_response(self.metrics, 401, "unauthorized", "missing or wrong bearer token",
                                        endpoint)(scope, receive, send)
        status = []

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            code = 408 if scope.get(TIMEOUT_SCOPE_KEY) else status[0] if status else 500
            self.metrics.requests.labels(endpoint, str(code)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
