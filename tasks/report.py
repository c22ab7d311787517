"""Prefect tasks that read stage outputs and publish them as artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from shrinkflow.io import read_json
from shrinkflow.paths import DEPLOYMENT, GATES_JSON, METRICS_VALIDATE
from shrinkflow.report import roi_markdown, validation_markdown


@task(name="read-validation", cache_policy=NO_CACHE)
def read_validation(project_dir: str) -> dict:
    root = Path(project_dir)
    return {"metrics": read_json(root / METRICS_VALIDATE), "gates": read_json(root / GATES_JSON)}


@task(name="read-deployment", cache_policy=NO_CACHE)
def read_deployment(project_dir: str, registry_dir: str) -> dict | None:
    """The deploy stage's record, if the registry really serves it.

    deploy/deployment.json can outlive its registry (a fresh clone, a deleted
    registry dir): then DVC sees nothing stale, and the flow must re-deploy.
    """
    from shrinkflow.registry import Registry

    path = Path(project_dir) / DEPLOYMENT
    if not path.is_file():
        return None
    record = read_json(path)
    registry = Registry(Path(project_dir) / registry_dir)
    return record if registry.alias() == record["version"] else None


@task(name="publish-lifecycle-report", cache_policy=NO_CACHE)
def publish_report(validation: dict, deployed_version: str | None, stages: dict, roi: dict | None = None) -> str:
    md = validation_markdown(validation["metrics"], validation["gates"], deployed_version, "deploy" in stages)
    md += ("\n" + roi_markdown(roi)) if roi else ""
    md += "\n## Stages\n\n| stage | DVC | seconds |\n|---|---|---|\n" + "\n".join(
        f"| {s} | {r['status']} | {r['seconds']:.1f} |" for s, r in stages.items()) + "\n"
    create_markdown_artifact(key="shrinkflow-lifecycle", markdown=md,
                             description="metrics and gates of the latest lifecycle run")
    return md
