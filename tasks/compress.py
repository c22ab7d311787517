"""Prefect task: build one compressed candidate from the kept teacher."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE


@task(name="build-candidate", task_run_name="build {candidate.name}", cache_policy=NO_CACHE)
def build_candidate(project_dir: str, candidate, opset: int, threads: int, key: str | None = None,
                    fuse: bool = False) -> dict:
    # NO_CACHE: DVC decides when compress is stale, and the candidate cache
    # (keyed by this candidate's own inputs, computed by the stage) decides
    # whether this candidate must be rebuilt. No retries: a failed recipe is a
    # bug or a bad param, not a transient fault. The candidate and settings
    # come from the stage's one read of params.yaml; the task never re-reads it.
    from shrinkflow.compress import apply_recipe
    from shrinkflow.compress.cache import CandidateCache
    from shrinkflow.cost import process_cpu_seconds
    from shrinkflow.modeling import read_manifest
    from shrinkflow.paths import CANDIDATE_CACHE, CANDIDATES, TEACHER
    from stages.common import read_split, read_unlabelled

    root = Path(project_dir)
    if not root.is_absolute() or not (root / TEACHER).is_dir():
        # A Dask worker on another machine sees its own filesystem: the project
        # must be mounted there at the same absolute path (see README).
        raise FileNotFoundError(f"worker {socket.gethostname()}: no teacher at {root / TEACHER}; "
                                "the project must be at the same absolute path on every worker")
    dest = root / CANDIDATES / candidate.name
    cache = CandidateCache(root / CANDIDATE_CACHE)
    t0 = time.perf_counter()
    info = cache.fetch(key, dest) if key else None
    if info is not None:
        seconds = round(time.perf_counter() - t0, 2)
        print(f"compress: {candidate.name} unchanged, copied from the candidate cache in {seconds:.1f}s "
              f"(built in {info['build_seconds']:.0f}s)")
        return {"name": candidate.name, "seconds": seconds, "cached": True,
                "build_seconds": info["build_seconds"], "build_cpu_seconds": info.get("build_cpu_seconds"),
                **read_manifest(dest)["stats"]}
    # This process's CPU time across every thread (torch's pool included).
    # With one worker (the default) it is this candidate's alone; threads
    # that build candidates concurrently share one process and one count.
    cpu0 = process_cpu_seconds(include_children=False)
    train = read_split("train", root)
    out = apply_recipe(root / TEACHER, candidate, dest, opset=opset,
                       train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                       threads=threads, progress=False, unlabelled_texts=read_unlabelled(root), fuse=fuse)
    seconds = round(time.perf_counter() - t0, 2)
    cpu = round(process_cpu_seconds(include_children=False) - cpu0, 2)
    if key:
        cache.store(key, out, seconds, cpu)
    print(f"compress: {candidate.name} built in {seconds:.0f}s ({cpu:.0f} CPU-s) -> {out}")
    return {"name": candidate.name, "seconds": seconds, "cached": False, "build_seconds": seconds,
            "build_cpu_seconds": cpu, **read_manifest(out)["stats"]}
