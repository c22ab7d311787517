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


# Starlette's own refusals (an unknown path, a method the route does not
# take), in the same shape as every other error.
HTTP_KINDS = {404: "not_found", 405: "method_not_allowed"}


async def http_error_handler(request: Request, exc) -> Response:
    """The app's handler for Starlette's HTTPException (404 for a path no
    route or report serves, 405 for a method a route does not take): the
    one error shape, counted like the others, its headers (405's
    ``Allow``) kept."""
    response = error_response(request.app.state.serving.metrics, exc.status_code,
                              HTTP_KINDS.get(exc.status_code, f"http_{exc.status_code}"), str(exc.detail),
                              endpoint_label(request.scope["path"]))
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response
