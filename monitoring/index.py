"""monitoring/reports/index.html: every run, newest first, with its verdict,
key figures and links. Regenerated from the runs' summary.json and
decision.json after every run; written atomically."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from monitoring.report import QUALITY_HTML, REPORT_HTML, REPORT_JSON, SUMMARY_JSON

DECISION_JSON = "decision.json"
INDEX = "index.html"
_COLOURS = {"ok": "#1a7f37", "warn": "#9a6700", "recompress": "#cf222e"}


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
    e, t, q = s.get("embedding"), s.get("teacher"), s.get("quality")
    cells = [
        html.escape(s["created"]),
        f'<b style="color:{_COLOURS.get(action, "#57606a")}">{html.escape(action)}</b>',
        html.escape(s["model_version"]),
        str(s["window"]["rows"]),
        f'{s["drifted_descriptor_share"]:.2f}',
        f'{e["roc_auc"]:.3f}' if e else "n/a",
        f'{t["agreement"]:.3f}' if t else "n/a",
        f'{q["accuracy"]:.3f} ({q["labels"]})' if q else "no labels",
        f'{s["positive_share_current"]:.2f} / {s["positive_share_reference"]:.2f}',
    ]
    links = [f'<a href="{run.name}/{REPORT_HTML}">drift report</a>', f'<a href="{run.name}/{REPORT_JSON}">json</a>']
    for name, label in (("embeddings.html", "embeddings"), (QUALITY_HTML, "quality")):
        if (run / name).is_file():
            links.append(f'<a href="{run.name}/{name}">{label}</a>')
    links.append(f'<a href="{run.name}/{SUMMARY_JSON}">summary</a>')
    reasons = "<br>".join(html.escape(r) for r in d.get("reasons", [])[:1])
    return ("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + f"<td>{' · '.join(links)}</td>"
            + f"<td class=r>{reasons}</td></tr>")


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
    rows = [r for r in (_row(p) for p in run_dirs(reports_dir)) if r is not None]
    head = ["run (UTC)", "verdict", "version", "window rows", "drifted descriptors", "embedding AUC",
            "teacher agreement", "feedback accuracy (labels)", "positive share cur / ref", "reports", "why"]
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>shrinkflow monitoring</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #d0d7de;padding:4px 8px;font-size:14px;vertical-align:top}}th{{background:#f6f8fa}}
td.r{{max-width:40em}}</style></head>
<body><h1>shrinkflow monitoring</h1>
<p id="count">{len(rows)} run(s). Each compares a window of the prediction log with the reference split
(Evidently). Verdicts come from the policy in <code>monitoring/policy.py</code>.</p>
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
