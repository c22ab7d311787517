"""``create_app``: wires the shared state, the lifespan (model, log writer,
micro-batcher, reload poller), the middleware and the routers."""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from shrinkflow.config import ServeParams
from shrinkflow.predlog import PredictionLog, prediction_log
from shrinkflow.registry import Registry

TOKEN_ENV = "SHRINKFLOW_API_TOKEN"

logger = logging.getLogger("shrinkflow.serve")


async def watch_production(state) -> None:
    """Every serve.reload_poll_s, load and swap in a new production version
    (``ModelHolder.poll``, off the event loop). A poll that fails in a way
    ``poll`` does not report is logged and the next one tried: hot reload
    never stops silently. Each swap is logged (INFO on ``shrinkflow.serve``),
    and each new refusal once (WARNING)."""
    reported = state.holder.refused
    while True:
        await asyncio.sleep(state.params.reload_poll_s)
        try:
            swapped = await asyncio.to_thread(state.holder.poll)
        except Exception:  # noqa: BLE001 - logged; the next poll may succeed
            logger.exception("checking the production alias failed; trying again in %g s",
                             state.params.reload_poll_s)
            continue
        if swapped:
            state.metrics.serving(state.holder.current.version)
            logger.info("now serving %s (production moved)", state.holder.current.version)
        elif state.holder.refused and state.holder.refused != reported:
            refused = state.holder.refused
            logger.warning("%s: %s; still serving %s",
                           f"not serving production {refused['version']}" if refused.get("version")
                           else "cannot read the production alias", refused["reason"], state.holder.current.version)
        reported = state.holder.refused


@asynccontextmanager
async def lifespan(app):
    """Open the log, load the production version (raising when there is
    none, or it fails its hash check), start the log writer, the batcher and
    the reload poller; on shutdown stop them, flushing the log."""
    from shrinkflow.httpedge import STATE_KEY, EdgeLimits
    from shrinkflow.serving.workers import MicroBatcher

    state = app.state.serving
    params: ServeParams = state.params
    state.log.open()
    # serve.registry: shared: the shared production into the cache first
    # (when the shared registry cannot be read, what the cache holds serves).
    await asyncio.to_thread(state.holder.follow)
    state.holder.load_production()
    state.metrics.serving(state.holder.current.version)
    state.writer.start()
    state.batcher = MicroBatcher(state.holder, params.max_batch_size if params.batching else 1,
                                 params.max_wait_ms if params.batching else 0.0, on_batch=state.metrics.batch.observe)
    state.batcher.start()
    poller = asyncio.get_running_loop().create_task(watch_production(state))
    try:
        # The lifespan state reaches every connection's protocol (uvicorn's
        # app_state): this is how EdgeProtocol gets its limits and reports.
        yield {STATE_KEY: EdgeLimits(params.max_header_bytes, params.max_headers, params.request_timeout_s,
                                     state.metrics.edge_reject)}
    finally:
        poller.cancel()
        await state.batcher.stop()
        state.writer.stop()   # every answered prediction was committed; flush the rest
        state.log.close()     # PostgreSQL: its connections (SQLite holds none)
        state.metrics.worker_stopped()


