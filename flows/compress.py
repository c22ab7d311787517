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

from prefect import flow

from shrinkflow.config import ParamsError, RunnerParams, load_params
from shrinkflow.io import write_json
from tasks.compress import build_candidate
from tasks.stages import CANDIDATES

METRICS_COMPRESS = Path("metrics/compress.json")


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
def compress_candidates(project_dir: str = ".", params_path: str = "params.yaml") -> dict:
    params = load_params(Path(project_dir) / params_path)
    runner = params.compress.runner
    threads = max(1, params.train.threads // runner.max_workers)
    futures = [build_candidate.submit(project_dir, params_path, c.name, threads)
               for c in params.compress.candidates]
    return {r["name"]: r for r in (f.result() for f in futures)}


def run_stage(project_dir: str = ".", params_path: str = "params.yaml") -> dict:
    params = load_params(Path(project_dir) / params_path)  # raises ParamsError before any change
    shutil.rmtree(Path(project_dir) / CANDIDATES, ignore_errors=True)
    flow_ = compress_candidates.with_options(task_runner=make_task_runner(params.compress.runner))
    results = flow_(project_dir=project_dir, params_path=params_path)
    write_json(Path(project_dir) / METRICS_COMPRESS, results)
    return results


def main() -> int:
    try:
        run_stage()
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
