"""The prediction API: /predict labels texts, /feedback stores a true label.

Every prediction is logged before it is answered; a log that cannot be
written gives 503 rather than an unlogged answer. Answers are serialised
here (``Response(json.dumps(...))``) rather than returned as dicts: FastAPI's
jsonable_encoder walks every value and costs more than the JSON itself. The
response models document them in /docs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import Response

from shrinkflow.predlog import Prediction, PredictionLog, utc_now
from shrinkflow.predictors import softmax
from shrinkflow.serving.deps import (ServingState, feedback_request, get_holder, get_log, predict_request,
                                     serving_state)
from shrinkflow.serving.errors import ApiError
from shrinkflow.serving.holder import ModelHolder
from shrinkflow.serving.schemas import (FeedbackRequest, FeedbackResponse, PredictRequest, PredictResponse,
                                        error_responses, printable, request_body, text_problems)
from shrinkflow.serving.workers import BatcherStopped

logger = logging.getLogger("shrinkflow.serve")
router = APIRouter()


async def started() -> float:
    """When the endpoint started (its first dependency, so the logged
    latency includes reading and validating the body)."""
    return time.perf_counter()


@router.post("/predict", summary="Label texts with the production model", response_model=PredictResponse,
             openapi_extra=request_body(PredictRequest),
             responses=error_responses(400, 401, 408, 413, 415, 422, 500, 503))
async def predict(t0: float = Depends(started), req: PredictRequest = Depends(predict_request),
                  state: ServingState = Depends(serving_state)):
    """One prediction per text, by the version being served (named in the
    answer), logged before it is answered. 413 for too many or too long
    texts or too large a body; 422 for a text with nothing to classify
    (naming its index); 503 when the log cannot be written or the batcher
    has stopped."""
    params = state.params
    long = [i for i, t in enumerate(req.texts) if len(t) > params.max_chars_per_text]
    if long:
        raise ApiError(413, "text_too_long", f"text(s) {long} exceed {params.max_chars_per_text} characters")
    bad = text_problems(req.texts)
    if bad:  # checked before joining a batch: a bad text never reaches another request's model call
        raise ApiError(422, "invalid_text", "; ".join(f"texts[{i}]: {p}" for i, p in bad),
                       problems=[{"index": i, "problem": p} for i, p in bad])
    try:
        out, model = await state.batcher.submit(req.texts)
    except BatcherStopped as exc:
        raise ApiError(503, "batcher_stopped", f"this server cannot predict: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - this request's texts alone failed (others were retried apart)
        logger.error("prediction failed for a request of %d text(s): %s: %s", len(req.texts),
                     type(exc).__name__, printable(exc, 200))
        raise ApiError(500, "prediction_failed", f"the model could not predict these texts "
                       f"({type(exc).__name__}: {printable(exc, 200)})") from None
    empty = [i for i, n in enumerate(out.tokens_seen) if int(n) <= model.specials]
    if empty:
        raise ApiError(422, "invalid_text", "; ".join(
            f"texts[{i}]: nothing to classify (the model reads no token of it: only control or formatting "
            "characters)" for i in empty), problems=[{"index": i, "problem": "nothing to classify"} for i in empty])
    probs = softmax(np.asarray(out.logits, dtype=np.float64))
    latency_ms = (time.perf_counter() - t0) * 1000.0
    now = utc_now()
    rows = [Prediction(uuid.uuid4().hex, now, model.version, text, p.tolist(), int(p.argmax()), latency_ms,
                       tokens_seen=int(n), truncated=bool(cut), labels=model.labels)
            for text, p, n, cut in zip(req.texts, probs, out.tokens_seen, out.truncated)]
    try:
        await state.writer.write(rows)
    except Exception as exc:  # noqa: BLE001 - never answer without logging
        raise ApiError(503, "log_unavailable", f"the prediction log cannot be written ({printable(exc, 300)}); "
                       "not answering without logging") from None
    state.metrics.predictions.inc(len(rows))
    return Response(json.dumps({"model_version": model.version, "predictions": [
        {"prediction_id": r.prediction_id, "label": model.labels[r.label], "label_id": r.label,
         "probabilities": dict(zip(model.labels, (round(float(x), 6) for x in r.probabilities))),
         "truncated": r.truncated, "tokens_seen": r.tokens_seen,
         "model_version": model.version} for r in rows]}), media_type="application/json")


@router.post("/feedback", summary="Store the true label of a prediction", response_model=FeedbackResponse,
             openapi_extra=request_body(FeedbackRequest), responses=error_responses(400, 401, 404, 413, 415, 422, 503))
async def feedback(req: FeedbackRequest = Depends(feedback_request), holder: ModelHolder = Depends(get_holder),
                   log: PredictionLog = Depends(get_log)):
    """The label by name or by class id, among the labels of the version
    that answered the prediction (the served labels for a row logged
    before rows kept their own); feedback given again replaces the earlier
    one (``replaced``). 404 for an unknown prediction id; 422 for a label
    that version does not have, or a class id where its label names are
    themselves integers (send the name as a string)."""
    labels = holder.current.labels
    label = req.label
    # Resolved by the log, inside its transaction, against the row's own
    # names (shrinkflow.predlog.feedback_class_id): a row answered by an
    # earlier version with other labels is judged by that version's.
    try:
        stored = await asyncio.to_thread(log.store_feedback, req.prediction_id, label, None, labels)
    except KeyError:
        raise ApiError(404, "unknown_prediction", f"no prediction {req.prediction_id!r}") from None
    except ValueError as exc:  # not a label of the version that answered, or an ambiguous id
        # ``labels``: the answering version's names (FeedbackLabelError), what the client must pick from
        raise ApiError(422, "invalid_request", printable(exc, 300),
                       labels=list(getattr(exc, "labels", None) or labels)) from None
    except Exception as exc:  # noqa: BLE001 - every log failure is a 503 with its reason, never a 500
        raise ApiError(503, "log_unavailable", f"the feedback cannot be stored ({printable(exc, 300)})") from None
    return Response(json.dumps({"prediction_id": req.prediction_id,
                                "label": stored.label if stored.label is not None else str(label),
                                "replaced": stored.replaced}), media_type="application/json")
