"""The re-compression flow: the window's texts become DVC-versioned data,
then compress -> validate -> deploy re-run through DVC (data and train are
unchanged, so DVC skips them: the kept teacher is reused, not retrained).
The production model is measured as one more candidate: deploys only a
candidate that passes every gate (the held-out window agreement included)
and wins the selection; when production wins, it is kept. The
re-distillation warm-starts from the production student
(shrinkflow.warmstart), so it keeps what the student knew and costs less."""

from __future__ import annotations

from prefect import flow

from flows.lifecycle import lifecycle
from shrinkflow.tracked_params import load_project_params
from shrinkflow.warmstart import warm_start_summary
from shrinkflow.projectlock import project_lock
from tasks.monitor import (archive_window, load_flow_input, recompress_outcome, snapshot_production,
                           snapshot_window)
from tasks.warmstart import stage_warm_start


@flow(name="shrinkflow-recompress", log_prints=True)
def recompress(project_dir: str, texts: list[str] | None = None, trigger: dict | None = None,
               texts_file: str | None = None) -> dict:
    """``texts``: the production window, or ``texts_file``: a JSON file
    holding it (what the monitor passes: Prefect refuses flow-run parameters
    over 512 KiB, which a window of articles exceeds); ``trigger``: what
    asked for it (the monitor run, the window's hash and the rules that
    fired), recorded in data/unlabelled/window.json and from there in the
    new version's lineage. Raises ValueError when neither or both are given."""
    if (texts is None) == (texts_file is None):
        raise ValueError("recompress: give the window's texts or texts_file, one of them")
    if texts_file is not None:
        texts = load_flow_input(texts_file, "recompress texts_file")
    trigger = trigger or {}
    with project_lock(project_dir, "the shrinkflow-recompress flow"):
        return _recompress(project_dir, texts, trigger)


def _recompress(project_dir: str, texts: list[str], trigger: dict) -> dict:
    params = load_project_params(project_dir)
    # The model in production competes as a candidate (shrinkflow.recompression).
    production = snapshot_production(project_dir, params.deploy.registry_dir)
    # The production student, for the re-distillation to warm-start from;
    # recorded in window.json, so the new version's lineage names it.
    warm_start = stage_warm_start(project_dir, params.deploy.registry_dir)
    print(warm_start_summary(production, warm_start))
    window = snapshot_window(project_dir, texts, params.monitor.heldout_fraction,
                             {**trigger, "production_version": production, "warm_start": warm_start})
    # None, or why the push to the DVC remote failed: the run goes on (the
    # window is in the local cache); the warning travels with the result.
    push_warning = archive_window(project_dir)
    result = lifecycle(project_dir, keep_production_copy=True)
    outcome = recompress_outcome(result["gates"], result["deployed_version"], result.get("kept_version"))
    done = {"deployed": f"deployed {result['deployed_version']}", "kept": f"kept production {production}",
            "nothing": "nothing deployed" + (f", production {production} keeps serving" if production else "")}
    print(f"recompress: {done[outcome['outcome']]} (window {window['texts_md5']}, {window['rows_distill']} texts "
          f"distilled, {window['rows_heldout']} held out)")
    return {"window": window, "deployed_version": result["deployed_version"], "selected": result["selected"],
            "stages": result["stages"], "reason": result.get("kept_reason") or result["gates"]["reason"],
            "push_warning": push_warning, "publish_warning": result.get("publish_warning"),
            **{k: outcome[k] for k in ("outcome", "kept_version", "production_version", "candidates")}}
