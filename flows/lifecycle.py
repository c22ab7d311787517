"""The lifecycle flow: fetch -> data -> train -> compress -> validate -> deploy.

Each stage is a DVC stage run as its own Prefect task. Deploy runs only when
validation selected a candidate that passed every gate; otherwise the flow
still completes (a failed gate is a normal outcome) and reports why.
"""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from shrinkflow.config import load_params
from tasks.dvc import repro_stage_with_retries
from tasks.report import publish_report, read_deployment, read_validation

BUILD_STAGES = ("fetch", "data", "train", "compress", "validate")


@flow(name="shrinkflow-lifecycle", log_prints=True)
def lifecycle(project_dir: str = ".", params_path: str = "params.yaml") -> dict:
    load_params(f"{project_dir}/{params_path}")  # fail before any stage runs
    stages = {s: repro_stage_with_retries(s)(s, project_dir) for s in BUILD_STAGES}
    validation = read_validation(project_dir)
    selected = validation["gates"]["selected"]
    deployment = None
    if selected:
        stages["deploy"] = repro_stage_with_retries("deploy")("deploy", project_dir)
        deployment = read_deployment(project_dir)
        if deployment is None:  # DVC saw nothing stale, but the registry lacks it
            stages["deploy"] = repro_stage_with_retries("deploy")("deploy", project_dir, force=True)
            deployment = read_deployment(project_dir)
    version = deployment["version"] if deployment else None
    publish_report(validation, version, stages)
    return {"stages": stages, "selected": selected, "deployed_version": version,
            "gates": validation["gates"], "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name}
