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

    run = _repro_stage(stage, project_dir, force=force,
                       extra_env=stage_prefect_env(str(get_client(sync_client=True).api_url)))
    print(f"stage {stage}: {run.status} in {run.seconds:.1f}s")
    return run.to_dict()


def stage_prefect_env(api_url: str) -> dict[str, str]:
    """The Prefect settings a stage process gets: this run's API, and this
    process's UI address, empty when it has none. A stage then prints
    Prefect's "View at <UI>" links exactly when this process would: with
    PREFECT_API_URL alone it would derive a UI address from a temporary
    server that is gone when the command ends (a newcomer saw one from
    `shrinkflow run`); an empty PREFECT_UI_URL prints none."""
    from prefect.settings import PREFECT_UI_URL

    return {"PREFECT_API_URL": api_url, "PREFECT_UI_URL": PREFECT_UI_URL.value() or ""}


def repro_stage_with_retries(stage: str):
    n = RETRIES.get(stage, 0)
    return repro_stage.with_options(retries=n, retry_delay_seconds=5)