def create_app(registry: Registry, log: PredictionLog, params: ServeParams, reports_dir: Path | None = None,
               token: str | None = None, per_row: bool | None = None, follower=None):
    """The FastAPI app. Loads the production version at startup (refusing to
    start without one, or with one that fails its hash check).

    ``log``: a ``PredictionLog`` (SQLite) or ``PostgresPredictionLog``, as
    ``shrinkflow.predlog.prediction_log`` builds it from serve params.

    ``reports_dir``: monitoring's reports, served under /reports/ (None: not
    served); ``token``: the bearer token every path but /health requires
    (None: none); ``per_row``: None (default) decides per loaded version
    (see ``ModelHolder``), True or False forces it for every version
    (benchmarks). The lifespan state carries ``httpedge.EdgeLimits`` built
    from ``params``, which ``httpedge.EdgeProtocol`` enforces when uvicorn
    runs with it. /docs is Swagger UI from assets the server holds
    (fastapi-offline), so it works without a network. ``follower``: a
    ``shrinkflow.shared_registry.Follower`` whose cache is ``registry``, for
    a host that serves the shared registry's production (``ModelHolder``);
    None: ``registry`` alone."""
    from fastapi_offline import FastAPIOffline

    from shrinkflow.serving import operations, predict
    from shrinkflow.serving.deps import ServingState
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from shrinkflow.serving.errors import ApiError, api_error_handler, http_error_handler
    from shrinkflow.serving.holder import ModelHolder
    from shrinkflow.serving.metrics import Metrics
    from shrinkflow.serving.middleware import TokenAndMetrics
    from shrinkflow.serving.workers import LogWriter

    metrics = Metrics()
    app = FastAPIOffline(title="shrinkflow",
                         description="The registry's production model, compressed from a kept teacher.",
                         lifespan=lifespan)
    app.state.serving = ServingState(params=params, registry=registry, log=log,
                                     holder=ModelHolder(registry, params.threads, params.truncation, per_row,
                                                        follower),
                                     writer=LogWriter(log), metrics=metrics)
    app.add_middleware(TokenAndMetrics, metrics=metrics, token=token)
    app.add_exception_handler(ApiError, api_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.include_router(predict.router)
    app.include_router(operations.router)
    if reports_dir is not None:
        from shrinkflow.serving.reports import ReportFiles

        app.mount("/reports", ReportFiles(reports_dir), name="reports")
    return app


make_app = create_app   # the name flows/cli.py and bench/serving.py call


def log_to_stderr() -> None:
    """What the server logs (``shrinkflow.serve``: hot reloads, refusals, a
    stopped micro-batcher), timestamped on stderr; once per process. Called
    by `shrinkflow serve` and each of its workers, never at import."""
    serve_log = logging.getLogger("shrinkflow.serve")
    if not serve_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s shrinkflow.serve: %(message)s"))
        serve_log.addHandler(handler)
        serve_log.setLevel(logging.INFO)
        serve_log.propagate = False


def app_from_env():
    """uvicorn factory for `shrinkflow serve --workers N` (each worker builds
    its own app from the project named in SHRINKFLOW_PROJECT)."""
    from shrinkflow.config import load_params

    root = Path(os.environ["SHRINKFLOW_PROJECT"])
    log_to_stderr()
    stop_with_parent()
    params = load_params(root / "params.yaml")
    registry, follower = served_registry(root, params)
    return create_app(registry, prediction_log(root, params.serve), params.serve,
                      reports_dir=root / params.monitor.reports_dir, token=os.environ.get(TOKEN_ENV) or None,
                      follower=follower)


def stop_with_parent(poll_s: float = 1.0):
    """A ``--workers`` worker stops when the ``shrinkflow serve`` process
    that started it dies (``kill -9``): a daemon thread polls the parent's
    pid every ``poll_s`` seconds and, once this process has been handed to
    another parent, sends it SIGTERM, so uvicorn shuts it down gracefully
    (requests in flight answered, the prediction log flushed) instead of
    serving the port, unsupervised, until killed by hand. Returns the
    thread."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        logger.warning("the `shrinkflow serve` process that started this worker (pid %d) is gone: stopping",
                       parent)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="shrinkflow-parent-watch", daemon=True)
    thread.start()
    return thread


def served_registry(root: Path, params):
    """The registry a server in project ``root`` serves, and its follower:
    (``deploy.registry_dir``, None) by default; with ``serve.registry:
    shared``, (the cache at ``shared_registry.cache_dir``, a ``Follower``
    of ``shared_registry.url`` into it). Touches nothing."""
    if params.serve.registry != "shared":
        return Registry(root / params.deploy.registry_dir), None
    from shrinkflow.shared_registry import Follower, SharedRegistry

    cache = Registry(root / params.shared_registry.cache_dir)
    shared = SharedRegistry(params.shared_registry.url, params.shared_registry.connect_timeout_s)
    return cache, Follower(shared, cache)
