"""Prefect task: run one DVC stage. DVC, not Prefect, decides staleness."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from shrinkflow.dvcrun import CHECKED_BY_STATUS, StageRun, repro_stage as _repro_stage, worth_retrying

# Only fetching touches the network, and only when the source did not answer
# (the stage exits with STAGE_EXIT_TRANSIENT) is it retried: a missing user
# file, a hash that does not match or a failed training run would fail the
# same way again.
RETRIES = {"fetch": 2}


@task(name="dvc-repro", task_run_name="dvc repro {stage}", cache_policy=NO_CACHE, log_prints=True)
def repro_stage(stage: str, project_dir: str, force: bool = False, up_to_date: bool = False) -> dict:
    # NO_CACHE: DVC's lock file and run-cache are the cache. A Prefect-level
    # cache would skip a stage whose inputs DVC knows have changed.
    # up_to_date: DVC's status found the stage up to date and nothing before
    # it in this run changed anything (shrinkflow.dvcrun.skips_repro): no repro.
    # Stages that run Prefect themselves (compress fans out candidates) report
    # to this run's API, ephemeral or not, instead of starting their own.
    from prefect.client.orchestration import get_client

    if up_to_date and not force:
        print(f"stage {stage}: skipped (up to date: {CHECKED_BY_STATUS})")
        return StageRun(stage, "skipped", 0.0, checked_by=CHECKED_BY_STATUS).to_dict()
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


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn``: retry a failed stage only when its
    failure may pass (``shrinkflow.dvcrun.worth_retrying``). Prefect hands
    over a Failed state whose data is the exception."""
    return worth_retrying(state.data if isinstance(state.data, BaseException) else None)


def repro_stage_with_retries(stage: str):
    """``repro_stage`` with the retries ``RETRIES`` gives ``stage`` (5 s
    apart), taken only for a failure that may pass (``retry_if_transient``)."""
    n = RETRIES.get(stage, 0)
    return repro_stage.with_options(retries=n, retry_delay_seconds=5, retry_condition_fn=retry_if_transient)
