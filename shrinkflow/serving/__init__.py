"""Serving the registry's production version over HTTP (FastAPI).

``create_app(registry, log, params)`` (also ``make_app``) builds the app and
is testable without a socket; ``shrinkflow serve`` only parses flags and runs
it under uvicorn with ``shrinkflow.httpedge.EdgeProtocol`` (header limits and
a request deadline). Where things live, FastAPI's "bigger applications"
layout:

- ``app``: ``create_app`` wires the shared state, the lifespan, the
  middleware and the routers; ``app_from_env`` is the ``--workers`` factory;
- ``predict`` (router): /predict and /feedback; ``operations`` (router):
  /health, /metadata, /metrics; ``reports``: monitoring's reports under
  /reports/;
- ``deps``: the shared state (``ServingState``) and the dependencies on it,
  and the bounded strict body reader; ``schemas``: the request and response
  bodies (what /docs shows) and the strict JSON parse; ``errors``: the one
  error shape; ``middleware``: the token check and request metrics;
  ``metrics``: the Prometheus metrics;
- ``holder``: the loaded version and hot reload; ``workers``: the
  micro-batcher and the prediction log writer.

What it does:

- The model is loaded through ``Registry.load`` (hashes verified) and
  ``runtime.load_predictor`` with ``serve.truncation``: what was validated is
  what is served. Every prediction says how many tokens the model read and
  whether its text was cut to ``max_seq_len``, and the log records both.
- Dynamic micro-batching: concurrent requests are gathered into one model
  call of up to ``max_batch_size`` texts, waiting at most ``max_wait_ms``.
  Should the batching loop ever stop, /predict answers 503 at once and
  /health says why (503, ``status`` unavailable): no request hangs on it.
- Batch invariance: a version whose outputs depend on their batch (ONNX
  Runtime dynamic int8 computes activation scales over the whole batch) is
  served **per row**: requests are still gathered, but each text is its own
  model call, so an answer never depends on other users' traffic. Decided per
  loaded version: the registry manifest's ``serving.per_row`` (set by
  validate/deploy), else the model graph (``predictor.batch_dependent``).
- One bad request never fails another: texts are checked before they join a
  batch (a lone surrogate or an empty text gets 422 naming its index); a
  model call that still fails is retried request by request, and a log group
  commit that fails on a row is retried request by request, so only the
  request at fault gets the error.
- Every prediction is logged before it is answered (group commit: one
  SQLite transaction per batch of concurrent requests), so the log holds a
  row for every 200, and a log that cannot be written gives 503 rather than
  an unlogged answer, on every endpoint.
- Hot reload: the production alias is polled; a new version is loaded and
  verified beside the old one, then swapped in. Requests in flight finish on
  the model they started with; every response names the version that
  answered. A version that fails its hash check is refused and reported in
  /health while the old one keeps serving. With ``serve.registry: shared``
  the registry served is a local cache that a ``Follower`` keeps at the
  shared registry's production version (``served_registry``;
  ``shrinkflow.shared_registry``): copied, verified, then made visible.
  /metadata reports the integrity
  checked when the version was loaded (its files are hashed once per loaded
  version, not per request).
- /docs works offline: Swagger UI's assets are served by the app itself.

Importing this package imports FastAPI and pydantic, nothing heavier; the
model runtime is imported when a version is loaded.
"""

from shrinkflow.predictors import softmax  # noqa: F401  (the server answers with it; re-exported)
from shrinkflow.serving.app import TOKEN_ENV, app_from_env, create_app, make_app, served_registry
from shrinkflow.serving.holder import LoadedModel, ModelHolder
from shrinkflow.serving.metrics import ENDPOINTS, endpoint_label
from shrinkflow.serving.schemas import parse_json, text_problems
from shrinkflow.serving.workers import BatcherStopped, LogWriter, MicroBatcher, log_unavailable
from shrinkflow.status import model_labels  # noqa: F401  (flows/cli.py checks a version's labels with it)

__all__ = ["TOKEN_ENV", "ENDPOINTS", "BatcherStopped", "LoadedModel", "LogWriter", "MicroBatcher", "ModelHolder",
           "app_from_env", "create_app", "endpoint_label", "log_unavailable", "make_app", "model_labels",
           "parse_json", "served_registry", "softmax", "text_problems"]
