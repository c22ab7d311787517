"""Error answers: one JSON shape (``schemas.ErrorBody``), each one counted in
``shrinkflow_errors_total`` by endpoint and kind."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from shrinkflow.serving.metrics import Metrics, endpoint_label


class ApiError(Exception):
    """Raised by an endpoint or a dependency to answer ``status`` with
    ``{"error": kind, "detail": message, **extra}`` (``extra``: e.g. the
    ``problems`` list, the served ``labels``)."""

    def __init__(self, status: int, kind: str, message: str, **extra):
        super().__init__(message)
        self.status, self.kind, self.message, self.extra = status, kind, message, extra


def error_response(metrics: Metrics, status: int, kind: str, message: str, endpoint: str, **extra) -> Response:
    """The error answer, counted under ``endpoint`` (a /metrics label)."""
    metrics.errors.labels(endpoint, kind).inc()
    # json.dumps escapes every non-ASCII character, so no text a client
    # sent (a lone surrogate in a key name) can break the answer itself.
    return Response(json.dumps({"error": kind, "detail": message, **extra}), status_code=status,
                    media_type="application/json")


async def api_error_handler(request: Request, exc: ApiError) -> Response:
    """The app's exception handler for ApiError."""
    return error_response(request.app.state.serving.metrics, exc.status, exc.kind, exc.message,
                          endpoint_label(request.scope["path"]), **exc.extra)
