"""Prefect task: build one compressed candidate from the kept teacher."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="build-candidate", task_run_name="build {candidate.name}", cache_policy=NO_CACHE)
def build_candidate(project_dir: str, candidate, opset: int, threads: int) -> dict:
    # NO_CACHE: DVC decides when compress is stale. No retries: a failed
    # recipe is a bug or a bad param, not a transient fault.
    # The candidate and settings come from the stage's one read of
    # params.yaml; the task never re-reads it (a run never mixes versions).
    from shrinkflow.compress import apply_recipe
    from shrinkflow.modeling import read_manifest
    from shrinkflow.paths import CANDIDATES, TEACHER, UNLABELLED
    from stages.common import read_lines, read_split

    root = Path(project_dir)
    if not root.is_absolute() or not (root / TEACHER).is_dir():
        # A Dask worker on another machine sees its own filesystem: the project
        # must be mounted there at the same absolute path (see README).
        raise FileNotFoundError(f"worker {socket.gethostname()}: no teacher at {root / TEACHER}; "
                                "the project must be at the same absolute path on every worker")
    train = read_split("train", root)
    t0 = time.perf_counter()
    out = apply_recipe(root / TEACHER, candidate, root / CANDIDATES / candidate.name, opset=opset,
                       train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                       threads=threads, progress=False, unlabelled_texts=read_lines(root / UNLABELLED))
    seconds = round(time.perf_counter() - t0, 2)
    print(f"compress: {candidate.name} built in {seconds:.0f}s -> {out}")
    return {"name": candidate.name, "seconds": seconds, **read_manifest(out)["stats"]}
