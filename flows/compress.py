"""The compress stage: build every candidate in parallel on a Prefect task runner.

This is the compress stage's DVC command (``python -m flows.compress``), so
DVC still decides whether compress is stale; within the stage, candidates fan
out over the task runner chosen in ``compress.runner`` (local threads or
processes, or a Dask cluster). The lifecycle flow passes its API URL down, so
these task runs appear in the same Prefect backend.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

if __name__ == "__main__":  # the stage command: bootstrap before Prefect is imported (run_stage is too late)
    from shrinkflow.entry import configure_env

    configure_env(".")  # DVC runs the stage in the project root (stages.common.run_stage)

from prefect import flow  # noqa: E402

from shrinkflow.config import RunnerParams
from shrinkflow.cost import ComputeMeter
from shrinkflow.io import write_json
from shrinkflow.paths import CANDIDATES, METRICS_COMPRESS
from stages.common import read_unlabelled, run_stage
from tasks.compress import build_candidate


def make_task_runner(runner: RunnerParams):
    if runner.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=runner.max_workers)
    if runner.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=runner.max_workers)
    from prefect_dask import DaskTaskRunner

    if runner.dask_address:
        return DaskTaskRunner(address=runner.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": runner.max_workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


@flow(name="shrinkflow-compress", log_prints=True)
def compress_candidates(project_dir: str, candidates: list, opset: int, threads: int,
                        keys: dict | None = None, fuse: bool = False) -> dict:
    futures = [build_candidate.submit(project_dir, c, opset, threads, (keys or {}).get(c.name), fuse)
               for c in candidates]
    return {r["name"]: r for r in (f.result() for f in futures)}


def candidate_keys(root: Path, candidates: list, opset: int, threads: int, fuse: bool) -> dict[str, str]:
    """Each candidate's cache key, from its own inputs (shrinkflow.compress.cache)."""
    from shrinkflow.compress.cache import candidate_key, code_hash, inputs_hashes, package_root
    from shrinkflow.lineage import MODEL_LIBRARIES, library_versions
    from shrinkflow.paths import TEACHER, UNLABELLED, split_path

    from stages.common import unlabelled_hash

    hashes = {**inputs_hashes(root / TEACHER, root / split_path("train"), root / UNLABELLED),
              "unlabelled_hash": unlabelled_hash(root)}
    code, libs = code_hash(package_root()), library_versions(MODEL_LIBRARIES)
    return {c.name: candidate_key(c, **hashes, code=code, libraries=libs, opset=opset, threads=threads,
                                  fuse=fuse)
            for c in candidates}


def compress(params, project_dir: str = ".") -> dict:
    """Build every candidate of ``params.compress`` into models/candidates."""
    # Absolute: a Dask worker resolves it on its own filesystem, never
    # relative to whatever directory the worker process started in.
    root = str(Path(project_dir).resolve())
    # Read every declared text dependency once, even when every candidate will
    # come from the cache: a corrupt or undecodable input fails the stage that
    # declares it, not a later stage that happens to read it first.
    read_unlabelled(Path(root))
    runner = params.compress.runner
    shutil.rmtree(Path(root) / CANDIDATES, ignore_errors=True)
    flow_ = compress_candidates.with_options(task_runner=make_task_runner(runner))
    threads = max(1, params.train.threads // runner.max_workers)
    candidates = list(params.compress.candidates)
    opset, fuse = params.compress.onnx_opset, params.compress.fuse_transformer_ops
    with ComputeMeter(params.cost.country_iso_code) as meter:
        results = flow_(project_dir=root, candidates=candidates, opset=opset, threads=threads,
                        keys=candidate_keys(Path(root), candidates, opset, threads, fuse), fuse=fuse)
    # "compute": what this run spent (cached candidates cost ~nothing now);
    # each candidate's build_cpu_seconds: what its build cost when it was built.
    doc = {"candidates": results, "compute": meter.result()}
    write_json(Path(root) / METRICS_COMPRESS, doc)
    return doc


if __name__ == "__main__":
    sys.exit(run_stage("compress", compress))
