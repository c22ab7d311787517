"""What the endpoints depend on: the app's shared state (``ServingState``, on
``app.state.serving``) and the request bodies, read strictly.

Every dependency is ``async``: FastAPI runs a plain ``def`` dependency in a
thread pool, a cost a 3.5 ms model call on 2 cores cannot spare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from email.message import Message

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from shrinkflow.config import ServeParams
from shrinkflow.httpedge import TIMEOUT_SCOPE_KEY
from shrinkflow.predlog import PredictionLog
from shrinkflow.registry import Registry
from shrinkflow.serving.errors import ApiError
from shrinkflow.serving.holder import ModelHolder
from shrinkflow.serving.metrics import Metrics
from shrinkflow.serving.schemas import (DuplicateKey, FeedbackRequest, PredictRequest, parse_json,
                                        predict_request_model, printable)
from shrinkflow.serving.workers import LogWriter, MicroBatcher


@dataclass
class ServingState:
    """What one app shares between its requests. ``batcher`` exists while
    the app runs (created in the lifespan, on its event loop)."""

    params: ServeParams
    registry: Registry
    log: PredictionLog
    holder: ModelHolder
    writer: LogWriter
    metrics: Metrics
    batcher: MicroBatcher | None = None


async def serving_state(request: Request) -> ServingState:
    """Everything the app shares (/predict uses its params, batcher, log
    writer and metrics together)."""
    return request.app.state.serving


async def get_holder(request: Request) -> ModelHolder:
    """The holder of the version being served (``holder.current``)."""
    return request.app.state.serving.holder


async def get_log(request: Request) -> PredictionLog:
    """The prediction log (feedback is written to it directly)."""
    return request.app.state.serving.log


async def json_body(request: Request):
    """The body as strict JSON (``schemas.parse_json``), sent as JSON
    (Content-Type ``application/json`` or ``application/*+json``, UTF-8 and
    not compressed, else 415 unsupported_media_type, before anything is
    read: a ``charset`` other than utf-8 or us-ascii, a ``Content-Encoding`` other than
    identity), its size checked
    against serve.max_body_bytes before it is parsed, as the
    Content-Length says and again as the bytes arrive. Raises ApiError: 413
    body_too_large, 400 not_utf8 or not_json, 422 invalid_request (a
    duplicated key), 408 request_timeout (the edge's deadline passed
    mid-body), 499 client_disconnected."""
    params: ServeParams = request.app.state.serving.params
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
        # curl -d without -H sends application/x-www-form-urlencoded: say what to send
        sent = f"this request's: {printable(media, 100)!r}" if media else "this request has no Content-Type"
        raise ApiError(415, "unsupported_media_type",
                       f"send the body as JSON with the header 'Content-Type: application/json' ({sent})")
    # JSON is UTF-8 (RFC 8259): a body declared in another charset, or
    # compressed, would be read as UTF-8 bytes it is not; say so instead.
    header = Message()
    header["content-type"] = request.headers.get("content-type", "")
    charset = header.get_param("charset")   # unquoted, any case of the parameter's name
    charset = None if charset is None else str(charset).lower()
    # ASCII is UTF-8's first 128 code points: a body declared us-ascii is read as UTF-8 (a
    # mislabelled non-ASCII one then reads as the UTF-8 it is, or is refused as not UTF-8)
    if charset is not None and charset.replace("_", "-") not in ("utf-8", "utf8", "us-ascii", "ascii"):
        raise ApiError(415, "unsupported_media_type",
                       f"the body must be UTF-8 JSON (this request's charset: {printable(charset, 40)!r}); send it "
                       "as UTF-8, with no charset or charset=utf-8")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(415, "unsupported_media_type",
                       f"the body must not be compressed (this request's Content-Encoding: "
                       f"{printable(encoding, 40)!r}); send it as plain UTF-8 JSON")
    too_large = f"the body exceeds {params.max_body_bytes} bytes"
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > params.max_body_bytes):
        raise ApiError(413, "body_too_large", too_large)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > params.max_body_bytes:
                raise ApiError(413, "body_too_large", too_large)
            chunks.append(chunk)
    except ClientDisconnect:
        # Nobody will read this answer; it is counted, not logged as an error.
        if request.scope.get(TIMEOUT_SCOPE_KEY):
            raise ApiError(408, "request_timeout",
                           f"the body did not arrive within {params.request_timeout_s:g} s") from None
        raise ApiError(499, "client_disconnected", "the client closed the connection mid-body") from None
    try:
        text = b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "not_utf8", f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        return parse_json(text)
    except DuplicateKey as exc:
        raise ApiError(422, "invalid_request", f"duplicate key {printable(exc.args[0])!r} in the body") from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "not_json", f"the body is not JSON: {exc.msg} (character {exc.pos})") from None
    except RecursionError:
        raise ApiError(400, "not_json", "the body is nested too deeply to parse") from None
    except ValueError as exc:  # NaN/Infinity, an integer over 4300 digits
        raise ApiError(400, "not_json", f"the body is not JSON: {printable(exc, 200)}") from None


def validated(model: type[BaseModel], body):
    """``body`` validated by ``model``. Raises ApiError: 422 invalid_request
    naming each field's problem (the first 20), or 413 too_many_texts when
    ``texts`` is over its limit."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = [{"field": ".".join(printable(p) for p in e["loc"]) or "<body>", "problem": printable(e["msg"])}
                    for e in exc.errors()[:20]]
        too_many = any(e["type"] == "too_long" and e["loc"] == ("texts",) for e in exc.errors())
        raise ApiError(413 if too_many else 422, "too_many_texts" if too_many else "invalid_request",
                       "; ".join(f"{p['field']}: {p['problem']}" for p in problems), problems=problems) from None
    except RecursionError:
        raise ApiError(422, "invalid_request", "the body is nested too deeply to validate") from None


async def predict_request(request: Request, body=Depends(json_body)) -> PredictRequest:
    """The /predict body, at most serve.max_texts_per_request texts."""
    return validated(predict_request_model(request.app.state.serving.params.max_texts_per_request), body)


async def feedback_request(body=Depends(json_body)) -> FeedbackRequest:
    """The /feedback body."""
    return validated(FeedbackRequest, body)
