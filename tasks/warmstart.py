"""Prefect task of the re-compression and retrain flows: stage the production
student (shrinkflow.warmstart) for the re-distillation to warm-start from."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="stage-warm-start", cache_policy=NO_CACHE)
def stage_warm_start(project_dir: str, registry_dir: str, for_retrain: bool = False) -> dict | None:
    """``shrinkflow.warmstart.stage_warm_start`` as a task: what was staged."""
    # NO_CACHE: production moves between runs; what it serves now decides.
    from shrinkflow.warmstart import stage_warm_start as stage

    return stage(Path(project_dir), registry_dir, for_retrain=for_retrain)
