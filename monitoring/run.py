"""One monitoring run over a project, as library calls the monitor flow's
tasks wrap: read the window, build its reports, decide, record.

Paths come from the catalog (shrinkflow.paths) and params; nothing here
imports Prefect.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from monitoring.index import DECISION_JSON, prune, write_index
from monitoring.policy import Decision, PastDecision, decide
from monitoring.summary import DriftSummary


def run_id(now: datetime) -> str:
    """A report directory name: sortable UTC timestamp."""
    return now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S_%fZ")


def read_window(root: Path, params):
    """The newest ``monitor.window_last_n`` rows of the prediction log."""
    from shrinkflow.predlog import PredictionLog

    return PredictionLog(Path(root) / params.serve.log_path).window(last=params.monitor.window_last_n)


def build_reports(root: Path, params, window, now: datetime) -> tuple[DriftSummary, Path]:
    """Evidently reports of ``window`` against the reference split, for the
    production version, into monitor.reports_dir/<UTC timestamp>/."""
    import pandas as pd

    from monitoring.report import build
    from shrinkflow.paths import TEACHER, split_path
    from shrinkflow.registry import Registry

    root = Path(root)
    ref = Registry(root / params.deploy.registry_dir).load()   # verified, like serving
    metrics = ref.manifest.get("metrics", {})
    validated = {"version": ref.version, "accuracy": metrics.get("accuracy"),
                 "agreement": (metrics.get("agreement") or {}).get("test")}
    teacher = root / TEACHER
    out = root / params.monitor.reports_dir / run_id(now)
    summary = build(window, pd.read_parquet(root / split_path("reference")), served_dir=ref.path,
                    teacher_dir=teacher if teacher.is_dir() else None,
                    train_texts=pd.read_parquet(root / split_path("train"))["text"].tolist(),
                    validated=validated, params=params.monitor, out_dir=out,
                    created=now.astimezone(timezone.utc).isoformat(timespec="seconds"))
    return summary, out


def load_history(state: Path) -> list[PastDecision]:
    if not Path(state).is_file():
        return []
    return [PastDecision.model_validate_json(line) for line in Path(state).read_text().splitlines() if line.strip()]


def decide_and_record(summary: DriftSummary, params, report_dir: Path, state: Path, now: datetime,
                      flow_run: str | None = None) -> Decision:
    """Apply the policy against the recorded history, then record the decision
    beside the report and in the history (one fsynced line), and regenerate
    the index."""
    decision = decide(summary, params.monitor, load_history(state), now)
    doc = {**decision.model_dump(mode="json"), "triggers": list(decision.triggers), "flow_run": flow_run,
           "ts": now.astimezone(timezone.utc).isoformat()}
    (Path(report_dir) / DECISION_JSON).write_text(json.dumps(doc, indent=2) + "\n")
    Path(state).parent.mkdir(parents=True, exist_ok=True)
    line = PastDecision(ts=doc["ts"], action=decision.action, window_sha256=decision.window_sha256)
    with open(state, "a") as fh:
        fh.write(line.model_dump_json() + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    prune(Path(report_dir).parent, params.monitor.keep_reports)
    write_index(Path(report_dir).parent)
    return decision


def summary_markdown(summary: DriftSummary, decision: Decision, report_dir: Path, reports_url: str | None) -> str:
    """The Prefect artifact: verdict, key figures, links to the reports."""
    rel = Path(report_dir).name

    def link(name: str, run: bool = True) -> str:
        if reports_url:
            return f"{reports_url.rstrip('/')}/{rel + '/' if run else ''}{name}"
        return ((Path(report_dir) if run else Path(report_dir).parent) / name).resolve().as_uri()

    e, t, q = summary.embedding, summary.teacher, summary.quality
    lines = [f"# Monitor: **{decision.action}** ({summary.model_version})", "",
             f"Window: {summary.window.rows} predictions, {summary.window.first_ts} .. {summary.window.last_ts} "
             f"(sha256 {summary.window.sha256[:12]}); reference: {summary.reference_rows} texts.", "",
             "| signal | value |", "|---|---|",
             f"| drifted text descriptors | {summary.drifted_descriptor_share:.2f} |",
             f"| embedding drift ROC AUC | {e.roc_auc:.3f} |" if e else "| embedding drift | n/a (no teacher) |",
             f"| teacher agreement | {t.agreement:.3f} on {t.rows} texts |" if t else "| teacher agreement | n/a |",
             f"| feedback accuracy | {q.accuracy:.3f} on {q.labels} labels |" if q else "| feedback accuracy | no labels |",
             f"| positive share (current / reference) | {summary.positive_share_current:.2f} / "
             f"{summary.positive_share_reference:.2f} |", "",
             "## Why", *[f"- {r}" for r in decision.reasons], "",
             f"Reports: [drift]({link('report.html')})"
             + (f" · [embeddings]({link('embeddings.html')})" if e else "")
             + (f" · [quality]({link('quality.html')})" if (Path(report_dir) / 'quality.html').is_file() else "")
             + f" · [index]({link('index.html', run=False)})"]
    return "\n".join(lines) + "\n"
