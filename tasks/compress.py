"""Prefect task: build one compressed candidate (shrinkflow.compress.build)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="build-candidate", task_run_name="build {candidate.name}", cache_policy=NO_CACHE)
def build_candidate(project_dir: str, candidate, opset: int, threads: int, key: str | None = None,
                    fuse: bool = False) -> dict:
    """``shrinkflow.compress.build.build_candidate`` as a task: its
    metrics/compress.json record."""
    # NO_CACHE: DVC decides when compress is stale, and the candidate cache
    # (keyed by this candidate's own inputs, computed by the stage) decides
    # whether this candidate must be rebuilt. No retries: a failed recipe is a
    # bug or a bad param, not a transient fault. The candidate and settings
    # come from the stage's one read of params.yaml; the task never re-reads it.
    from shrinkflow.compress.build import build_candidate as build

    return build(project_dir, candidate, opset=opset, threads=threads, key=key, fuse=fuse)
