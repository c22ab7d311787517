"""Prefect tasks of the monitor and re-compression flows: each calls one
library function (monitoring/, shrinkflow/) and returns plain data."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from shrinkflow.paths import MONITOR_STATE, WINDOWS_ARCHIVE

# NO_CACHE throughout: the prediction log grows between runs, and a cached
# report or decision would hide exactly the change monitoring is for. The flow
# validates params once and passes them in; tasks never re-read params.yaml.


@task(name="read-window", cache_policy=NO_CACHE)
def read_window(project_dir: str, params):
    from monitoring.run import read_window as _read

    return _read(Path(project_dir), params)


@task(name="read-recompress-corpus", cache_policy=NO_CACHE)
def read_recompress_corpus(project_dir: str, params, window) -> list[str]:
    from monitoring.run import read_recompress_corpus as _read

    return _read(Path(project_dir), params, window)


@task(name="build-drift-reports", cache_policy=NO_CACHE)
def build_reports(project_dir: str, params, window, now: datetime) -> tuple[dict, str]:
    from monitoring.run import build_reports as _build

    summary, out = _build(Path(project_dir), params, window, now)
    return summary.model_dump(mode="json"), str(out)


@task(name="decide", cache_policy=NO_CACHE)
def decide(project_dir: str, params, summary: dict, report_dir: str, now: datetime, flow_run: str,
           act: bool = True) -> dict:
    """``act``: a recompress verdict will be acted on (recorded as ``acted``).
    Also adds the run's snapshot to the project's Evidently workspace
    (monitoring.workspace; a failure there is logged, never raised)."""
    from monitoring.policy import ACTING
    from monitoring.run import decide_and_record
    from monitoring.summary import DriftSummary
    from monitoring.workspace import WORKSPACE, task_name

    decision = decide_and_record(DriftSummary.model_validate(summary), params, Path(report_dir),
                                 Path(project_dir) / MONITOR_STATE, now, flow_run, act=act,
                                 workspace=Path(project_dir) / WORKSPACE, task=task_name(params))
    from monitoring.index import DECISION_JSON

    recorded = json.loads((Path(report_dir) / DECISION_JSON).read_text()).get("evidently")
    return {**decision.model_dump(mode="json"), "triggers": list(decision.triggers),
            "acted": bool(act and decision.action in ACTING), "evidently": recorded}


def reports_link_base(url: str, timeout_s: float = 2.0) -> str | None:
    """``<url>/reports`` when a server answers ``GET <url>/health`` with 200
    (``shrinkflow serve`` serves the reports there), else None: the
    artifact then links the report files on disk (file:// URIs)."""
    from shrinkflow.ports import answers_200

    return f"{url}/reports" if answers_200(f"{url}/health", timeout_s) else None


@task(name="publish-monitor-report", cache_policy=NO_CACHE)
def publish(params, summary: dict, decision: dict, report_dir: str) -> str:
    """The Prefect artifact. Its links go where the reports are: to the
    ``shrinkflow serve`` at serve.host/serve.port when one answers there
    as the artifact is written, else to the files on disk."""
    from monitoring.policy import Decision
    from monitoring.run import summary_markdown
    from monitoring.summary import DriftSummary

    from shrinkflow.traffic import server_url

    url = server_url(params.serve.host, params.serve.port)
    base = reports_link_base(url)
    md = summary_markdown(DriftSummary.model_validate(summary),
                          Decision.model_validate({k: v for k, v in decision.items()
                                                   if k not in ("triggers", "acted", "evidently")}),
                          Path(report_dir), base, acted=decision.get("acted"))
    if base:
        md += f"\nOn disk: `{report_dir}` (links: the `shrinkflow serve` answering at {url}).\n"
    else:
        md += (f"\nOn disk: `{report_dir}`. No `shrinkflow serve` answered at {url} (serve.host and serve.port) "
               "when this was written, so the links are to the files on this machine (a browser may refuse to "
               "open a file:// link from the Prefect UI: copy it into the address bar).\n")
    ev = decision.get("evidently") or {}
    if ev.get("snapshot_id"):
        from monitoring.workspace import WorkspaceRun

        md += (f"\nEvidently: this run's snapshot in the project \"{ev['project']}\" ({WorkspaceRun(**ev).url()}, "
               "with `shrinkflow monitor ui` running).\n")
    elif ev.get("error"):
        md += f"\nEvidently: the snapshot could not be added to the workspace: {ev['error']}.\n"
    create_markdown_artifact(key="shrinkflow-monitor", markdown=md,
                             description="drift, compression gap and the policy's verdict")
    return md


@task(name="snapshot-window", cache_policy=NO_CACHE)
def snapshot_window(project_dir: str, texts: list[str], heldout_fraction: float, meta: dict) -> dict:
    from shrinkflow.window import write_snapshot

    return write_snapshot(Path(project_dir), texts, heldout_fraction, meta)


@task(name="dvc-add-window-archive", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def archive_window(project_dir: str) -> str | None:
    """``dvc add data/windows`` (and push when a default remote is set), so
    the snapshot is versioned data, restorable by its hash. Returns None, or
    why the push failed (the re-compression goes on; ``dvc push`` later)."""
    from shrinkflow.remote import archive

    warning = archive(WINDOWS_ARCHIVE, project_dir)
    if warning:
        print(f"warning: {warning}")
    return warning


@task(name="copy-production-model", cache_policy=NO_CACHE)
def snapshot_production(project_dir: str, registry_dir: str) -> str | None:
    """The production model, verified, into data/unlabelled/production: validate
    measures it as a candidate. Returns its version (None: nothing in production)."""
    from shrinkflow.recompression import snapshot_production as _snapshot

    return _snapshot(Path(project_dir), registry_dir)


@task(name="clear-production-copy", cache_policy=NO_CACHE)
def clear_production(project_dir: str) -> bool:
    """Remove a re-compression's production copy (data/unlabelled/production):
    outside a re-compression, validate has no production candidate. Returns
    whether there was one."""
    from shrinkflow.paths import PRODUCTION_META
    from shrinkflow.recompression import clear_production as _clear

    had = (Path(project_dir) / PRODUCTION_META).is_file()
    _clear(Path(project_dir))
    return had


@task(name="production-for-run", cache_policy=NO_CACHE)
def production_for_run(project_dir: str, registry_dir: str, stages: list[str], revalidate: bool) -> str | None:
    """A plain run's production copy (shrinkflow.recompression.production_for_run):
    with a re-compression's window staged, left as validate last read it when
    none of ``stages`` is stale (one ``dvc status``) and not ``revalidate``,
    else the current production copied as a candidate; without a window,
    none. Says what it did; returns the version staged, or None."""
    from shrinkflow.dvcrun import up_to_date_stages
    from shrinkflow.recompression import production_for_run as _for_run

    root = Path(project_dir)

    def validate_reruns() -> bool:
        # DVC failing answers nothing up to date: the stages will say why; production is measured in case they run
        return revalidate or not up_to_date_stages(stages, root) >= set(stages)

    version, said = _for_run(root, registry_dir, validate_reruns)
    if said:
        print(f"note: {said}")
    return version


@task(name="recompress-outcome", cache_policy=NO_CACHE)
def recompress_outcome(gates: dict, deployed_version: str | None, kept_version: str | None) -> dict:
    """``gates``: the lifecycle's selection (reports/gates.json as a dict)."""
    from shrinkflow.artifacts import GatesReport
    from shrinkflow.recompression import recompress_outcome as _outcome

    return _outcome(GatesReport.model_validate(gates), deployed_version, kept_version)


@task(name="record-recompress", cache_policy=NO_CACHE)
def record_recompress(report_dir: str, outcome: dict) -> str:
    """The outcome into the monitor run's decision.json (``recompress``) and
    the Prefect artifact ``shrinkflow-recompress``, with every failed gate's figures."""
    from monitoring.run import record_recompress as _record
    from shrinkflow.recompression import recompress_markdown

    _record(Path(report_dir), outcome)
    md = recompress_markdown(outcome)
    create_markdown_artifact(key="shrinkflow-recompress", markdown=md,
                             description="what the re-compression deployed or kept, and each candidate's failed gates")
    return md


@task(name="record-retrain", cache_policy=NO_CACHE)
def record_retrain(report_dir: str, outcome: dict) -> str:
    """The retrain's outcome into the monitor run's decision.json
    (``retrain``) and the Prefect artifact ``shrinkflow-retrain``, with the
    teacher's gates and every failed gate's figures."""
    from monitoring.run import record_retrain as _record
    from shrinkflow.retrain import retrain_markdown

    _record(Path(report_dir), outcome)
    md = retrain_markdown(outcome)
    create_markdown_artifact(key="shrinkflow-retrain", markdown=md,
                             description="what the retrain deployed, the retrained teacher's gates and each "
                                         "candidate's failed gates")
    return md


def record_crash(report_dir: str, action: str, exc: BaseException) -> None:
    """That the re-compression or retrain this run started crashed, into its
    decision.json (monitoring.run.record_crash). A plain function: it runs
    while the flow unwinds from the exception."""
    from monitoring.run import record_crash as _record

    _record(Path(report_dir), action, exc)


def record_interrupted(report_dir: str, action: str) -> None:
    """That the re-compression or retrain this run started was stopped before
    it moved production, into its decision.json (monitoring.run.record_interrupted).
    A plain function: it runs while the flow is being torn down."""
    from monitoring.run import record_interrupted as _record

    _record(Path(report_dir), action)


def save_flow_input(report_dir: str, name: str, value: list) -> str:
    """monitoring.run.save_flow_input: the path the flow reads ``value`` from."""
    from monitoring.run import save_flow_input as _save

    return _save(Path(report_dir), name, value)


def load_flow_input(path: str, what: str, pairs: bool = False) -> list:
    """monitoring.run.load_flow_input."""
    from monitoring.run import load_flow_input as _load

    return _load(path, what, pairs)


def unmark_interrupted(project_dir: str, now: datetime) -> bool:
    """The history line of the decision made at ``now`` recorded as not
    acted on (monitoring.run.unmark_acted). A plain function, not a task:
    it runs while the flow is being torn down (Ctrl-C)."""
    from monitoring.run import decision_ts, unmark_acted

    return unmark_acted(Path(project_dir) / MONITOR_STATE, decision_ts(now))
