"""monitoring/reports/index.html: every run, newest first, with its verdict,
key figures and links. Regenerated from the runs' summary.json and
decision.json after every run; written atomically."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from monitoring.evidently_reports import QUALITY_HTML, REPORT_HTML, REPORT_JSON, SUMMARY_JSON

DECISION_JSON = "decision.json"
INDEX = "index.html"
_COLOURS = {"ok": "#1a7f37", "warn": "#9a6700", "recompress": "#cf222e", "retrain": "#8250df"}


def shares(s: dict, fig) -> str:
    """The share of the class that moved most, window / reference (a
    summary written before any number of classes: the positive share)."""
    if "positive_share_reference" in s:
        return f'{fig(s.get("positive_share_current"), ".2f")} / {fig(s.get("positive_share_reference"), ".2f")}'
    m = s.get("largest_share_shift")
    if not m:
        return "not computed"
    return html.escape(f'{m.get("label")}: {fig(m.get("current"), ".2f")} / {fig(m.get("reference"), ".2f")}')


def _row(run: Path) -> str | None:
    try:
        s = json.loads((run / SUMMARY_JSON).read_text())
    except (OSError, ValueError):
        return None  # not a finished run
    try:
        d = json.loads((run / DECISION_JSON).read_text())
    except (OSError, ValueError):
        d = {"action": "undecided", "reasons": []}
    action = d.get("action", "undecided")
    rec = d.get("recompress") or d.get("retrain") or {}
    if rec.get("outcome") == "interrupted":   # stopped before it moved production: not acted on
        action_note = " (interrupted: not acted on)"
    elif action in ("recompress", "retrain") and d.get("acted") is False:
        action_note = " (report only)"
    elif rec.get("outcome") == "deployed":
        action_note = html.escape(f" (deployed {rec.get('deployed_version')})")
    elif rec.get("outcome") == "kept":
        action_note = html.escape(f" (kept production {rec.get('kept_version')})")
    elif rec.get("outcome") == "nothing":
        action_note = " (nothing passed the gates)"
    elif rec.get("outcome") == "rejected":  # a retrain's teacher failed its gates
        action_note = " (retrained teacher rejected)"
    elif rec.get("outcome") == "unchanged":  # a retrain with no new labels
        action_note = " (no new labels)"
    elif rec.get("outcome") == "crashed":   # it raised before it could say what it did
        action_note = html.escape(f" (crashed: {str(rec.get('error', ''))[:200]})")
    else:
        action_note = ""
    e, t, q = s.get("embedding"), s.get("teacher"), s.get("quality")
    # Older summaries lack these keys; newer ones say what was not computed.
    nc = {n.get("metric"): n.get("reason", "") for n in s.get("not_computed") or []}
    tr = s.get("truncation")

    def not_computed(metric: str, default: str) -> str:
        if metric in nc:
            return f'<span title="{html.escape(nc[metric], quote=True)}">not computed</span>'
        return default

    def fig(value, spec: str) -> str:
        return "not computed" if value is None else format(value, spec)

    share = s.get("drifted_descriptor_share")
    cells = [
        html.escape(str(s.get("created", run.name))),
        f'<b style="color:{_COLOURS.get(action, "#57606a")}">{html.escape(action)}</b>{action_note}',
        html.escape(str(s.get("model_version", "?"))),
        str((s.get("window") or {}).get("rows", "?")),
        f"{share:.2f}" if share is not None else "not computed",
        f'{e["roc_auc"]:.3f}' if e else not_computed("embedding_drift", "n/a"),
        f'{t["agreement"]:.3f}' if t else not_computed("teacher_agreement", "n/a"),
        f'{q["accuracy"]:.3f} ({q["labels"]})' if q else "no labels",
        shares(s, fig),
        (f'{fig(tr.get("share"), ".3f")} / {fig(tr.get("reference_share"), ".3f")}' if tr else "not recorded"),
    ]
    links = [f'<a href="{run.name}/{name}">{label}</a>'
             for name, label in ((REPORT_HTML, "drift report"), (REPORT_JSON, "json"),
                                 ("embeddings.html", "embeddings"), (QUALITY_HTML, "quality"))
             if (run / name).is_file()]
    links.append(f'<a href="{run.name}/{SUMMARY_JSON}">summary</a>')
    links += _snapshot_link(d.get("evidently"))
    reasons = "<br>".join(html.escape(r) for r in d.get("reasons", [])[:1])
    if nc:
        reasons += ("<br>" if reasons else "") + "not computed: " + html.escape(
            "; ".join(f"{m}: {r}" for m, r in nc.items()))
    return ("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{' · '.join(links)}</td>"
            + f"<td class=r>{reasons}</td></tr>")


def _snapshot_link(recorded: dict | None) -> list[str]:
    """The run's snapshot in the Evidently UI (``shrinkflow monitor ui`` on
    its default address), or why there is none; nothing for runs written
    before the workspace existed."""
    from monitoring.workspace import WorkspaceRun

    if not isinstance(recorded, dict):
        return []
    try:
        rec = WorkspaceRun.model_validate(recorded)
    except ValueError:
        return []
    url = rec.url()
    if url:
        return [f'<a class="snapshot" href="{html.escape(url, quote=True)}" '
                f'title="{html.escape(rec.project, quote=True)}">Evidently snapshot</a>']
    return [f'<span class="snapshot" title="{html.escape(rec.error or "", quote=True)}">'
            'no Evidently snapshot</span>']


def _safe_row(run: Path) -> str | None:
    """_row, or a row saying the run's files cannot be read: one odd
    summary.json (hand-edited, from another version) must not stop the index
    or the monitor run that regenerates it."""
    try:
        return _row(run)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return (f"<tr><td>{html.escape(run.name)}</td><td colspan=10>unreadable summary: "
                f"{html.escape(type(exc).__name__)}: {html.escape(str(exc))}</td>"
                f'<td class=r><a href="{run.name}/{SUMMARY_JSON}">summary</a></td></tr>')


def run_dirs(reports_dir: Path) -> list[Path]:
    """Finished or not, newest first (names are sortable UTC timestamps)."""
    return sorted((p for p in Path(reports_dir).iterdir() if p.is_dir() and not p.name.startswith(".")),
                  reverse=True)


def prune(reports_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` run directories; returns what went."""
    import shutil

    if not Path(reports_dir).is_dir():
        return []
    gone = run_dirs(reports_dir)[keep:]
    for d in gone:
        shutil.rmtree(d)
    return gone


