"""The re-compression flow: the window's texts become DVC-versioned data,
then compress -> validate -> deploy re-run through DVC (data and train are
unchanged, so DVC skips them: the kept teacher is reused, not retrained).
Deploys only if every gate passes, the held-out window agreement included.
The re-distillation warm-starts from the production student
(shrinkflow.warmstart), so it keeps what the student knew and costs less."""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import lifecycle
from shrinkflow.config import load_params
from shrinkflow.paths import PARAMS
from tasks.monitor import archive_window, snapshot_window
from tasks.warmstart import stage_warm_start


@flow(name="shrinkflow-recompress", log_prints=True)
def recompress(project_dir: str, texts: list[str], trigger: dict) -> dict:
    """``texts``: the production window; ``trigger``: what asked for it (the
    monitor run, the window's hash and the rules that fired), recorded in
    data/unlabelled/window.json and from there in the new version's lineage."""
    params = load_params(f"{project_dir}/{PARAMS}")
    heldout_fraction = params.monitor.heldout_fraction
    # The production student, for the re-distillation to warm-start from;
    # recorded in window.json, so the new version's lineage names it.
    warm_start = stage_warm_start(project_dir, params.deploy.registry_dir)
    window = snapshot_window(project_dir, texts, heldout_fraction, {**trigger, "warm_start": warm_start})
    archive_window(project_dir)
    result = lifecycle(project_dir)
    print(f"recompress: {'deployed ' + result['deployed_version'] if result['deployed_version'] else 'nothing deployed'}"
          f" (window {window['texts_md5']}, {window['rows_distill']} texts distilled, "
          f"{window['rows_heldout']} held out)")
    return {"window": window, "deployed_version": result["deployed_version"], "selected": result["selected"],
            "stages": result["stages"], "reason": result["gates"]["reason"]}
