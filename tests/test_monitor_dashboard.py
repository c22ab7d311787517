"""Drift over time in Evidently's UI (issue 17, item 3): every monitor run
adds its snapshot to the project's Evidently workspace, whose dashboard
plots the figures the policy decided on; `shrinkflow monitor ui` serves it
on loopback, rendered here by headless Chromium; the reports index links
each run to its snapshot; a workspace that cannot be written loses nothing.

Two real runs on a tiny real model (tests.test_monitoring's helpers), real
Evidently, a real UI server, real Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.netports import free_port
from monitoring.policy import agreement_floor
from tests.conftest import PROJECT_ROOT, bare_project, chromium_dom, terminate_group, wait_for_line
from tests.test_monitor_robust import cli_project, monitor_cli, only_run, project, served_rows  # noqa: F401
from tests.test_monitoring import PARAMS, build, log_window, rendered_text

PANELS = ("Monitor runs", "Decision", "Drifted text descriptors", "Embedding drift ROC AUC",
          "Prediction distribution", "Feedback accuracy", "Teacher agreement")


def project_task(root: Path) -> str:
    from monitoring.workspace import task_name
    from shrinkflow.config import load_params

    return task_name(load_params(root / "params.yaml"))


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_teacher_dir, small_splits):
    """A project with two real monitor runs recorded: an in-domain window and
    the product-review window, both with feedback labels, decided by the
    policy a day apart."""
    from monitoring.run import decide_and_record, run_id
    from monitoring.workspace import WORKSPACE

    tmp = tmp_path_factory.mktemp("dashboard")
    root = bare_project(tmp)
    s = small_splits
    in_domain = log_window(tmp, tiny_teacher_dir, s["test"]["text"].tolist()[:60],
                           labels=s["test"]["label"].tolist()[:20])
    shifted = log_window(tmp, tiny_teacher_dir, s["shifted"]["text"].tolist(),
                         labels=s["shifted"]["label"].tolist()[:30])
    params = SimpleNamespace(monitor=PARAMS)
    summaries, decisions, names = [], [], []
    # Two hours apart, within the dashboard's default time range.
    start = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=3)
    for i, window in enumerate((in_domain, shifted)):
        now = start + timedelta(hours=i)
        name = run_id(now)
        summary = build(tmp, tiny_teacher_dir, window, s["val"], s["train"], name)
        decisions.append(decide_and_record(summary, params, tmp / "reports" / name, tmp / "decisions.jsonl", now,
                                           f"run-{i}", workspace=root / WORKSPACE, task=project_task(root)))
        summaries.append(summary)
        names.append(name)
    return SimpleNamespace(root=root, reports=tmp / "reports", summaries=summaries, decisions=decisions,
                           names=names, workspace=root / WORKSPACE)


def recorded(run_dir: Path) -> dict:
    return json.loads((run_dir / "decision.json").read_text())["evidently"]


@pytest.mark.slow  # two_runs: two monitor runs with reports, ~14 s
def test_each_run_adds_a_snapshot_of_the_figures_the_policy_used(two_runs):
    from evidently.ui.workspace import Workspace

    from monitoring.workspace import DECISION_CODES, TAB, find_project, project_name

    ws = Workspace(str(two_runs.workspace))
    projects = ws.list_projects()
    task = project_task(two_runs.root)
    assert [p.name for p in projects] == [project_name(task)] == ["shrinkflow: sentiment (vadersentiment)"]
    pid = find_project(two_runs.workspace, task)
    assert pid == str(projects[0].id)
    docs = [recorded(two_runs.reports / name) for name in two_runs.names]
    assert all(d["project_id"] == pid and d["error"] is None for d in docs)
    assert sorted(str(s) for s in ws.list_runs(pid)) == sorted(d["snapshot_id"] for d in docs)
    for doc, summary, decision, name in zip(docs, two_runs.summaries, two_runs.decisions, two_runs.names):
        snap = ws.get_run(pid, doc["snapshot_id"])
        assert snap.name == name and snap.metadata["decision"] == decision.action
        assert f"decision:{decision.action}" in snap.tags
        values = {r.metric_value_location.metric.params["column"]: r.value for r in snap.metric_results.values()}
        # the figures the policy read, not recomputed
        assert values["drifted_descriptor_share"] == pytest.approx(summary.drifted_descriptor_share)
        assert values["embedding_drift_auc"] == pytest.approx(summary.embedding.roc_auc)
        assert values["teacher_agreement"] == pytest.approx(summary.teacher.agreement)
        assert values["feedback_accuracy"] == pytest.approx(summary.quality.accuracy)
        assert values["decision_code"] == DECISION_CODES[decision.action]
        for label, share in summary.class_share_current.items():
            assert values[f"class_share:{label}"] == pytest.approx(share)
        thresholds = {f.rule: f.threshold for f in decision.findings}
        assert values["max_drifted_descriptor_share"] == thresholds["text_drift"] == PARAMS.max_drifted_descriptor_share
        # the floor the policy used on this window (monitoring.policy.agreement_floor)
        assert values["min_teacher_agreement"] == thresholds["teacher_agreement"] == pytest.approx(
            agreement_floor(summary.teacher.rows, summary.teacher.validated_agreement,
                            summary.teacher.validated_rows, PARAMS)[0])
    # the two windows differ, so the dashboard has something to show over time
    assert two_runs.summaries[1].drifted_descriptor_share > two_runs.summaries[0].drifted_descriptor_share
    dash = ws.get_dashboard(pid)
    tab = next(t for t in dash.tabs if t.title == TAB)
    titles = [p.title for p in dash.panels if p.id in set(tab.panels)]
    assert titles == list(PANELS)
    assert len(dash.panels) == len(PANELS)  # recorded twice, the panels are kept current, not added again


@pytest.mark.slow  # two_runs: two monitor runs with reports, ~14 s
def test_the_index_links_each_run_to_its_snapshot(two_runs):
    from monitoring.index import write_index

    page = write_index(two_runs.reports).read_text()
    for name in two_runs.names:
        doc = recorded(two_runs.reports / name)
        url = f"http://127.0.0.1:8100/projects/{doc['project_id']}/reports/{doc['snapshot_id']}"
        assert f'href="{url}"' in page
        assert f'href="{name}/report.html"' in page  # the run's own reports are still linked
    assert "shrinkflow monitor ui" in page


@pytest.mark.slow  # two_runs: two monitor runs with reports, ~14 s
def test_a_workspace_that_cannot_be_written_loses_no_report_or_decision(two_runs, tmp_path, caplog):
    """The workspace path is a file: Evidently cannot create its workspace.
    The run still gets its verdict, decision.json (saying why there is no
    snapshot), its history line and its index row."""
    import shutil

    from monitoring.policy import decide
    from monitoring.run import decide_and_record, load_history

    reports = tmp_path / "reports"
    run = reports / "20260103T000000_000000Z"
    shutil.copytree(two_runs.reports / two_runs.names[1], run)
    (run / "decision.json").unlink()
    blocked = tmp_path / "workspace"
    blocked.write_text("not a directory")
    state = tmp_path / "decisions.jsonl"
    now = datetime(2026, 1, 3, tzinfo=timezone.utc)
    summary = two_runs.summaries[1]
    with caplog.at_level("WARNING", logger="monitoring.workspace"):
        decision = decide_and_record(summary, SimpleNamespace(monitor=PARAMS), run, state, now, "run-3",
                                     workspace=blocked, task="default")
    assert decision == decide(summary, PARAMS, [], now)
    doc = json.loads((run / "decision.json").read_text())
    assert doc["action"] == decision.action and doc["evidently"]["snapshot_id"] is None
    assert doc["evidently"]["error"] and "not added to the Evidently workspace" in caplog.text
    assert [h.action for h in load_history(state)] == [decision.action]
    for name in ("report.html", "report.json", "summary.json"):
        assert (run / name).stat().st_size > 0
    index = (reports / "index.html").read_text()
    assert "no Evidently snapshot" in index and 'href="20260103T000000_000000Z/report.html"' in index
    assert blocked.read_text() == "not a directory"


@pytest.mark.slow  # Evidently's UI server starts (10-30 s here), then Chromium renders the dashboard twice
def test_monitor_ui_serves_the_dashboard_with_both_runs_in_chromium(two_runs):
    root = two_runs.root
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "monitor", "ui", "--port", str(port)], cwd=root,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        url, lines = wait_for_line(proc, r"^dashboard of .*: (http://\S+)", "monitor ui")
        pid = recorded(two_runs.reports / two_runs.names[0])["project_id"]
        assert url == f"http://127.0.0.1:{port}/projects/{pid}", "".join(lines)
        dom = chromium_dom(url, budget_ms=20000, timeout_s=180)
        text = rendered_text(dom)
        for title in PANELS:
            assert title in text, (title, text[-3000:])
        # the snapshots' times, as the UI prints them (UTC, like the runs' names)
        check_both_runs_plotted(text, [datetime.strptime(n, "%Y%m%dT%H%M%S_%fZ").strftime("%Y-%m-%d %H:%M:%S")
                                       for n in two_runs.names])
        assert "validated" in panel_texts(text)["Teacher agreement"]
        assert "positive" in panel_texts(text)["Prediction distribution"]
        # a run's link in the reports index opens its snapshot (on this UI's port)
        snap = recorded(two_runs.reports / two_runs.names[1])
        page = rendered_text(chromium_dom(f"{url}/reports/{snap['snapshot_id']}", budget_ms=15000, timeout_s=180))
        assert "drifted_descriptor_share" in page, page[-3000:]
    finally:
        rc = terminate_group(proc)
    assert rc == 0, "".join(lines)
    with pytest.raises(OSError):  # the UI went with it
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)


def panel_texts(text: str) -> dict[str, str]:
    """Each panel's rendered text, from its title to the next panel's."""
    at = [text.index(title) for title in PANELS] + [len(text)]
    return {title: text[at[i]:at[i + 1]] for i, title in enumerate(PANELS)}


def check_both_runs_plotted(text: str, whens: list[str]) -> None:
    """The counter sums one per run: 2 runs; each plot's time axis has a
    tick per run that has its figure: both runs, in every panel."""
    panels = panel_texts(text)
    assert "2 runs" in panels["Monitor runs"], panels["Monitor runs"]
    for title in PANELS[1:]:
        for when in whens:
            assert when in panels[title], (title, when, panels[title])


@pytest.mark.slow  # a real `shrinkflow monitor` run through Prefect: about 20 s, after the project is built
def test_shrinkflow_monitor_adds_its_run_to_the_projects_workspace(cli_project, small_splits, prefect_api):
    """The flow's wiring: `shrinkflow monitor` records the run in
    .shrinkflow/evidently/, in the project of this project's task, and says so."""
    from evidently.ui.workspace import Workspace

    from monitoring.workspace import WORKSPACE, find_project
    from shrinkflow.predlog import PredictionLog

    log = PredictionLog(cli_project / ".shrinkflow/predictions.db").open()
    log.append(served_rows(cli_project, small_splits["test"]["text"].tolist()[:30]))
    code, out, _ = monitor_cli(cli_project, prefect_api, "--report-only")
    assert code == 0, out[-4000:]
    assert 'Evidently: snapshot added to "shrinkflow: sentiment (vadersentiment)"' in out, out[-4000:]
    doc = recorded(only_run(cli_project))
    pid = find_project(cli_project / WORKSPACE, project_task(cli_project))
    assert doc["project_id"] == pid and doc["error"] is None
    assert [str(s) for s in Workspace(str(cli_project / WORKSPACE)).list_runs(pid)] == [doc["snapshot_id"]]


