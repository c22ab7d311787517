"""Serving the registry's production version over HTTP (FastAPI).

``make_app(registry, log, params)`` builds the app and is testable without a
socket; ``shrinkflow serve`` only parses flags and runs it under uvicorn with
``shrinkflow.httpedge.EdgeProtocol`` (header limits and a request deadline).

- The model is loaded through ``Registry.load`` (hashes verified) and
  ``runtime.load_predictor`` with ``serve.truncation``: what was validated is
  what is served. Every prediction says how many tokens the model read and
  whether its text was cut to ``max_seq_len``, and the log records both.
- Dynamic micro-batching: concurrent requests are gathered into one model
  call of up to ``max_batch_size`` texts, waiting at most ``max_wait_ms``.
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
  /health while the old one keeps serving.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoint
# annotations (Request) at runtime, from inside make_app.

import asyncio
import hmac
import json
import logging
import os
import sqlite3
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
from shrinkflow.runtime import softmax  # noqa: F401  (the server answers with it; re-exported)

TOKEN_ENV = "SHRINKFLOW_API_TOKEN"
ENDPOINTS = ("/predict", "/feedback", "/health", "/metadata", "/metrics")

logger = logging.getLogger("shrinkflow.serve")


@dataclass(frozen=True)
class LoadedModel:
    """A loaded, verified version. ``per_row``: each text is its own model
    call (``per_row_source`` says what decided it: ``manifest``, ``model
    graph`` or ``server``); ``specials``: the tokens the model reads for an
    empty text ([CLS] and [SEP]: 2), so a text with no more has nothing to
    classify."""

    version: str
    predictor: object
    labels: tuple[str, ...]
    per_row: bool = False
    per_row_source: str = "model graph"
    specials: int = 0

    def serving(self, truncation: str) -> dict:
        """How this version is served, for /health and /metadata."""
        return {"per_row": self.per_row, "per_row_decided_by": self.per_row_source,
                "batching": "each text alone (batch-invariant)" if self.per_row else "batched",
                "truncation": truncation}


def text_problems(texts: list[str]) -> list[tuple[int, str]]:
    """``(index, problem)`` for each text that must not reach the model.

    A lone surrogate (half of a UTF-16 pair, e.g. an emoji cut in two, sent
    JSON-escaped as ``"\\ud800"``) is not Unicode text: the tokenizer raises
    TypeError on it, and before these checks one such text failed every
    request micro-batched with it (223 of 380 good requests in a burst of 400
    with 20 bad). An empty or whitespace-only text has nothing to classify
    (and a logged "" used to crash the monitor). Both get 422 with the index.
    """
    out = []
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as exc:
            out.append((i, f"not valid Unicode (lone surrogate U+{ord(t[exc.start]):04X} at character {exc.start})"))
            continue
        if not t or t.isspace():
            out.append((i, "empty or only whitespace: nothing to classify"))
    return out


def _printable(value, limit: int = 100) -> str:
    """``value`` as text that any JSON encoder and client can carry: a lone
    surrogate in a client's key becomes ``\\ud800`` literally; cut to
    ``limit`` characters."""
    s = str(value)
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s if len(s) <= limit else s[:limit] + "..."


class _DuplicateKey(ValueError):
    pass


def _object(pairs: list) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def parse_json(text: str):
    """Strict JSON: NaN and Infinity are refused (not JSON, RFC 8259), and so
    is an object with a duplicated key (``json`` would keep the last value
    silently). Raises ``_DuplicateKey`` (a ValueError), ValueError (not JSON,
    including an integer over Python's 4,300-digit limit) or RecursionError
    (nested too deeply for the decoder)."""
    return json.loads(text, parse_constant=_constant, object_pairs_hook=_object)


def model_labels(model_dir: Path, version: str = "") -> tuple[str, ...]:
    """The label names of a model directory, in class-id order, from its
    manifest (``shrinkflow_model.json``, hash-verified by Registry.load).
    Raises RegistryError when the manifest has no usable ``labels`` (a list
    of two or more distinct non-empty names): there is no default."""
    from shrinkflow.modeling import MANIFEST, read_manifest

    labels = read_manifest(Path(model_dir)).get("labels")
    if not isinstance(labels, list) or len(labels) < 2 or len(set(labels)) != len(labels) or \
            not all(isinstance(x, str) and x for x in labels):
        raise RegistryError(f"{'version ' + version + ' ' if version else ''}({Path(model_dir) / MANIFEST}): the "
                            f"manifest has no usable `labels` (a list of two or more distinct label names in "
                            f"class-id order; it has {labels!r}): re-deploy it with this shrinkflow")
    return tuple(labels)


class ModelHolder:
    """The model being served, and the reload logic around it.

    ``per_row``: None decides per loaded version (the registry manifest's
    ``serving.per_row``, else ``predictor.batch_dependent``); True or False
    forces it (benchmarks compare both)."""

    def __init__(self, registry: Registry, threads: int, truncation: str = "head", per_row: bool | None = None):
        self.registry, self.threads, self.truncation, self.per_row = registry, threads, truncation, per_row
        self.current: LoadedModel | None = None
        self.refused: dict | None = None      # {"version", "reason"} of a version refused on reload
        self._lock = threading.Lock()

    def _load(self, version: str) -> LoadedModel:
        from shrinkflow.runtime import load_predictor

        ref = self.registry.load(version)     # verifies every file's hash first
        labels = model_labels(ref.path, ref.version)
        predictor = load_predictor(ref.path, self.threads, spin=False, truncation=self.truncation)
        declared = (ref.manifest.get("serving") or {}).get("per_row")
        if self.per_row is not None:
            per_row, source = self.per_row, "server"
        elif declared is not None:
            per_row, source = bool(declared), "manifest"
        else:   # deployed before validate recorded it: ask the graph
            per_row, source = bool(getattr(predictor, "batch_dependent", False)), "model graph"
        encoder = getattr(predictor, "encoder", None)
        specials = int(encoder([""]).tokens_seen[0]) if encoder is not None else 0
        return LoadedModel(ref.version, predictor, labels, per_row, source, specials)

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


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Gathers concurrent requests into one model call.

    ``submit(texts)`` returns ``(Output, LoadedModel)`` for exactly those
    texts (``runtime.Output``: logits, tokens_seen, truncated), computed by
    ``runtime.predict_served`` with the model's ``per_row``. When a gathered
    call raises, each request of it is retried alone, so only a request whose
    own texts fail gets the exception."""

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

    async def submit(self, texts: list[str]):
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

    @staticmethod
    def _predict(model: LoadedModel, texts: list[str]):
        from shrinkflow.runtime import predict_served

        return predict_served(model.predictor, texts, per_row=model.per_row)

    async def _call(self, batch: list[_Pending]) -> None:
        model = self.holder.current  # one model for the whole batch
        texts = [t for p in batch for t in p.texts]
        try:
            try:
                out = await asyncio.to_thread(self._predict, model, texts)
            except Exception as exc:  # noqa: BLE001 - isolate the request at fault
                if len(batch) == 1:
                    _settle(batch[0].future, exc)
                    return
                logger.warning("a model call of %d requests failed (%s: %s); retrying each request alone",
                               len(batch), type(exc).__name__, _printable(exc, 200))
                for p in batch:
                    try:
                        own = await asyncio.to_thread(self._predict, model, p.texts)
                    except Exception as one:  # noqa: BLE001 - this request's own failure
                        _settle(p.future, one)
                    else:
                        _settle(p.future, None, (own, model))
                return
        finally:
            self._slots.release()
        self.on_batch(len(texts))
        from shrinkflow.runtime import Output

        start = 0
        for p in batch:
            n = len(p.texts)
            part = Output(out.logits[start:start + n], out.tokens_seen[start:start + n],
                          out.truncated[start:start + n])
            _settle(p.future, None, (part, model))
            start += n


def log_unavailable(exc: BaseException) -> bool:
    """True when a failed log write failed for every row alike (the database
    locked, full, read-only, an I/O error: sqlite3.OperationalError anywhere
    in the cause chain), so retrying rows one by one cannot help."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.OperationalError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class LogWriter:
    """Writes predictions off the event loop, one transaction per group of
    concurrent requests; each request waits for its own rows' commit.

    When a group's transaction fails for a reason that may be one row's
    (anything but ``log_unavailable``), each request's rows are retried in
    their own transaction, so one bad row never fails another request."""

    def __init__(self, log: PredictionLog):
        self.log = log
        self._items: list[tuple[list[Prediction], asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    async def write(self, rows: list[Prediction]) -> None:
        """Returns once ``rows`` are committed; raises the log's error when
        they cannot be (PredictionLogError, or whatever the log raised)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            if self._stopping:
                raise PredictionLogError("the server is shutting down")
            self._items.append((rows, fut, loop))
            self._cond.notify()
        await fut

    def _commit(self, items) -> list:
        try:
            self.log.append([r for rows, _, _ in items for r in rows])
            return [None] * len(items)
        except Exception as exc:  # noqa: BLE001 - reported to the waiting requests
            if len(items) == 1 or log_unavailable(exc):
                return [exc] * len(items)
        errors = []
        for rows, _, _ in items:
            try:
                self.log.append(rows)
                errors.append(None)
            except Exception as exc:  # noqa: BLE001 - this request's rows alone
                errors.append(exc)
        return errors

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                items, self._items = self._items, []
                if not items and self._stopping:
                    return
            for (_, fut, loop), error in zip(items, self._commit(items)):
                try:
                    loop.call_soon_threadsafe(_settle, fut, error)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    pass

    def stop(self) -> None:
        """Flush what is pending, then stop (called on shutdown)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=60)


def _settle(fut: asyncio.Future, error: BaseException | None, result=None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(result)
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


def endpoint_label(path: str | None) -> str:
    """The /metrics label of a request path: one of ENDPOINTS, /reports, or
    "other" (a label per unknown path would let clients grow the metrics)."""
    if path is None:
        return "other"
    return path if path in ENDPOINTS else "/reports" if path.startswith("/reports") else "other"


def make_app(registry: Registry, log: PredictionLog, params: ServeParams, reports_dir: Path | None = None,
             token: str | None = None, per_row: bool | None = None):
    """The FastAPI app. Loads the production version at startup (refusing to
    start without one, or with one that fails its hash check).

    ``per_row``: None (default) decides per loaded version (see
    ``ModelHolder``); True or False forces it for every version (benchmarks).
    The lifespan state carries ``httpedge.EdgeLimits`` built from ``params``,
    which ``httpedge.EdgeProtocol`` enforces when uvicorn runs with it."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse, Response
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
    from starlette.requests import ClientDisconnect

    from shrinkflow.httpedge import STATE_KEY, TIMEOUT_SCOPE_KEY, EdgeLimits

    holder = ModelHolder(registry, params.threads, params.truncation, per_row)
    metrics = _Metrics()
    writer = LogWriter(log)
    state: dict = {}

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        texts: list[str] = Field(min_length=1, max_length=params.max_texts_per_request)

    class FeedbackRequest(BaseModel):
        # strict: a label of true is not the label 1, nor 1.0.
        model_config = ConfigDict(extra="forbid", strict=True)
        # The server's ids are uuid4 hex; printable ASCII keeps NUL, control
        # characters and lone surrogates out of SQLite and of the answer.
        prediction_id: str = Field(min_length=1, max_length=100, pattern=r"^[\x21-\x7e]+$")
        label: int | str

    def error(status: int, kind: str, message: str, endpoint: str, **extra) -> Response:
        metrics.errors.labels(endpoint, kind).inc()
        # json.dumps escapes every non-ASCII character, so no text a client
        # sent (a lone surrogate in a key name) can break the answer itself.
        return Response(json.dumps({"error": kind, "detail": message, **extra}), status_code=status,
                        media_type="application/json")

    def on_edge_reject(status: int, kind: str, path: str | None) -> None:
        endpoint = endpoint_label(path)
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.errors.labels(endpoint, kind).inc()

    async def read_json(request: Request, endpoint: str):
        """The body as JSON, with its size checked before it is parsed."""
        too_large = f"the body exceeds {params.max_body_bytes} bytes"
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > params.max_body_bytes):
            return None, error(413, "body_too_large", too_large, endpoint)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > params.max_body_bytes:
                    return None, error(413, "body_too_large", too_large, endpoint)
                chunks.append(chunk)
        except ClientDisconnect:
            # Nobody will read this answer; it is counted, not logged as an error.
            if request.scope.get(TIMEOUT_SCOPE_KEY):
                return None, error(408, "request_timeout",
                                   f"the body did not arrive within {params.request_timeout_s:g} s", endpoint)
            return None, error(499, "client_disconnected", "the client closed the connection mid-body", endpoint)
        try:
            text = b"".join(chunks).decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, error(400, "not_utf8", f"the body is not valid UTF-8 (byte {exc.start})", endpoint)
        try:
            return parse_json(text), None
        except _DuplicateKey as exc:
            return None, error(422, "invalid_request", f"duplicate key {_printable(exc.args[0])!r} in the body",
                               endpoint)
        except json.JSONDecodeError as exc:
            return None, error(400, "not_json", f"the body is not JSON: {exc.msg} at character {exc.pos}", endpoint)
        except RecursionError:
            return None, error(400, "not_json", "the body is nested too deeply to parse", endpoint)
        except ValueError as exc:  # NaN/Infinity, an integer over 4300 digits
            return None, error(400, "not_json", f"the body is not JSON: {_printable(exc, 200)}", endpoint)

    def validation_error(exc: ValidationError, endpoint: str) -> Response:
        problems = [{"field": ".".join(_printable(p) for p in e["loc"]) or "<body>", "problem": _printable(e["msg"])}
                    for e in exc.errors()[:20]]
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
        except RecursionError:
            return None, error(422, "invalid_request", "the body is nested too deeply to validate", endpoint)

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
            # The lifespan state reaches every connection's protocol (uvicorn's
            # app_state): this is how EdgeProtocol gets its limits and reports.
            yield {STATE_KEY: EdgeLimits(params.max_header_bytes, params.max_headers, params.request_timeout_s,
                                         on_edge_reject)}
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
            endpoint = endpoint_label(path)
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
                # A request the edge timed out mid-body is a 408, whatever the
                # app went on to answer into the closed connection.
                code = 408 if scope.get(TIMEOUT_SCOPE_KEY) else status[0] if status else 500
                metrics.requests.labels(endpoint, str(code)).inc()
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
        bad = text_problems(req.texts)
        if bad:  # checked before joining a batch: a bad text never reaches another request's model call
            return error(422, "invalid_text", "; ".join(f"texts[{i}]: {p}" for i, p in bad), "/predict",
                         problems=[{"index": i, "problem": p} for i, p in bad])
        try:
            out, model = await state["batcher"].submit(req.texts)
        except Exception as exc:  # noqa: BLE001 - this request's texts alone failed (others were retried apart)
            logger.error("prediction failed for a request of %d text(s): %s: %s", len(req.texts),
                         type(exc).__name__, _printable(exc, 200))
            return error(500, "prediction_failed", f"the model could not predict these texts "
                         f"({type(exc).__name__}: {_printable(exc, 200)})", "/predict")
        empty = [i for i, n in enumerate(out.tokens_seen) if int(n) <= model.specials]
        if empty:
            return error(422, "invalid_text", "; ".join(
                f"texts[{i}]: nothing to classify (the model reads no token of it: only control or formatting "
                "characters)" for i in empty), "/predict",
                problems=[{"index": i, "problem": "nothing to classify"} for i in empty])
        probs = softmax(np.asarray(out.logits, dtype=np.float64))
        latency_ms = (time.perf_counter() - t0) * 1000.0
        now = utc_now()
        rows = [Prediction(uuid.uuid4().hex, now, model.version, text, p.tolist(), int(p.argmax()), latency_ms,
                           tokens_seen=int(n), truncated=bool(cut), labels=model.labels)
                for text, p, n, cut in zip(req.texts, probs, out.tokens_seen, out.truncated)]
        try:
            await writer.write(rows)
        except Exception as exc:  # noqa: BLE001 - never answer without logging
            return error(503, "log_unavailable", f"the prediction log cannot be written ({_printable(exc, 300)}); "
                         "not answering without logging", "/predict")
        metrics.predictions.inc(len(rows))
        # Serialised here rather than returned as a dict: FastAPI's
        # jsonable_encoder walks every value and costs more than the JSON itself.
        return Response(json.dumps({"model_version": model.version, "predictions": [
            {"prediction_id": r.prediction_id, "label": model.labels[r.label], "label_id": r.label,
             "probabilities": dict(zip(model.labels, (round(float(x), 6) for x in r.probabilities))),
             "truncated": r.truncated, "tokens_seen": r.tokens_seen,
             "model_version": model.version} for r in rows]}), media_type="application/json")

    @app.post("/feedback", summary="Store the true label of a prediction")
    async def feedback(request: Request):
        req, problem = await parse(request, FeedbackRequest, "/feedback")
        if problem is not None:
            return problem
        labels = holder.current.labels
        label = req.label
        # A name is stored as its id among the labels of the version that
        # answered the prediction (the log resolves it against the row's own
        # names); an index is an id in those labels.
        if isinstance(label, str):
            if label not in labels:
                return error(422, "invalid_request", f"unknown label {_printable(label)!r}: the label must be one "
                             f"of {list(labels)} or its index", "/feedback", labels=list(labels))
        elif not 0 <= label < len(labels):
            return error(422, "invalid_request", f"label index must be in 0..{len(labels) - 1} (the labels are "
                         f"{list(labels)})", "/feedback", labels=list(labels))
        try:
            replaced = await asyncio.to_thread(log.add_feedback, req.prediction_id, label, None, labels)
        except KeyError:
            return error(404, "unknown_prediction", f"no prediction {req.prediction_id!r}", "/feedback")
        except ValueError as exc:  # a version with other labels answered this prediction
            return error(422, "invalid_request", _printable(exc, 300), "/feedback", labels=list(labels))
        except Exception as exc:  # noqa: BLE001 - every log failure is a 503 with its reason, never a 500
            return error(503, "log_unavailable", f"the feedback cannot be stored ({_printable(exc, 300)})",
                         "/feedback")
        return Response(json.dumps({"prediction_id": req.prediction_id,
                                    "label": label if isinstance(label, str) else labels[label],
                                    "replaced": replaced}), media_type="application/json")

    @app.get("/health", summary="Liveness, the loaded version and how it is served")
    async def health():
        cur = holder.current
        return {"status": "ok" if cur else "loading", "model_version": cur.version if cur else None,
                "serving": cur.serving(params.truncation) if cur else None, "refused": holder.refused}

    @app.get("/metadata", summary="The served version: recipe, figures, gates, lineage, how it is served")
    async def metadata():
        from shrinkflow.status import status_document

        cur = holder.current
        doc = await asyncio.to_thread(status_document, registry, cur.version)
        return {**doc, "serving": cur.serving(params.truncation)}

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
