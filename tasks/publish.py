"""Prefect tasks that read stage outputs and publish them as artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from shrinkflow.artifacts import CostReturn, DeploymentRecord, GatesReport, ValidationReport
from shrinkflow.catalog import DEPLOYMENT, GATES, VALIDATION, ArtifactInvalid, load
from shrinkflow.dvcrun import CHECKED_BY_STATUS
from shrinkflow.markdown import roi_markdown, validation_markdown


@task(name="read-validation", cache_policy=NO_CACHE)
def read_validation(project_dir: str) -> tuple[ValidationReport, GatesReport]:
    """The validate stage's report and selection (metrics/validate.json,
    reports/gates.json). Raises MissingInput when validate has not run."""
    return load(VALIDATION, project_dir), load(GATES, project_dir)


@task(name="read-deployment", cache_policy=NO_CACHE)
def read_deployment(project_dir: str, registry_dir: str) -> DeploymentRecord | None:
    """The deploy stage's record, if the registry holds its version and has
    a production version.

    deploy/deployment.json can outlive its registry (a fresh clone, a deleted
    registry dir): then DVC sees nothing stale, and the flow must re-deploy.
    A registry that holds the version while production names an earlier one
    was rolled back on purpose (``shrinkflow rollback``): the record stands
    and the rollback too; the flow does not re-deploy over it.
    """
    from shrinkflow.registry import Registry

    if not (Path(project_dir) / DEPLOYMENT.path).is_file():
        return None
    try:
        record = load(DEPLOYMENT, project_dir)
    except ArtifactInvalid as exc:  # a broken deploy command: the flow re-runs deploy, then fails naming it
        get_run_logger().warning(str(exc))
        return None
    registry = Registry(Path(project_dir) / registry_dir)
    production = registry.alias()
    if production is None or record.version not in registry.versions():
        return None
    return record


def stages_markdown(stages: dict) -> str:
    """The artifact's "Stages" section: one row per stage of ``stages``
    (stage -> ``StageRun.to_dict()``) with what DVC did and the seconds its
    ``dvc repro`` took. A stage skipped on the run's ``dvc status`` alone
    (``checked_by``) ran no process, so it shows no seconds, not a 0.0 that
    reads as a measurement."""
    def row(name: str, r: dict) -> str:
        if r.get("checked_by") == CHECKED_BY_STATUS:
            return f"| {name} | {r['status']} (up to date: {CHECKED_BY_STATUS}) | - |"
        return f"| {name} | {r['status']} | {r['seconds']:.1f} |"

    return "\n## Stages\n\n| stage | DVC | seconds |\n|---|---|---|\n" + "\n".join(
        row(s, r) for s, r in stages.items()) + "\n"


@task(name="publish-lifecycle-report", cache_policy=NO_CACHE)
def publish_report(report: ValidationReport, selection: GatesReport, deployed_version: str | None, stages: dict,
                   roi: CostReturn | None = None, kept: str | None = None) -> str:
    md = validation_markdown(report, selection, deployed_version, "deploy" in stages, kept=kept)
    md += ("\n" + roi_markdown(roi)) if roi else ""
    md += stages_markdown(stages)
    create_markdown_artifact(key="shrinkflow-lifecycle", markdown=md,
                             description="metrics and gates of the latest lifecycle run")
    return md


@task(name="publish-shared-registry", cache_policy=NO_CACHE)
def publish_shared_registry(project_dir: str) -> str | None:
    """Publish the project's registry to ``shared_registry.url``, where
    serving hosts follow production (``shrinkflow.shared_registry``).
    Returns None when published, else why not (logged as a warning): the
    promotion stands here, and ``shrinkflow publish`` sends it later."""
    from shrinkflow.config import load_params
    from shrinkflow.paths import PARAMS
    from shrinkflow.shared_registry import publish_project

    published, warning = publish_project(project_dir, load_params(Path(project_dir) / PARAMS))
    if warning is not None:
        get_run_logger().warning(warning)
    elif published is not None:
        get_run_logger().info(published.describe())
    return warning
