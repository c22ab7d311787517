"""The lifecycle flow: fetch -> data -> train -> compress -> validate -> deploy.

Each stage is a DVC stage run as its own Prefect task. Deploy runs only when
validation selected a candidate that passed every gate; otherwise the flow
still completes (a failed gate is a normal outcome) and reports why.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from flows.prefect_server import refused_state, tie_to_scheduler
from shrinkflow.config import load_params
from shrinkflow.errors import DeploymentMissing
from shrinkflow.paths import PARAMS
from shrinkflow.registry import Registry
from shrinkflow.dvcrun import check_params_unchanged, params_fingerprint, skips_repro, up_to_date_stages
from shrinkflow.projectlock import ProjectBusy, project_lock
from tasks.dvc import repro_stage_with_retries
from tasks.monitor import production_for_run
from tasks.publish import publish_report, publish_shared_registry, read_deployment, read_validation

BUILD_STAGES = ("fetch", "data", "train", "compress", "validate")
# In dvc.yaml but outside the lifecycle: the baseline reports (`dvc repro frontier`).
BASELINE_STAGES = ("small_direct", "frontier")


@flow(name="shrinkflow-lifecycle", log_prints=True)
def lifecycle(project_dir: str, keep_production_copy: bool = False, revalidate: bool = False,
              wait_for_project_s: float = 0.0) -> dict:
    """``project_dir``: the project root (absolute; every path is resolved
    against it); ``keep_production_copy``: keep the production copy a
    re-compression or a retrain made (data/unlabelled/production), so that
    validate measures production, as a candidate (a re-compression) or as
    the window gain's baseline (a retrain; its version.json ``role``). False
    (a run): with no re-compression window staged the copy is removed;
    with one, it is left as validate last read it, or copied anew from the
    current production when validate runs again
    (shrinkflow.recompression.production_for_run);
    ``revalidate``: run validate though DVC sees nothing changed (its timing
    was refused on a busy machine: ``max_timing_other_cpu_share``);
    ``wait_for_project_s``: how long to wait for another writer holding the
    project (a scheduled run: ``monitor.scheduled_wait_minutes``; 0: refused
    at once, ProjectBusy). Returns the stages run, the selection and what
    was deployed."""
    tie_to_scheduler()   # a scheduled run stops when its `shrinkflow schedule` is killed
    try:
        with project_lock(project_dir, "the shrinkflow-lifecycle flow", wait_s=wait_for_project_s,
                          on_wait=print):
            return _lifecycle(project_dir, keep_production_copy, revalidate)
    except ProjectBusy as exc:   # a scheduled run: Failed with the reason, no traceback; else raised
        return refused_state(exc)


def _lifecycle(project_dir: str, keep_production_copy: bool = False, revalidate: bool = False) -> dict:
    # Validated and fingerprinted once; every stage must see the same bytes.
    fingerprint = params_fingerprint(project_dir)
    params = load_params(f"{project_dir}/{PARAMS}")
    registry_dir = params.deploy.registry_dir
    if not keep_production_copy:
        # A re-compression's window still staged: left as validate read it, or, when validate
        # runs again, production copied anew as a candidate (shrinkflow.recompression)
        production_for_run(project_dir, registry_dir, list(BUILD_STAGES), revalidate)

    # One DVC status for every stage (after the production copy, a validate dep):
    # while nothing has changed, a stage it found up to date is not reproduced.
    up_to_date = up_to_date_stages([*BUILD_STAGES, "deploy"], project_dir)
    stages: dict[str, dict] = {}

    def run(stage: str, force: bool = False) -> dict:
        check_params_unchanged(project_dir, fingerprint, stage)
        skip = skips_repro(stage, up_to_date, stages, force)
        return repro_stage_with_retries(stage)(stage, project_dir, force=force, up_to_date=skip)

    for s in BUILD_STAGES:
        stages[s] = run(s, force=revalidate and s == "validate")
    report, selection = read_validation(project_dir)
    selected = selection.selected
    deployment = None
    if selected:
        stages["deploy"] = run("deploy")
        deployment = read_deployment(project_dir, registry_dir)
        if deployment is None:  # DVC saw nothing stale, but the registry lacks it
            stages["deploy"] = run("deploy", force=True)
            deployment = read_deployment(project_dir, registry_dir)
        if deployment is None:
            publish_report(report, selection, None, stages)
            raise DeploymentMissing(f"the deploy stage ran (forced) but the registry at {registry_dir} does not "
                                    f"serve {selected!r}")
    # A re-compression that selected the production model keeps it: nothing deployed.
    kept = deployment.version if deployment and deployment.kept else None
    version = deployment.version if deployment and not kept else None
    publish_report(report, selection, version, stages, deployment.roi if deployment else None, kept=kept)
    # With shared_registry.url: serving hosts follow what is published there.
    # Every run publishes (a failed publish catches up); a failure is a
    # warning in the result, not a crash: the promotion stands here.
    publish_warning = publish_shared_registry(project_dir) if params.shared_registry.url else None
    # A rollback since the deploy stands: production may be older than the record.
    production = Registry(Path(project_dir) / registry_dir).alias() if deployment else None
    return {"stages": stages, "selected": selected, "deployed_version": version, "kept_version": kept,
            "production_version": production,
            "publish_warning": publish_warning,
            "kept_reason": deployment.reason if kept else None,
            "gates": selection.to_json_dict(), "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name}
