"""End to end: `shrinkflow run` in a temporary git+DVC copy of the project.

Real Prefect (test harness), real DVC (a git repo with the project's own
dvc.yaml and local remote), real data (a slice), a tiny real model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import terminate_group, wait_for_line

# Each runs the real CLI, Prefect and DVC on a temporary project: minutes in all. The
# lifecycle test has a file of its own (test_e2e_lifecycle.py), so the two workers share the load.
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

from tests.e2e import TINY, copy_project, deep_merge, run_cli, stages_line, write_params


@pytest.fixture(scope="module")
def harness(prefect_api):
    return prefect_api


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The module's shared project. Every test that needs a model in it asks
    for ``deployed``, which puts one there whatever ran before, so the tests
    pass in any order (pytest --random-order)."""
    return copy_project(tmp_path_factory.mktemp("e2e") / "project")


def test_bad_params_exit_2_and_write_nothing(project, tmp_path):
    bad = write_params(tmp_path / "bad.yaml", {"compress": {"candidates": [
        {"name": "int8", "recipe": [{"method": "quantize", "bits": 4}]}]}})
    before = sorted(str(p) for p in project.rglob("*"))
    params_before = (project / "params.yaml").read_bytes()
    code, out = run_cli(project, None, "run", "--params", str(bad))
    assert code == 2
    assert "compress.candidates.0.recipe.0.bits" in out and "Input should be 8" in out
    assert sorted(str(p) for p in project.rglob("*")) == before
    assert (project / "params.yaml").read_bytes() == params_before
    code, out = run_cli(project, None, "status", "--params", str(bad))
    assert code == 2


# TINY with the per-channel int8 candidate: deployable (passes TINY's gates).
DEPLOYABLE = deep_merge(TINY, {"compress": {"candidates": [
    {"name": "int8", "recipe": [{"method": "quantize", "per_channel": True}]}]}})


@pytest.fixture()
def deployed(project, harness) -> str:
    """The module's project with deployable params and a version in
    production, whatever ran before in this module (run first, nothing is
    deployed yet and it runs the lifecycle). Returns the production version."""
    from shrinkflow.registry import Registry
    from shrinkflow.shared_registry import SharedRegistry

    # a shared registry too, which every run publishes to (docs/team.md)
    shared = SharedRegistry(f"file://{project.parent / 'shared-registry'}")
    write_params(project / "params.yaml", deep_merge(DEPLOYABLE, {"shared_registry": {"url": shared.url}}))
    reg = Registry(project / "registry")
    if reg.alias() is None:
        code, out = run_cli(project, harness, "run")
        assert code == 0, out[-4000:]
        assert (shared.versions(), shared.aliases()) == (reg.versions(), reg.aliases()), out[-4000:]
    assert reg.alias() is not None
    return reg.alias()


def test_every_crash_exits_3_and_production_keeps_serving(project, harness, deployed):
    """0 deployed, 1 only for failed gates, 3 for anything that crashed."""
    from shrinkflow.registry import Registry

    reg = Registry(project / "registry")
    before = deployed
    texts = project / "data/unlabelled/texts.txt"
    original = texts.read_bytes()

    # Prefect cannot start or be reached: nothing runs.
    env = {"PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_CLIENT_MAX_RETRIES": "0"}
    code, out = run_cli(project, None, "run", extra_env=env)
    assert code == 3 and "the lifecycle could not run" in out and "127.0.0.1:9" in out, out

    # A missing file (a stage's dependency).
    texts.unlink()
    try:
        code, out = run_cli(project, harness, "run")
    finally:
        texts.write_bytes(original)
    assert code == 3 and "texts.txt" in out, out
    # One line says why, after the stage's own output; Prefect's console
    # lines about it are one line each, without their tracebacks. DVC stops
    # before the command runs, and the line says it was DVC.
    error = re.search(r"^error: the lifecycle failed: DVC could not reproduce stage 'compress' \(dvc repro exited "
                      r"with \d+\): \[Errno 2\] No such file or directory: .*\(its output is above\)$", out, re.M)
    assert error and "texts.txt" in error.group(0), out
    assert "Traceback" not in out, out

    # A stage that crashes (undecodable input): its own traceback, once.
    texts.write_bytes(b"\xff\xfe not utf-8\n")
    try:
        code, out = run_cli(project, harness, "run")
    finally:
        texts.write_bytes(original)
    assert code == 3 and "stage 'compress' failed" in out and "UnicodeDecodeError" in out, out
    error = re.search(r"^error: the lifecycle failed: stage 'compress' failed \(its command exited with 1\): "
                      r".*UnicodeDecodeError: .*\(its output is above\)$", out, re.M)
    assert error, out
    assert out.count("Traceback (most recent call last)") == out.count("> python -m stages.compress"), out
    assert reg.alias() == before

    # A deploy stage that exits 0 and writes its record, yet deploys nothing,
    # even when forced (a broken deploy command).
    dvc_yaml = project / "dvc.yaml"
    good = dvc_yaml.read_text()
    (project / "fake_deploy.py").write_text(
        "import pathlib\npathlib.Path('deploy/deployment.json').write_text('{\"version\": \"v0099\"}')\n")
    dvc_yaml.write_text(good.replace("cmd: python -m stages.deploy", "cmd: python fake_deploy.py"))
    shutil.move(project / "registry", project / "registry.bak")
    try:
        code, out = run_cli(project, harness, "run")
    finally:
        dvc_yaml.write_text(good)
        (project / "fake_deploy.py").unlink()
        shutil.rmtree(project / "registry", ignore_errors=True)
        shutil.move(project / "registry.bak", project / "registry")
    assert code == 3 and "does not serve 'int8'" in out, out
    assert reg.alias() == before


