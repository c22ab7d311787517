"""The re-compression flow: the window's texts become DVC-versioned data,
then compress -> validate -> deploy re-run through DVC (data and train are
unchanged, so DVC skips them: the kept teacher is reused, not retrained).
Deploys only if every gate passes, the held-out window agreement included."""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import lifecycle
from shrinkflow.config import load_params
from shrinkflow.paths import PARAMS
from tasks.monitor import archive_window, snapshot_window


@flow(name="shrinkflow-recompress", log_prints=True)
def recompress(project_dir: str, texts: list[str], trigger: dict) -> dict:
    """``texts``: the production window; ``trigger``: what asked for it (the
    monitor run, the window's hash and the rules that fired), recorded in
    data/unlabelled/window.json and from there in the new version's lineage."""
    heldout_fraction = load_params(f"{project_dir}/{PARAMS}").monitor.heldout_fraction
    window = snapshot_window(project_dir, texts, heldout_fraction, trigger)
    archive_window(project_dir)
    result = lifecycle(project_dir)
    print(f"recompress: {'deployed ' + result['deployed_version'] if result['deployed_version'] else 'nothing deployed'}"
          f" (window {window['texts_md5']}, {window['rows_distill']} texts distilled, "
          f"{window['rows_heldout']} held out)")
    return {"window": window, "deployed_version": result["deployed_version"], "selected": result["selected"],
            "stages": result["stages"], "reason": result["gates"]["reason"]}
