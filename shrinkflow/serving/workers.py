"""The two workers beside the request path: the micro-batcher (an asyncio
task that gathers concurrent requests into one model call) and the
prediction log writer (a thread that commits each group of concurrent
requests' rows in one SQLite transaction)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass, field

from shrinkflow.predlog import Prediction, PredictionLog, PredictionLogError
from shrinkflow.serving.holder import LoadedModel, ModelHolder
from shrinkflow.serving.schemas import printable

logger = logging.getLogger("shrinkflow.serve")


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class BatcherStopped(RuntimeError):
    """The batching loop is not running (it died, or the server is shutting
    down): no prediction can be made. The message says why."""


class MicroBatcher:
    """Gathers concurrent requests into one model call.

    ``submit(texts)`` returns ``(Output, LoadedModel)`` for exactly those
    texts (``runtime.Output``: logits, tokens_seen, truncated), computed by
    ``runtime.predict_served`` with the model's ``per_row``. When a gathered
    call raises, each request of it is retried alone, so only a request whose
    own texts fail gets the exception.

    When the batching loop ends for any reason (an error in it, a
    cancellation, ``stop``), every request waiting in it and every later
    ``submit`` raises BatcherStopped at once, and ``failure`` says why: no
    request waits forever on a loop that is gone."""

    def __init__(self, holder: ModelHolder, max_batch_size: int, max_wait_ms: float, on_batch=None,
                 concurrency: int = 2):
        self.holder, self.max_batch_size, self.max_wait_s = holder, max_batch_size, max_wait_ms / 1000.0
        self._slots = asyncio.Semaphore(concurrency)
        self._inflight: set[asyncio.Task] = set()
        self.on_batch = on_batch or (lambda n: None)
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._gathering: list[_Pending] = []   # taken from the queue, not yet handed to a model call
        self._stopping = False
        self.failure: str | None = None         # why the loop is not running (None while it runs)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._ended)

    async def stop(self) -> None:
        self._stopping = True
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, texts: list[str]):
        """``(Output, LoadedModel)`` for ``texts``. Raises BatcherStopped when
        the batching loop is not running, or what the model call raised."""
        if self._task is None or self._task.done():
            raise BatcherStopped(self.failure or "the batching loop is not running")
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Pending(texts, fut))
        return await fut

    def _ended(self, task: asyncio.Task) -> None:
        if self._stopping:
            reason = "the server is shutting down"
        elif task.cancelled():
            reason = "the batching loop was cancelled"
            logger.error("the micro-batcher stopped: %s; /predict answers 503 until the server restarts", reason)
        else:
            exc = task.exception()
            reason = f"the batching loop died ({type(exc).__name__}: {printable(exc, 200)})"
            logger.error("the micro-batcher stopped: %s; /predict answers 503 until the server restarts", reason,
                         exc_info=exc)
        self.failure = reason
        waiting, self._gathering = self._gathering, []
        while not self.queue.empty():
            waiting.append(self.queue.get_nowait())
        for p in waiting:
            if isinstance(p, _Pending):
                _settle(p.future, BatcherStopped(reason))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch = self._gathering = [first]
            size = len(first.texts)
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
            self._gathering = []
            task = loop.create_task(self._call(batch))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    @staticmethod
    def _predict(model: LoadedModel, texts: list[str]):
        from shrinkflow.predictors import predict_served

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
                               len(batch), type(exc).__name__, printable(exc, 200))
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
        from shrinkflow.predictors import Output

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
    in the cause chain; PostgreSQL down or unreachable: a PredictionLogError
    whose ``unavailable`` says so), so retrying rows one by one cannot help."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, sqlite3.OperationalError) or getattr(exc, "unavailable", False) is True:
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
