"""Build one candidate into a project: copied from the candidate cache when
its inputs did not change, else built from the kept teacher by its recipe.

This is what one compress task runs (tasks.compress), wherever the task
runner puts it: a thread, a process, or a Dask worker on another machine,
which reads the project from its own filesystem.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from shrinkflow.compress.cache import CandidateCache
from shrinkflow.compress.recipe import apply_recipe
from shrinkflow.config import Candidate
from shrinkflow.cost import process_cpu_seconds
from shrinkflow.splits import read_split, read_unlabelled
from shrinkflow.modeling import read_manifest
from shrinkflow.paths import CANDIDATE_CACHE, CANDIDATES, TEACHER


def build_candidate(project_dir: Path | str, candidate: Candidate, *, opset: int, threads: int,
                    key: str | None = None, fuse: bool = False) -> dict:
    """Put ``candidate`` at ``<project>/models/candidates/<name>``.

    With a ``key`` (shrinkflow.compress.keys.candidate_keys) a cached build
    is copied; otherwise, or on a miss, the recipe is applied to the teacher
    on ``threads`` torch threads (training split and unlabelled text read
    here) and the result stored under ``key``. Returns the candidate's
    metrics/compress.json record: name, seconds (this run), cached,
    build_seconds and build_cpu_seconds (what building it cost, when it was
    built) and the recipe's stats.

    Raises shrinkflow.errors.MissingInput when ``project_dir`` is relative or has no
    teacher: a Dask worker on another machine must see the project at the
    same absolute path.
    """
    root = Path(project_dir)
    if not root.is_absolute() or not (root / TEACHER).is_dir():
        from shrinkflow.errors import MissingInput

        raise MissingInput(f"worker {socket.gethostname()}: no teacher at {root / TEACHER}; "
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
