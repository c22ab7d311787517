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


@task(name="build-candidate-shipped", task_run_name="build {candidate.name} (shipped)", cache_policy=NO_CACHE)
def build_shipped_candidate(inputs, candidate, warm_start, opset: int, threads: int, fuse: bool = False):
    """``shrinkflow.compress.ship.build_shipped`` as a task, for a Dask worker
    that does not see the project: the candidate's files and record
    (a ``BuiltCandidate``), which the flow checks and puts in the project."""
    # NO_CACHE and no retries, as above. A worker that dies mid-build is not
    # a retry of this task: Dask runs it again on another worker.
    from shrinkflow.compress.ship import build_shipped

    return build_shipped(inputs, candidate, warm_start, opset=opset, threads=threads, fuse=fuse)