def test_dvc_repro_typed_directly_keeps_telemetry_off_and_prefect_state_inside(project, deployed, tmp_path):
    """`dvc repro` without the CLI: the compress stage (the one that runs
    Prefect) keeps Prefect's state in the project, not in ~/.prefect, and its
    ephemeral server sends no telemetry."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "DO_NOT_TRACK", "DVC_", "ITERATIVE_", "HF_", "TRANSFORMERS_"))}
    env["HOME"] = str(home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    db = project / ".prefect" / "prefect.db"
    before = db.stat().st_mtime if db.exists() else 0.0
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "compress"],
                          cwd=project, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Running stage 'compress'" in out
    assert not (home / ".prefect").exists()
    assert db.is_file() and db.stat().st_mtime > before
    assert "telemetry" not in out.lower()


def test_frontier_report_through_dvc(project, deployed):
    """`dvc repro frontier` after the lifecycle: baseline, report, plot, dvc plots."""
    from shrinkflow.dvcrun import offline_env

    # `deployed` left a tiny teacher and candidates in the project.
    assert (project / "models" / "teacher").is_dir()
    env = offline_env()
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "frontier"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Running stage 'small_direct'" in proc.stdout and "Running stage 'frontier'" in proc.stdout
    assert "Running stage 'train'" not in proc.stdout  # the kept teacher is reused
    md = (project / "reports" / "frontier.md").read_text()
    assert "## Verdict" in md and "small-direct-vocab-int8" in md and "magnitude_50" in md
    assert (project / "reports" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((project / "metrics" / "frontier.json").read_text())
    assert set(doc["robustness"]) == {"teacher (large)", "small-direct"}
    assert {r["key"] for r in doc["verdict"]} == {"latency_ms_p95_b1", "size_mb"}
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=project, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "frontier.png" in shown.stdout


def test_schedule_fires_runs_by_itself_and_stops_cleanly(project, deployed):
    """`shrinkflow schedule --interval 5` with no PREFECT_API_URL, as in a
    fresh clone: it starts a local Prefect server with its scheduler, and the
    scheduler (not the test) creates the runs. Two must complete; SIGTERM then
    stops the runner and the server, leaving no process behind."""
    import time

    import httpx

    code, out = run_cli(project, None, "schedule", "--cron", "not a cron")
    assert code == 2 and "not a valid cron expression" in out
    code, out = run_cli(project, None, "schedule", "--cron", "0 3 * * *", "--interval", "5")
    assert code == 2 and "exactly one of --cron or --interval" in out
    code, out = run_cli(project, None, "schedule", "--monitor-cron", "every day")
    assert code == 2 and "--monitor-cron 'every day' is not a valid cron expression" in out

    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(project / ".prefect")
    # The server's scheduler looks for deployments to schedule every 60 s by default: one created just
    # after a loop waited up to a minute for its first runs (this test took 56-151 s). Every 5 s here;
    # the scheduler, not the test, still creates the runs (asserted below).
    env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "5"
    # and the runner looks for due runs every 2 s, not 10 (each of the three runs waited for it)
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = "2"
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "schedule", "--interval", "5",
                             "--monitor-interval", "7", "--name", "e2e"],
                            cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        api, lines = wait_for_line(proc, r"\(API (http://127\.0\.0\.1:\d+/api)\)", "schedule")

        def runs(flow_name):
            r = httpx.post(f"{api}/flow_runs/filter", json={
                "deployments": {"name": {"any_": ["e2e"]}}, "flows": {"name": {"any_": [flow_name]}},
                "sort": "EXPECTED_START_TIME_ASC"}, timeout=10)
            r.raise_for_status()
            return r.json()

        def finished(flow_name):
            return [r for r in runs(flow_name) if r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]

        deadline = time.time() + 300
        done, monitored = [], []
        while time.time() < deadline and (len(done) < 2 or len(monitored) < 1):
            time.sleep(3)
            assert proc.poll() is None, "".join(lines)
            done, monitored = finished("shrinkflow-lifecycle"), finished("shrinkflow-monitor")
        assert len(done) >= 2 and monitored, (
            f"runs: {[(r['name'], r['state_type']) for r in runs('shrinkflow-lifecycle') + runs('shrinkflow-monitor')]}"
            "\n" + "".join(lines)[-4000:])
        # created by the scheduler, not by hand, each deployment on its own schedule
        assert all(r["auto_scheduled"] for r in done + monitored)
        assert all(r["state_type"] == "COMPLETED" for r in done + monitored), \
            [r["state_name"] for r in done + monitored]
    finally:
        terminate_group(proc, 90)
    port = int(api.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/health", timeout=2)
    leftovers = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"--port {port}" in cmd or (str(project) in cmd and "flows.cli" in cmd):
                leftovers.append(cmd)
    assert not leftovers, leftovers
    assert "stopped the local Prefect server" in "".join(lines)


def test_monitor_finds_degradation_and_recompresses_from_the_kept_teacher(project, harness, deployed):
    """Production text (product reviews) with feedback saying the model is
    wrong: `shrinkflow monitor` writes the reports, decides recompress, and
    the re-compression flow runs through DVC on the window (train skipped)
    and gates on the held-out window. Production is the int8 teacher, which
    the re-compression rebuilds with the very same files: it wins, and
    production is kept, not promoted again as a copy of itself. The window
    is DVC-pinned and restorable. The same window never triggers twice. (A
    re-compression that deploys, with the window in the new version's
    lineage: tests/test_e2e_warm_start.py.)"""
    import uuid

    import pandas as pd

    from monitoring.evidently_reports import softmax_positive
    from shrinkflow.predlog import Prediction, PredictionLog, utc_now
    from shrinkflow.registry import Registry
    from shrinkflow.predictors import load_predictor
    from shrinkflow.files import content_hash, file_hashes
    from shrinkflow.window import restore_window

    reg = Registry(project / "registry")
    before, versions = reg.alias(), reg.versions()
    params = yaml.safe_load((project / "params.yaml").read_text())
    # The feedback labels below contradict the teacher too: the retrain rule
    # (tests/test_e2e_warm_start.py) is kept from firing, this test is the
    # re-compression's.
    params["monitor"].update({"min_window_rows": 40, "shadow_sample_rows": 50, "min_feedback_labels": 20,
                              "min_recompress_rows": 20, "max_teacher_feedback_drop": 1.0})
    # The window gate against production: production is the int8 candidate the
    # re-compression rebuilds (the same files, from the candidate cache: int8
    # reads no text), so validate measures it once, as int8, and its agreement
    # is the baseline: int8's gain over production is exactly 0, the min gain.
    # (The tiny per-channel int8 agrees with its teacher on every text tried,
    # so the floor is met too: the gain route's boundaries are unit-tested.)
    params["validate"]["gates"].update({"min_window_agreement": 0.999, "min_window_agreement_gain": 0.0})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert content_hash(file_hashes(project / "models/candidates/int8")) == reg.manifest(before)["content_hash"]
    texts = pd.read_parquet(project / "data/prepared/shifted.parquet")["text"].tolist() + \
        pd.read_parquet(project / "data/prepared/test.parquet")["text"].tolist()[:30]
    served = load_predictor(reg.load().path, threads=1)
    probs = softmax_positive(served.predict_logits(texts))
    log = PredictionLog(project / params["serve"]["log_path"]).open()
    rows = [Prediction(uuid.uuid4().hex, utc_now(), before, t, [1 - p, p], int(p >= 0.5), 2.0)
            for t, p in zip(texts, probs)]
    log.append(rows)
    for r in rows[:25]:  # users say the model got these wrong
        log.add_feedback(r.prediction_id, 1 - r.label)
    teacher_mtime = (project / "models/teacher/model.safetensors").stat().st_mtime_ns
    train_lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"]

    # A report-only run says recompress but acts on nothing, so it starts no
    # cooldown and no dedup: the real run right after it still acts.
    code, out = run_cli(project, harness, "monitor", "--report-only")
    assert code == 0 and "verdict: recompress (not acted on" in out, out[-4000:]
    # the flow's log record (what Prefect's UI shows) holds every rule's figure, not only the first
    record = out[out.index("- monitor: recompress"):].split("verdict:")[0]
    assert "  - feedback_accuracy: FIRED" in record and "  - text_drift: " in record, out[-4000:]
    assert reg.alias() == before
    # SIGTERM (as `timeout`, systemd or `docker stop` send it) while the re-compression runs: the
    # window is not spent. A helper's finding: inside the flow run Prefect turns SIGTERM into its
    # TerminationSignal, not a KeyboardInterrupt, so the window stayed acted on and the next run
    # said "already triggered" (and the cooldown held every later window back).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PREFECT_API_URL=harness, PREFECT_HOME=str(project / ".prefect"))
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "monitor"], cwd=project, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _, lines = wait_for_line(proc, r"Running stage '(compress)'", "the acting monitor")
    code = terminate_group(proc, timeout_s=120)
    time.sleep(0.5)   # wait_for_line's thread drains the rest of the output
    out = "".join(lines)
    assert code == 130, out[-4000:]   # interrupted (docs/exit-codes.md)
    assert "the recompress was interrupted before it moved production: recorded as not acted on" in out, out[-4000:]
    assert reg.alias() == before and reg.versions() == versions
    acted = [json.loads(line)["acted"] for line in (project / ".shrinkflow/monitor/decisions.jsonl")
             .read_text().splitlines()]
    assert acted[-1] is False, acted
    code, out = run_cli(project, harness, "monitor")
    assert code == 1, out[-4000:]  # ExitCode.REFUSED: the re-compression deployed nothing (production kept)
    assert "verdict: recompress" in out and "feedback_accuracy: FIRED" in out, out[-4000:]
    assert "not acted on" not in out and "cooldown" not in out
    assert "Running stage 'train'" not in out and "Running stage 'compress'" in out
    assert f"warm start: production {before} keeps no distilled student" in out, out[-4000:]
    # production is the int8 candidate the re-compression rebuilt with the
    # very same files: it won, so production is kept, not promoted again as
    # a copy of itself
    assert reg.alias() == before and reg.versions() == versions, out[-4000:]
    assert f"re-compression: KEPT production {before}" in out and "nothing was promoted" in out, out[-4000:]
    # the kept teacher was reused, not retrained
    assert (project / "models/teacher/model.safetensors").stat().st_mtime_ns == teacher_mtime
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"] == train_lock
    deployment = json.loads((project / "deploy/deployment.json").read_text())
    assert deployment["kept"] is True and deployment["version"] == before, deployment
    assert "rebuilt as 'int8' with the very same files" in deployment["reason"], deployment

    # the window the candidates were gated on, DVC-pinned and restorable
    window = json.loads((project / "data/unlabelled/window.json").read_text())
    assert window["monitor_flow_run"] and "feedback_accuracy" in window["triggers"]
    assert window["rows"] == len(rows) and window["rows_distill"] + window["rows_heldout"] == len(set(texts))
    # the console says what it distilled and held out, and where the texts are
    assert (f"its texts: {window['rows_distill']} distinct distilled, {window['rows_heldout']} held out "
            f"for the window gates, of the newest {window['corpus_rows']} logged rows") in out, out[-4000:]
    assert f"data/windows/{window['texts_md5']}.txt" in out
    restored = restore_window(project, window["texts_md5"], project / "restored.txt")
    assert restored.read_text() == (project / "data/unlabelled/texts.txt").read_text()
    assert (project / "data/windows.dvc").is_file()
    # gated against production: both figures in the gate report
    assert window["production_version"] == before
    gates = json.loads((project / "reports/gates.json").read_text())
    assert gates["production"] == before and gates["selected"] == "int8"
    floor = gates["candidates"]["int8"]["gates"]["min_window_agreement"]
    gain = gates["candidates"]["int8"]["gates"]["min_window_agreement_gain"]
    assert floor["threshold"] == 0.999 and gain["threshold"] == 0.0 and gain["value"] == 0 and gain["passed"]
    assert f"against production {before}'s {floor['value']:.4g}" in gain["note"]
    assert "production" not in gates["candidates"]  # the same files as int8: measured once
    md = (project / "reports/gates.md").read_text()
    assert "min_window_agreement_gain" in md and f"production {before} was measured" in md
    assert f"**Production {before} selected** (rebuilt as 'int8'" in md and "promotes it" not in md

    # reports on disk, the index lists the run with its verdict
    index = (project / "monitoring/reports/index.html").read_text()
    assert ">recompress</b>" in index and "report.html" in index and "(interrupted: not acted on)" in index
    # three runs: the report-only one, the interrupted one, then the one that acted (names sort by time)
    run_dirs = sorted(d for d in (project / "monitoring/reports").iterdir() if d.is_dir())
    assert len(run_dirs) == 3 and all((d / "report.html").is_file() for d in run_dirs)
    # the policy counted the texts the re-compression read: the acting run's summary
    summary = json.loads((run_dirs[2] / "summary.json").read_text())["window"]
    assert (summary["corpus_rows"], summary["distill_texts"], summary["heldout_texts"]) == (
        window["corpus_rows"], window["rows_distill"], window["rows_heldout"])
    decisions = [json.loads((d / "decision.json").read_text()) for d in run_dirs]
    assert [(d["action"], d["acted"]) for d in decisions] == [("recompress", False), ("recompress", False),
                                                              ("recompress", True)]
    assert decisions[1]["recompress"] == {"outcome": "interrupted"}   # the run's record says what happened
    # the acting run records what its re-compression did, with the figures
    rec = decisions[2]["recompress"]
    assert (rec["outcome"], rec["deployed_version"], rec["kept_version"], rec["production_version"]) == (
        "kept", None, before, before)
    assert rec["candidates"] == {"int8": {"passed": True, "failed": {}}}

    # the Prefect artifact: verdict, figures, reasons, links to the served reports
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def monitor_artifacts(key: str = "shrinkflow-monitor"):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    arts = asyncio.run(monitor_artifacts())
    assert any("# Monitor: **recompress**" in (a.data or "") and "feedback_accuracy: FIRED" in (a.data or "")
               and f"/reports/{run_dirs[2].name}/report.html" in (a.data or "") for a in arts)
    arts = asyncio.run(monitor_artifacts("shrinkflow-recompress"))
    assert any(f"**Kept production {before}**" in (a.data or "")
               and "| int8 | every gate passed |" in (a.data or "") for a in arts)

    # the same window again: not a second re-compression
    code, out = run_cli(project, harness, "monitor")
    assert code == 0 and "verdict: warn" in out and "already triggered" in out, out[-3000:]
    assert reg.alias() == before

    # A plain run with the window still staged: production stays a candidate, and its copy is
    # already the current version, so validate's inputs are unchanged and every stage is skipped.
    # (A helper's finding: plain runs removed the copy, so the window's candidates were gated
    # without production, and one deployed the int8 teacher, 1.5x slower, over a student.)
    code, out = run_cli(project, harness, "run")
    assert code == 0, out[-4000:]
    assert set(stages_line(out).values()) == {"skipped"}, out[-4000:]
    assert f"KEPT production {before}: " in out and "NOT DEPLOYED" not in out, out[-4000:]
    assert reg.alias() == before and reg.versions() == versions
    assert json.loads((project / "data/unlabelled/production/version.json").read_text())["version"] == before