def write_index(reports_dir: Path) -> Path:
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in (_safe_row(p) for p in run_dirs(reports_dir)) if r is not None]
    from monitoring.workspace import UI_HOST, UI_PORT

    ui_address = f"http://{UI_HOST}:{UI_PORT}"
    head = ["run (UTC)", "verdict", "version", "window rows", "drifted descriptors", "embedding AUC",
            "teacher agreement", "feedback accuracy (labels)", "class share cur / ref (moved most)",
            "truncated share cur / ref", "reports", "why"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>shrinkflow monitoring</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #d0d7de;padding:4px 8px;font-size:14px;vertical-align:top}}th{{background:#f6f8fa}}
td.r{{max-width:40em}}</style></head>
<body><h1>shrinkflow monitoring</h1>
<p id="count">{len(rows)} run(s). Each compares a window of the prediction log with the reference split
(Evidently). Verdicts come from the policy in <code>monitoring/policy.py</code>; a figure that could not be
computed on a window says "not computed" (the reason is in the last column and in its summary).
"(report only)": a recompress or retrain verdict of <code>--report-only</code>, not acted on.
"Evidently snapshot" opens the run in Evidently's UI, where the project's dashboard plots these figures over
time: start it with <code>shrinkflow monitor ui</code> (it serves on {ui_address}).</p>
<table id="runs"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    path = reports_dir / INDEX
    tmp = path.with_name(f".{INDEX}.tmp")
    tmp.write_text(page)
    os.replace(tmp, path)
    return path
