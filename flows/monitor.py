"""The monitor flow: a window of the prediction log against the reference
split, Evidently reports, a Prefect artifact, the policy's verdict, and on
``recompress`` the re-compression flow, on ``retrain`` the retrain flow.
Wiring only."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run

from flows.prefect_server import refused_state, tie_to_scheduler
from flows.recompress import recompress
from flows.retrain import retrain
from shrinkflow.config import load_params
from shrinkflow.paths import PARAMS
from shrinkflow.tracked_params import load_project_params
from shrinkflow.projectlock import ProjectBusy, project_lock
from tasks.monitor import (build_reports, decide, publish, read_recompress_corpus, read_window, record_crash,
                           record_interrupted, record_recompress, record_retrain, save_flow_input,
                           unmark_interrupted)
from tasks.retrain import production_version, window_feedback


# What decision.json records of a re-compression (its ``recompress`` key).
RECORDED = ("outcome", "deployed_version", "kept_version", "production_version", "selected", "reason", "candidates")
# What decision.json records of a retrain (its ``retrain`` key).
RECORDED_RETRAIN = ("outcome", "deployed_version", "selected", "reason", "feedback", "previous_teacher",
                    "teacher_gates", "candidates", "production_before", "vs_production")


@flow(name="shrinkflow-monitor", log_prints=True)
def monitor(project_dir: str, act: bool = True, wait_for_project_s: float = 0.0,
            params_path: str | None = None) -> dict:
    """``project_dir``: the project root; ``act``: run the re-compression flow when the verdict is recompress
    (False: only report what the policy decided); ``wait_for_project_s``: how long an acting run waits for
    another writer holding the project (a scheduled run: ``monitor.scheduled_wait_minutes``; 0: refused at
    once, ProjectBusy); ``params_path``: with ``act`` False only, the params file to read instead of the
    project's params.yaml (``monitor --report-only --params FILE`` reads FILE and writes no params.yaml:
    it holds no project lock, so it must not change what a running lifecycle reads). ValueError: a
    ``params_path`` with ``act`` True (an acting run's stages read params.yaml)."""
    tie_to_scheduler()   # a scheduled run stops when its `shrinkflow schedule` is killed
    if params_path is not None and act:
        raise ValueError("params_path is for a report-only run: an acting monitor's stages read params.yaml")
    if not act:   # reports only: nothing a run changes
        return _monitor(project_dir, act, params_path)
    try:
        with project_lock(project_dir, "the shrinkflow-monitor flow (acting)", wait_s=wait_for_project_s,
                          on_wait=print):
            return _monitor(project_dir, act)
    except ProjectBusy as exc:   # a scheduled run: Failed with the reason, no traceback; else raised
        return refused_state(exc)


def _monitor(project_dir: str, act: bool = True, params_path: str | None = None) -> dict:
    now = datetime.now(timezone.utc)
    # Validated once for the whole run. A run that may act checks too that
    # params.yaml names every key dvc.yaml tracks, before any report or
    # decision is written: a re-compression refused by DVC would otherwise
    # be recorded as acted, and hold the cooldown for a run that never was.
    params = load_project_params(project_dir) if act else load_params(params_path or f"{project_dir}/{PARAMS}")
    window = read_window(project_dir, params)
    if len(window) == 0:  # a window below min_window_rows: warn, as the policy does, not a pass
        reason = (f"the prediction log is empty: nothing to monitor (the window of 0 rows is below "
                  f"min_window_rows {params.monitor.min_window_rows}; serve the production model and "
                  "send it traffic first)")
        print(f"monitor: warn: {reason}")
        return {"action": "warn", "reasons": [reason], "triggers": [], "acted": False, "report_dir": None,
                "recompress": None}
    summary, report_dir = build_reports(project_dir, params, window, now)
    run_name = f"{flow_run.name} ({flow_run.id})"
    decision = decide(project_dir, params, summary, report_dir, now, run_name, act)
    publish(params, summary, decision, report_dir)
    # One log record with every rule's figure (the UI's log showed only the first).
    print("\n".join([f"monitor: {decision['action']}", *(f"  - {r}" for r in decision["reasons"])]))
    ev = decision.get("evidently") or {}
    if ev.get("error"):
        print(f"monitor: warning: the run's snapshot is not in the Evidently workspace {ev['workspace']}: "
              f"{ev['error']} (its reports and decision are kept)")
    for n in summary.get("not_computed", []):
        print(f"monitor: not computed on this window: {n['metric']}: {n['reason']}")
    result = retrained = None
    if decision["action"] in ("recompress", "retrain") and act:
        before = production_version(project_dir, params.deploy.registry_dir)
        try:
            if decision["action"] == "recompress":
                meta = {"window_sha256": summary["window"]["sha256"], "rows": summary["window"]["rows"],
                        "first_ts": summary["window"]["first_ts"], "last_ts": summary["window"]["last_ts"],
                        "monitor_flow_run": run_name, "triggers": decision["triggers"], "report_dir": report_dir}
                texts = read_recompress_corpus(project_dir, params, window)  # monitor.recompress_last_n
                # by file: Prefect refuses flow-run parameters over 512 KiB (a window of articles)
                result = recompress(project_dir, trigger={**meta, "corpus_rows": len(texts)},
                                    texts_file=save_flow_input(report_dir, "recompress_texts", texts))
            else:
                pairs = window_feedback(window, summary["labels"])
                retrained = retrain(project_dir, trigger={
                    "window_sha256": summary["window"]["sha256"], "rows": summary["window"]["rows"],
                    "monitor_flow_run": run_name, "triggers": decision["triggers"], "report_dir": report_dir},
                    pairs_file=save_flow_input(report_dir, "retrain_pairs", [list(p) for p in pairs]))
        except Exception as exc:
            # A crash stays acted on (a failure that repeats would re-run at every firing), but is
            # recorded and said (a helper's finding: the trigger was spent silently for cooldown_hours).
            try:
                record_crash(report_dir, decision["action"], exc)
                where = f"recorded in {report_dir}/decision.json"
            except Exception as failed:  # noqa: BLE001 - the crash itself is what the command reports
                where = f"not recorded ({type(failed).__name__}: {failed})"
            print(f"monitor: the {decision['action']} crashed ({type(exc).__name__}: {str(exc)[:300]}); this "
                  f"window counts as acted on, so the next run holds off for monitor.cooldown_hours "
                  f"({params.monitor.cooldown_hours:g}); {where}")
            raise
        except BaseException:
            # Stopped by the user before it moved production: Ctrl-C, or
            # SIGTERM/SIGHUP (a KeyboardInterrupt from the CLI's handler, or,
            # inside the flow run, Prefect's TerminationSignal, which is not
            # one: a helper's finding, the window stayed acted on). The
            # verdict was not acted on, so neither the dedup nor the cooldown
            # holds the next window back. A crash (above) stays acted (no
            # loop of failing runs).
            if production_version(project_dir, params.deploy.registry_dir) == before:
                unmark_interrupted(project_dir, now)
                try:
                    record_interrupted(report_dir, decision["action"])
                except Exception as failed:  # noqa: BLE001 - the history above is what the next window reads
                    print(f"monitor: the run's decision.json was not updated ({type(failed).__name__}: {failed})")
                print(f"monitor: the {decision['action']} was interrupted before it moved production: recorded as "
                      "not acted on (the next window may act)")
            raise
        # What it did, once it has returned (a failure to record it is not the flow's crash).
        if decision["action"] == "recompress":
            record_recompress(report_dir, {k: result[k] for k in RECORDED})
        else:
            record_retrain(report_dir, {k: retrained[k] for k in RECORDED_RETRAIN})
    return {"action": decision["action"], "reasons": decision["reasons"], "triggers": decision["triggers"],
            "acted": decision["acted"], "report_dir": report_dir, "summary": summary, "recompress": result,
            "retrain": retrained, "evidently": decision.get("evidently")}
