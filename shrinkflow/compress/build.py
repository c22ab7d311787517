"""Build one candidate into a project: copied from the candidate cache when
its inputs did not change, else built from the kept teacher by its recipe.

This is what one compress task runs (tasks.compress), wherever the task
runner puts it: a thread, a process, or a Dask worker that sees the project
at the same absolute path. A worker that does not see it builds into a
project of its own that the inputs were shipped to (shrinkflow.compress.ship,
which calls ``build_fresh``).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from shrinkflow.compress.cache import CandidateCache
from shrinkflow.compress.recipe import apply_recipe
from shrinkflow.compress.teacher_cache import TeacherOutputCache
from shrinkflow.compress.warm import candidate_warm_start, chooses_on_val
from shrinkflow.config import Candidate
from shrinkflow.cost import process_cpu_seconds
from shrinkflow.files import content_hash, file_hashes
from shrinkflow.splits import read_split, read_unlabelled
from shrinkflow.modeling import read_manifest
from shrinkflow.paths import (CANDIDATE_CACHE, CANDIDATES, PREDICTION_CACHE, STUDENTS, TEACHER, TEACHER_OUTPUT_CACHE,
                              WARM_START)
from shrinkflow.prediction_cache import PredictionCache


def cached_candidate(root: Path, candidate: Candidate, key: str) -> dict | None:
    """Copy ``candidate``'s build under ``key`` from the project's candidate
    cache to ``<root>/models/candidates/<name>`` (and its student sidecar to
    ``models/students/<name>`` when the recipe distils). Its
    metrics/compress.json record (cached: True), or None on a miss
    (CandidateCache.fetch: a missing or corrupted entry)."""
    root = Path(root)
    dest = root / CANDIDATES / candidate.name
    student = root / STUDENTS / candidate.name if distils(candidate) else None
    t0 = time.perf_counter()
    info = CandidateCache(root / CANDIDATE_CACHE).fetch(key, dest, student)
    if info is None:
        return None
    seconds = round(time.perf_counter() - t0, 2)
    print(f"compress: {candidate.name} unchanged, copied from the candidate cache in {seconds:.1f}s "
          f"(built in {info['build_seconds']:.0f}s)")
    return {"name": candidate.name, "seconds": seconds, "cached": True,
            "build_seconds": info["build_seconds"], "build_cpu_seconds": info.get("build_cpu_seconds"),
            **read_manifest(dest)["stats"], **info.get("run_stats", {})}


def distils(candidate: Candidate) -> bool:
    """Whether ``candidate``'s recipe has a distill step (and so a student sidecar)."""
    return any(s.method == "distill" for s in candidate.recipe)


def build_candidate(project_dir: Path | str, candidate: Candidate, *, opset: int, threads: int,
                    key: str | None = None, fuse: bool = False) -> dict:
    """Put ``candidate`` at ``<project>/models/candidates/<name>``.

    With a ``key`` (shrinkflow.compress.keys.candidate_keys) a cached build
    is copied (``cached_candidate``); otherwise, or on a miss, it is built
    (``build_fresh``) and the result stored under ``key``. Returns the
    candidate's metrics/compress.json record (``build_fresh``'s, or
    ``cached_candidate``'s).

    Raises shrinkflow.errors.MissingInput when ``project_dir`` is relative or has no
    teacher: a Dask worker with ``dask_shared_filesystem: true`` must see the
    project at the same absolute path.
    """
    root = Path(project_dir)
    if not root.is_absolute() or not (root / TEACHER).is_dir():
        from shrinkflow.errors import MissingInput

        raise MissingInput(f"worker {socket.gethostname()}: no teacher at {root / TEACHER}; "
                           "the project must be at the same absolute path on every worker "
                           "(compress.runner.dask_shared_filesystem: true), or set it to false to ship "
                           "the inputs to the workers")
    if key:
        record = cached_candidate(root, candidate, key)
        if record is not None:
            return record
    record, run_stats = build_fresh(root, candidate, opset=opset, threads=threads, fuse=fuse)
    if key:
        CandidateCache(root / CANDIDATE_CACHE).store(
            key, root / CANDIDATES / candidate.name, record["build_seconds"], record["build_cpu_seconds"],
            student=root / STUDENTS / candidate.name if distils(candidate) else None, run_stats=run_stats)
    return record