@pytest.mark.slow  # 4-7 s in the quick suite, which must stay under 3 minutes (184 s with it)
def test_monitor_ui_refuses_a_taken_port_and_an_unreadable_workspace_before_announcing_a_ui(tmp_path):
    """A helper's findings: `monitor ui --port P` with P taken printed
    "Evidently UI: http://...:P" (the other UI answered its health check),
    then died with exit 3, the cause only in a shared log; a corrupt project
    file died with a bare JSONDecodeError naming no file."""
    import socket

    from monitoring.workspace import WORKSPACE, unreadable_workspace_files

    root = bare_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)

    def ui(port: int) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "monitor", "ui", "--port", str(port)], cwd=root,
                              env=env, capture_output=True, text=True, timeout=120)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ui(port)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"127.0.0.1:{port} is already in use" in proc.stderr
    assert "Evidently UI:" not in proc.stdout
    project = root / WORKSPACE / "01a24734-4f53-760e-96c7-8b840007e79d"
    project.mkdir(parents=True)
    (project / "metadata.json").write_text("{garbage")
    (project / "dashboard.json").write_text("[]")
    assert [p.split(" (")[0] for p in unreadable_workspace_files(root / WORKSPACE)] == [
        str(project / "metadata.json"), str(project / "dashboard.json")]
    proc = ui(free_port())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"{project / 'metadata.json'} (JSONDecodeError" in proc.stderr
    assert f"{project / 'dashboard.json'} (a JSON list, not an object)" in proc.stderr
    assert f"mv {WORKSPACE} {WORKSPACE}.bad" in proc.stderr and "Evidently UI:" not in proc.stdout
    # valid JSON of the wrong shape (a helper's finding: Evidently's "field required", no file named)
    (project / "metadata.json").write_text('{"foo": 1}')
    (project / "dashboard.json").unlink()
    (why,) = unreadable_workspace_files(root / WORKSPACE)
    assert why.startswith(f"{project / 'metadata.json'} (not an Evidently ProjectModel: ") and "name" in why, why


