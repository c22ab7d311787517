"""Serving the registry's production version over HTTP (FastAPI).

``make_app(registry, log, params)`` builds the app and is testable without a
socket; ``shrinkflow serve`` only parses flags and runs it under uvicorn.

- The model is loaded through ``Registry.load`` (hashes verified) and
  ``runtime.load_predictor``: what was validated is what is served.
- Dynamic micro-batching: concurrent requests are gathered into one model
  call of up to ``max_batch_size`` texts, waiting at most ``max_wait_ms``.
- Every prediction is logged before it is answered (group commit: one
  SQLite transaction per batch of concurrent requests), so the log holds a
  row for every 200, and a log that cannot be written gives 503 rather than
  an unlogged answer.
- Hot reload: the production alias is polled; a new version is loaded and
  verified beside the old one, then swapped in. Requests in flight finish on
  the model they started with; every response names the version that
  answered. A version that fails its hash check is refused and reported in
  /health while the old one keeps serving.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint
# annotations (Request) at runtime, from inside make_app.

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shrinkflow.config import ServeParams
from shrinkflow.errors import IntegrityError, RegistryError
from shrinkflow.predlog import Prediction, PredictionLog, PredictionLogError, utc_now
from shrinkflow.registry import Registry

TOKEN_ENV = "SHRINKFLOW_API_TOKEN"
ENDPOINTS = ("/predict", "/feedback", "/health", "/metadata", "/metrics")


@dataclass(frozen=True)
class LoadedModel:
    version: str
    predictor: object
    labels: tuple[str, ...]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ModelHolder:
    """The model being served, and the reload logic around it."""

    def __init__(self, registry: Registry, threads: int):
        self.registry, self.threads = registry, threads
        self.current: LoadedModel | None = None
        self.refused: dict | None = None      # {"version", "reason"} of a version refused on reload
        self._lock = threading.Lock()

    def _load(self, version: str) -> LoadedModel:
        from shrinkflow.runtime import load_predictor

        ref = self.registry.load(version)     # verifies every file's hash first
        labels = tuple(ref.manifest.get("labels") or ("negative", "positive"))
        return LoadedModel(ref.version, load_predictor(ref.path, self.threads, spin=False), labels)

    def load_production(self) -> LoadedModel:
        version = self.registry.alias()
        if version is None:
            raise RegistryError(f"nothing is deployed in {self.registry.root}: run `shrinkflow run` first")
        self.current = self._load(version)
        return self.current

    def poll(self) -> bool:
        """Load and swap in a new production version. True if swapped."""
        with self._lock:
            try:
                version = self.registry.alias()
            except RegistryError as exc:
                self.refused = {"version": None, "reason": str(exc)}
                return False
            if version is None or (self.current and version == self.current.version):
                return False
            if self.refused and self.refused.get("version") == version:
                return False
            try:
                loaded = self._load(version)
            except (IntegrityError, RegistryError, FileNotFoundError, ValueError) as exc:
                self.refused = {"version": version, "reason": str(exc)}
                return False
            self.current, self.refused = loaded, None
            return True


def predict_by_length(predictor, texts: list[str], chunk: int = 8) -> np.ndarray:
    """Logits for a gathered batch, computed in chunks of similar length.

    A batch pads every text to its longest; concurrent requests have random
    lengths, so one padded call of 32 does ~2.5x the work of the same texts
    unpadded (measured: it served fewer requests/s than no batching at all).
    Sorting by length and running chunks of ``chunk`` keeps the padding small
    while still sharing each call's overhead."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = None
    for start in range(0, len(texts), chunk):
        idx = order[start:start + chunk]
        logits = predictor.predict_logits([texts[i] for i in idx])
        if out is None:
            out = np.empty((len(texts), logits.shape[1]), dtype=logits.dtype)
        out[idx] = logits
    return out


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Gathers concurrent requests into one model call."""

    def __init__(self, holder: ModelHolder, max_batch_size: int, max_wait_ms: float, on_batch=None,
                 concurrency: int = 2):
        self.holder, self.max_batch_size, self.max_wait_s = holder, max_batch_size, max_wait_ms / 1000.0
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task] = set()
        self.on_batch = on_batch or (lambda n: None)
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, texts: list[str]) -> tuple[np.ndarray, LoadedModel]:
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Pending(texts, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch, size = [first], len(first.texts)
            deadline = loop.time() + self.max_wait_s
            while size < self.max_batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                batch.append(nxt)
                size += len(nxt.texts)
            # At most `concurrency` model calls in flight: while one batch runs,
            # the next one gathers (and, on 2 cores, can run beside it).
            await self._slots.acquire()
            task = asyncio.get_running_loop().create_task(self._call(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _call(self, batch: list[_Pending]) -> None:
        model = self.holder.current  # one model for the whole batch
        texts = [t for p in batch for t in p.texts]
        try:
            logits = await asyncio.to_thread(predict_by_length, model.predictor, texts)
        except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        finally:
            self._slots.release()
        self.on_batch(len(texts))
        start = 0
        for p in batch:
            n = len(p.texts)
            if not p.future.done():
                p.future.set_result((logits[start:start + n], model))
            start += n


class LogWriter:
    """Writes predictions off the event loop, one transaction per group of
    concurrent requests; each request waits for its own rows' commit."""

    def __init__(self, log: PredictionLog):
        self.log = log
        self._items: list[tuple[list[Prediction], asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def write(self, rows: list[Prediction]) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._stopping:
                raise PredictionLogError("the server is shutting down")
            self._items.append((rows, fut, loop))
            self._cond.notify()
        await fut

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                items, self._items = self._items, []
                if not items and self._stopping:
                    return
            error = None
            try:
                self.log.append([r for rows, _, _ in items for r in rows])
            except Exception as exc:  # noqa: BLE001 - reported to every waiting request
                error = exc
            for _, fut, loop in items:
                loop.call_soon_threadsafe(_settle, fut, error)

    def stop(self) -> None:
        """Flush what is pending, then stop (called on shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=60)


def _settle(fut: asyncio.Future, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


class _Metrics:
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


def make_app(registry: Registry, log: PredictionLog, params: ServeParams, reports_dir: Path | None = None,
             token: str | None = None):
    """The FastAPI app. Loads the production version at startup (refusing to
    start without one, or with one that fails its hash check)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    holder = ModelHolder(registry, params.threads)
    metrics = _Metrics()
    writer = LogWriter(log)
    state: dict = {}

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        texts: list[str] = Field(min_length=1, max_length=params.max_texts_per_request)

    class FeedbackRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prediction_id: str = Field(min_length=1, max_length=100)
        label: int | str

    def error(status: int, kind: str, message: str, endpoint: str, **extra) -> JSONResponse:
        metrics.errors.labels(endpoint, kind).inc()
        return JSONResponse({"error": kind, "detail": message, **extra}, status_code=status)

    async def read_json(request: Request, endpoint: str):
        """The body as JSON, with its size checked before it is parsed."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > params.max_body_bytes):
            return None, error(413, "body_too_large", f"the body exceeds {params.max_body_bytes} bytes", endpoint)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > params.max_body_bytes:
                return None, error(413, "body_too_large", f"the body exceeds {params.max_body_bytes} bytes",
                                   endpoint)
            chunks.append(chunk)
        try:
            text = b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError:
            return None, error(400, "not_utf8", "the body is not valid UTF-8", endpoint)
        try:
            return json.loads(text), None
        except json.JSONDecodeError as exc:
            return None, error(400, "not_json", f"the body is not JSON: {exc.msg}", endpoint)

    def validation_error(exc: ValidationError, endpoint: str) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in e["loc"]) or "<body>", "problem": e["msg"]}
                    for e in exc.errors()]
        too_many = any(e["type"] == "too_long" and e["loc"] == ("texts",) for e in exc.errors())
        return error(413 if too_many else 422, "too_many_texts" if too_many else "invalid_request",
                     "; ".join(f"{p['field']}: {p['problem']}" for p in problems), endpoint, problems=problems)

    async def parse(request: Request, model, endpoint: str):
        """(validated request, None) or (None, the 4xx response)."""
        body, problem = await read_json(request, endpoint)
        if problem is not None:
            return None, problem
        try:
            return model.model_validate(body), None
        except ValidationError as exc:
            return None, validation_error(exc, endpoint)

    async def reload_loop():
        while True:
            await asyncio.sleep(params.reload_poll_s)
            swapped = await asyncio.to_thread(holder.poll)
            if swapped:
                metrics.version.clear()
                metrics.version.labels(holder.current.version).set(1)

    @asynccontextmanager
    async def lifespan(app):
        log.open()
        holder.load_production()
        metrics.version.labels(holder.current.version).set(1)
        writer.start()
        batcher = MicroBatcher(holder, params.max_batch_size if params.batching else 1,
                               params.max_wait_ms if params.batching else 0.0,
                               on_batch=metrics.batch.observe)
        batcher.start()
        state["batcher"] = batcher
        poller = asyncio.get_running_loop().create_task(reload_loop())
        try:
            yield
        finally:
            poller.cancel()
            await batcher.stop()
            writer.stop()   # every answered prediction was committed; flush the rest

    app = FastAPI(title="shrinkflow", description="The registry's production model, compressed from a kept teacher.",
                  lifespan=lifespan)

    class AuthAndCount:
        """Token check and request metrics as plain ASGI middleware: Starlette's
        BaseHTTPMiddleware (``@app.middleware``) wraps every request in extra
        tasks and streams, CPU that a 3.5 ms model call on 2 cores cannot spare."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            t0 = time.perf_counter()
            path = scope["path"]
            endpoint = path if path in ENDPOINTS else "/reports" if path.startswith("/reports") else "other"
            if token and path != "/health":
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {token}".encode()):
                    metrics.requests.labels(endpoint, "401").inc()
                    return await error(401, "unauthorized", "missing or wrong bearer token", endpoint)(
                        scope, receive, send)
            status = []

            async def send_and_count(message):
                if message["type"] == "http.response.start":
                    status.append(message["status"])
                await send(message)

            try:
                await self.app(scope, receive, send_and_count)
            finally:
                metrics.requests.labels(endpoint, str(status[0] if status else 500)).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    app.add_middleware(AuthAndCount)

    @app.post("/predict", summary="Label texts with the production model")
    async def predict(request: Request):
        t0 = time.perf_counter()
        req, problem = await parse(request, PredictRequest, "/predict")
        if problem is not None:
            return problem
        long = [i for i, t in enumerate(req.texts) if len(t) > params.max_chars_per_text]
        if long:
            return error(413, "text_too_long", f"text(s) {long} exceed {params.max_chars_per_text} characters",
                         "/predict")
        logits, model = await state["batcher"].submit(req.texts)
        probs = softmax(np.asarray(logits, dtype=np.float64))
        latency_ms = (time.perf_counter() - t0) * 1000.0
        now = utc_now()
        rows = [Prediction(uuid.uuid4().hex, now, model.version, text, p.tolist(), int(p.argmax()), latency_ms)
                for text, p in zip(req.texts, probs)]
        try:
            await writer.write(rows)
        except Exception as exc:  # noqa: BLE001 - never answer without logging
            return error(503, "log_unavailable", f"the prediction log cannot be written ({exc}); "
                         "not answering without logging", "/predict")
        metrics.predictions.inc(len(rows))
        # Serialised here rather than returned as a dict: FastAPI's
        # jsonable_encoder walks every value and costs more than the JSON itself.
        return Response(json.dumps({"model_version": model.version, "predictions": [
            {"prediction_id": r.prediction_id, "label": model.labels[r.label], "label_id": r.label,
             "probabilities": dict(zip(model.labels, (round(float(x), 6) for x in r.probabilities))),
             "model_version": model.version} for r in rows]}), media_type="application/json")

    @app.post("/feedback", summary="Store the true label of a prediction")
    async def feedback(request: Request):
        req, problem = await parse(request, FeedbackRequest, "/feedback")
        if problem is not None:
            return problem
        labels = holder.current.labels
        label = req.label
        if isinstance(label, str):
            if label not in labels:
                return error(422, "invalid_request", f"label must be one of {list(labels)} or its index",
                             "/feedback")
            label = labels.index(label)
        elif not 0 <= label < len(labels):
            return error(422, "invalid_request", f"label index must be in 0..{len(labels) - 1}", "/feedback")
        try:
            replaced = await asyncio.to_thread(log.add_feedback, req.prediction_id, label)
        except KeyError:
            return error(404, "unknown_prediction", f"no prediction {req.prediction_id!r}", "/feedback")
        except PredictionLogError as exc:
            return error(503, "log_unavailable", str(exc), "/feedback")
        return {"prediction_id": req.prediction_id, "label": labels[label], "replaced": replaced}

    @app.get("/health", summary="Liveness and the loaded version")
    async def health():
        cur = holder.current
        return {"status": "ok" if cur else "loading", "model_version": cur.version if cur else None,
                "refused": holder.refused}

    @app.get("/metadata", summary="The served version: recipe, figures, gates, lineage")
    async def metadata():
        from shrinkflow.status import status_document

        return await asyncio.to_thread(status_document, registry, holder.current.version)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    if reports_dir is not None:
        # Monitoring's Evidently reports, read-only, under the same token rule.
        from starlette.exceptions import HTTPException
        from starlette.staticfiles import StaticFiles

        reports = Path(reports_dir)

        class ReportFiles(StaticFiles):
            """404 until the first monitor run creates the directory, rather than
            a 500 or a server that refuses to start."""

            async def check_config(self) -> None:
                if reports.is_dir():
                    await super().check_config()

            async def get_response(self, path, scope):
                if not reports.is_dir():
                    raise HTTPException(status_code=404, detail="no monitoring reports yet: run `shrinkflow monitor`")
                return await super().get_response(path, scope)

        app.mount("/reports", ReportFiles(directory=str(reports), html=True, check_dir=False), name="reports")

    app.state.holder, app.state.log = holder, log
    return app


def app_from_env():
    """uvicorn factory for `shrinkflow serve --workers N` (each worker builds
    its own app from the project named in SHRINKFLOW_PROJECT)."""
    from shrinkflow.config import load_params

    root = Path(os.environ["SHRINKFLOW_PROJECT"])
    params = load_params(root / "params.yaml")
    return make_app(Registry(root / params.deploy.registry_dir), PredictionLog(root / params.serve.log_path),
                    params.serve, reports_dir=root / params.monitor.reports_dir,
                    token=os.environ.get(TOKEN_ENV) or None)
