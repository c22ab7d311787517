"""Prefect task: run one DVC stage. DVC, not Prefect, decides staleness."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from shrinkflow.dvcrun import repro_stage as _repro_stage

# Only fetching touches the network; a failed training run is not transient,
# so only fetch is retried.
RETRIES = {"fetch": 2}


@task(name="dvc-repro", task_run_name="dvc repro {stage}", cache_policy=NO_CACHE, log_prints=True)
def repro_stage(stage: str, project_dir: str, force: bool = False) -> dict:
    # NO_CACHE: DVC's lock file and run-cache are the cache. A Prefect-level
    # cache would skip a stage whose inputs DVC knows have changed.
    # Stages that run Prefect themselves (compress fans out candidates) report
    # to this run's API, ephemeral or not, instead of starting their own.
    from prefect.client.orchestration import get_client

    api_url = str(get_client(sync_client=True).api_url)
    run = _repro_stage(stage, project_dir, extra_env={"PREFECT_API_URL": api_url}, force=force)
    print(f"stage {stage}: {run.status} in {run.seconds:.1f}s")
    return run.to_dict()


def repro_stage_with_retries(stage: str):
    n = RETRIES.get(stage, 0)
    return repro_stage.with_options(retries=n, retry_delay_seconds=5)
