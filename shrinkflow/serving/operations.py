"""Operations: /health (liveness, open without the token), /metadata (the
served version's record) and /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from shrinkflow.serving.deps import ServingState, serving_state
from shrinkflow.serving.schemas import error_responses

router = APIRouter()


@router.get("/health", summary="Liveness, the loaded version and how it is served",
            responses={503: {"description": "The server cannot predict: `problem` says why"}})
async def health(state: ServingState = Depends(serving_state)):
    """``status`` ok (200) while the server can predict. When the
    micro-batcher has stopped, every /predict answers 503, and so does this,
    with ``status`` unavailable and the reason in ``problem``. ``refused``:
    a new production version the server would not load, and why."""
    cur = state.holder.current
    body = {"status": "ok" if cur else "loading", "model_version": cur.version if cur else None,
            "serving": cur.serving(state.params.truncation) if cur else None, "refused": state.holder.refused}
    if state.batcher is not None and state.batcher.failure:
        return JSONResponse({**body, "status": "unavailable", "problem": state.batcher.failure}, status_code=503)
    return body


@router.get("/metadata", summary="The served version: recipe, figures, gates, lineage, how it is served",
            responses=error_responses(401))
async def metadata(state: ServingState = Depends(serving_state)):
    """``shrinkflow status --json`` for the version being served, and how it
    is served. Its files were hashed once, when it was loaded into memory
    (``integrity``: verified), not on every request."""
    from shrinkflow.status import status_document

    cur = state.holder.current
    # A LoadedModel exists only once Registry.load verified every file's hash.
    doc = await asyncio.to_thread(status_document, state.registry, cur.version, "verified")
    return {**doc, "serving": cur.serving(state.params.truncation)}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses=error_responses(401))
async def prom(state: ServingState = Depends(serving_state)):
    from prometheus_client import CONTENT_TYPE_LATEST

    return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