@pytest.mark.parametrize("name, content, why", [
    ("metadata.json", "", "JSONDecodeError"),
    ("metadata.json", b"\xff\xfe\x00binary", "UnicodeDecodeError"),
    ("metadata.json", "{garbage", "JSONDecodeError"),
    ("metadata.json", "[]", "a JSON list, not an object"),
    ("metadata.json", "42", "a JSON int, not an object"),
    ("metadata.json", '{"foo": 1}', "not an Evidently ProjectModel"),
    ("metadata.json", None, "IsADirectoryError"),          # a directory of that name
    ("dashboard.json", "null", "a JSON NoneType, not an object"),
    ("dashboard.json", '{"panels": 3}', "not an Evidently DashboardModel"),
])
def test_every_kind_of_unreadable_workspace_file_is_named(tmp_path, name, content, why):
    """The kinds of file Evidently's UI cannot start on, as a table; each is
    named with why, and a workspace the monitor wrote passes (the Chromium
    test starts the UI on one)."""
    from monitoring.workspace import unreadable_workspace_files

    project = tmp_path / "ws" / "01a24734-4f53-760e-96c7-8b840007e79d"
    project.mkdir(parents=True)
    path = project / name
    if content is None:
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    (found,) = unreadable_workspace_files(tmp_path / "ws")
    assert found.startswith(f"{path} (") and why in found, found
    assert unreadable_workspace_files(tmp_path / "nothing here") == []
