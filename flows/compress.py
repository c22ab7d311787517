"""The compress stage's fan-out: one build-candidate task per candidate, on
the Prefect task runner chosen in ``compress.runner`` (local threads or
processes, or a Dask cluster).

The stage (stages/compress.py) calls ``build_candidates``; DVC still decides
whether compress is stale. The lifecycle flow passes its API URL down, so
these task runs appear in the same Prefect backend.
"""

from __future__ import annotations

from prefect import flow

from shrinkflow.config import Candidate, RunnerParams
from tasks.compress import build_candidate


def make_task_runner(runner: RunnerParams):
    """The Prefect task runner ``runner`` names: ThreadPoolTaskRunner,
    ProcessPoolTaskRunner, or DaskTaskRunner (on ``dask_address``, else on a
    LocalCluster of ``max_workers`` single-threaded processes)."""
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
    """One build-candidate task per candidate, all submitted at once; each
    candidate's record by name."""
    futures = [build_candidate.submit(project_dir, c, opset, threads, (keys or {}).get(c.name), fuse)
               for c in candidates]
    return {r["name"]: r for r in (f.result() for f in futures)}


def build_candidates(project_dir: str, candidates: list[Candidate], runner: RunnerParams, *, opset: int,
                     threads: int, keys: dict[str, str], fuse: bool) -> dict[str, dict]:
    """Build every candidate into ``project_dir`` (absolute: a Dask worker
    resolves it on its own filesystem) on ``runner``'s task runner, each with
    ``threads`` torch threads and its cache key from ``keys``. Returns each
    candidate's record (shrinkflow.compress.build.build_candidate) by name."""
    flow_ = compress_candidates.with_options(task_runner=make_task_runner(runner))
    return flow_(project_dir=project_dir, candidates=candidates, opset=opset, threads=threads, keys=keys,
                 fuse=fuse)
