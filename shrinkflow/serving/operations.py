"""Operations: /health (liveness, open without the token), /metadata (the
served version's record) and /metrics (Prometheus)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse

from shrinkflow.errors import RegistryError
from shrinkflow.serving.deps import ServingState, serving_state
from shrinkflow.serving.errors import ApiError
from shrinkflow.serving.schemas import Metadata, error_responses
from shrinkflow.status import status_report

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
            "serving": cur.serving(state.params.truncation).model_dump() if cur else None,
            "refused": state.holder.refused}
    if state.batcher is not None and state.batcher.failure:
        return JSONResponse({**body, "status": "unavailable", "problem": state.batcher.failure}, status_code=503)
    return body


@router.get("/metadata", summary="The served version: recipe, figures, gates, lineage, how it is served",
            response_model=Metadata, response_model_exclude_unset=True, responses=error_responses(401, 503))
async def metadata(state: ServingState = Depends(serving_state)) -> Metadata:
    """``shrinkflow status --json`` for the version being served, and how it
    is served. Its files were hashed once, when it was loaded into memory
    (``integrity``: verified), not on every request."""
    cur = state.holder.current
    # A LoadedModel exists only once Registry.load verified every file's hash.
    try:
        report = await asyncio.to_thread(status_report, state.registry, cur.version, "verified")
    except (RegistryError, KeyError, OSError, ValueError) as exc:   # its record moved or deleted under the server
        detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        raise ApiError(503, "registry_unavailable", f"the registry's record of the served version {cur.version} "
                                                    f"cannot be read: {detail}; /predict keeps answering with "
                                                    "the version loaded") from None
    # the report's fields as set (what its JSON holds), and how it is served
    return Metadata(**{k: getattr(report, k) for k in report.model_fields_set},
                    serving=cur.serving(state.params.truncation))


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse,
            responses=error_responses(401))
async def prom(state: ServingState = Depends(serving_state)):
    from prometheus_client import CONTENT_TYPE_LATEST

    return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