def warm_start_note(run_stats: dict, stats: dict) -> str:
    """The build line's note on a warm re-distillation, from the candidate's
    run stats and manifest stats: the version it started from and what the
    student learned from (training rows kept, window texts, teacher-labelled
    variants of the window texts, rows in all, epochs); "" for a cold build."""
    if not run_stats.get("warm_start_from"):
        return ""
    parts = [f"{run_stats['warm_start_train_rows']:,} training rows"] if "warm_start_train_rows" in run_stats else []
    if stats.get("distill_unlabelled_rows"):
        parts.append(f"{stats['distill_unlabelled_rows']:,} window texts")
    if run_stats.get("warm_start_window_augmented_rows"):
        parts.append(f"{run_stats['warm_start_window_augmented_rows']:,} variants of them")
    rows = f"; {run_stats['distill_rows']:,} rows in all" if "distill_rows" in run_stats else ""
    epochs = f", {run_stats['distill_epochs']} epoch(s)" if "distill_epochs" in run_stats else ""
    return f" (warm start from {run_stats['warm_start_from']}: {', '.join(parts)}{rows}{epochs})"


def build_fresh(root: Path, candidate: Candidate, *, opset: int, threads: int, fuse: bool = False,
                teacher_outputs: Path | None = None, predictions: Path | None = None) -> tuple[dict, dict]:
    """Apply ``candidate``'s recipe to the teacher of the project at ``root``
    on ``threads`` torch threads, into ``models/candidates/<name>`` (the
    training split and unlabelled text read there). A recipe that distils
    also puts its student's warm-start sidecar at ``models/students/<name>``
    (shrinkflow.compress.warm), and starts from a matching one staged under
    ``data/unlabelled/warm_start/``; the teacher's outputs on the training
    split come from the teacher-output cache (``teacher_outputs``, default
    the project's) when it has them. A re-distillation's shares are scored
    on val through the prediction cache validate reads (``predictions``,
    default the project's ``PREDICTION_CACHE``). No candidate cache is read
    or written.

    Returns (record, run_stats). record: the candidate's metrics/compress.json
    entry: name, seconds (this run), cached (False), build_seconds and
    build_cpu_seconds (what building it cost), the recipe's stats and, for a
    distilled candidate, how its distillation went (``run_stats``:
    warm_start_from, distill_rows, distill_epochs, distill_learning_rate,
    distill_alpha_kl, warm_start_train_rows, teacher_outputs_cached).
    """
    root = Path(root)
    dest = root / CANDIDATES / candidate.name
    student = root / STUDENTS / candidate.name if distils(candidate) else None
    t0 = time.perf_counter()
    # This process's CPU time across every thread (torch's pool included).
    # With one worker (the default) it is this candidate's alone; threads
    # that build candidates concurrently share one process and one count.
    cpu0 = process_cpu_seconds(include_children=False)
    train = read_split("train", root)
    teacher_hash = content_hash(file_hashes(root / TEACHER))
    run_stats: dict = {}
    warm = candidate_warm_start(root / WARM_START, candidate, teacher_hash)
    # A re-distillation that chooses its interpolation on val reads the val split.
    val = read_split("val", root) if warm is not None and chooses_on_val(candidate) else None
    out = apply_recipe(root / TEACHER, candidate, dest, opset=opset,
                       train_texts=train["text"].tolist(), train_labels=train["label"].to_numpy(),
                       threads=threads, progress=False, unlabelled_texts=read_unlabelled(root), fuse=fuse,
                       teacher_hash=teacher_hash,
                       teacher_cache=TeacherOutputCache(teacher_outputs or root / TEACHER_OUTPUT_CACHE),
                       warm_start=warm, student_dir=student, run_stats=run_stats,
                       val_texts=None if val is None else val["text"].tolist(),
                       val_labels=None if val is None else val["label"].to_numpy(),
                       prediction_cache=PredictionCache(predictions or root / PREDICTION_CACHE))
    seconds = round(time.perf_counter() - t0, 2)
    cpu = round(process_cpu_seconds(include_children=False) - cpu0, 2)
    stats = read_manifest(out)["stats"]
    print(f"compress: {candidate.name} built in {seconds:.0f}s ({cpu:.0f} CPU-s) -> {out}"
          + warm_start_note(run_stats, stats))
    record = {"name": candidate.name, "seconds": seconds, "cached": False, "build_seconds": seconds,
              "build_cpu_seconds": cpu, **stats, **run_stats}
    return record, run_stats
