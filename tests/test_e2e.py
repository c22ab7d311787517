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
from pathlib import Path

import pytest
import yaml

from tests.conftest import PROJECT_ROOT, wait_for_line

# Each runs the real CLI, Prefect and DVC on a temporary project: minutes in all.
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TINY = {
    "data": {"max_rows": 600, "max_shifted_rows": 50},
    "train": {"model": {"kind": "random", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                        "intermediate_size": 64},
              "epochs": 6, "batch_size": 16, "learning_rate": 3e-3, "max_seq_len": 32, "threads": 1},
    "frontier": {"small_direct": {"num_layers": 1, "epochs": 2, "learning_rate": 3e-3},
                 "robustness_sparsities": [0.5]},
    # int8 only: the default's student keeps teacher layers 0, 2, 4, which a
    # 2-layer tiny teacher does not have (distillation is tested in test_methods).
    "compress": {"candidates": [{"name": "int8", "recipe": [{"method": "quantize"}]}]},
    "validate": {"gates": {"min_accuracy": 0.0, "max_accuracy_drop": 0.5, "max_latency_ms_p95_b1": 1000.0,
                           "max_size_mb": 100.0, "min_speedup": 0.2},
                 "latency": {"threads": 1, "warmup_iters": 2, "iters_b1": 10, "iters_b32": 3}},
}


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


@pytest.fixture(scope="module")
def harness(prefect_api):
    return prefect_api


def copy_project(dest: Path) -> Path:
    """A fresh git+DVC repo at ``dest`` holding the project's tracked and new files."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in listed:
        src = PROJECT_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "e2e copy"], cwd=dest, check=True)
    return dest


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """The module's shared project. Every test that needs a model in it asks
    for ``deployed``, which puts one there whatever ran before, so the tests
    pass in any order (pytest --random-order)."""
    return copy_project(tmp_path_factory.mktemp("e2e") / "project")


@pytest.fixture()
def fresh_project(tmp_path) -> Path:
    """A project of its own, nothing run in it yet."""
    return copy_project(tmp_path / "project")


def run_cli(project: Path, api_url: str | None, *args, extra_env: dict | None = None):
    """The real console entry point, in the project copy, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["PREFECT_HOME"] = str(project / ".prefect")
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def status_json(project: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "status", "--json"], cwd=project,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stages_line(output: str) -> dict[str, str]:
    line = re.search(r"^stages: (.*)$", output, re.M).group(1)
    return dict(kv.split("=") for kv in line.split(", "))


def write_params(path: Path, over: dict) -> Path:
    base = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    path.write_text(yaml.safe_dump(deep_merge(base, over), sort_keys=False))
    return path


def test_lifecycle_end_to_end(fresh_project, harness, tmp_path):
    import pandas as pd

    from shrinkflow.registry import Registry

    project = fresh_project
    # 1. Status before anything is deployed.
    assert status_json(project)["deployed"] is None

    # 2. First run, on a tiny params file given with --params: everything runs.
    tiny = write_params(tmp_path / "tiny.yaml", TINY)
    code, out = run_cli(project, harness, "run", "--params", str(tiny))
    assert code == 0, out
    assert stages_line(out) == {s: "ran" for s in ("fetch", "data", "train", "compress", "validate", "deploy")}
    assert "DEPLOYED v0001" in out

    doc = status_json(project)
    reg = Registry(project / "registry")
    dep = doc["deployed"]
    assert dep["version"] == reg.alias() == "v0001" and dep["integrity"] == "verified"
    for key in ("accuracy", "f1", "latency_ms_p50_b1", "latency_ms_p95_b1", "size_mb", "peak_rss_mb"):
        assert dep["metrics"][key] == reg.manifest("v0001")["metrics"][key]
        assert doc["teacher"]["metrics"][key] > 0
    # Selected on val; the reported figures are the test split's.
    validated = json.loads((project / "metrics/validate.json").read_text())
    conf = validated["confirmation"]
    test_rows = len(__import__("pandas").read_parquet(project / "data/prepared/test.parquet"))
    assert dep["metrics"]["split"] == "test" and dep["metrics"]["n"] == conf["metrics"]["n"] == test_rows
    assert dep["metrics"]["accuracy"] == conf["metrics"]["accuracy"]
    assert dep["selection_metrics"]["split"] == "val"
    assert dep["selection_metrics"]["accuracy"] == validated["candidates"]["int8"]["accuracy"]
    assert doc["teacher"]["metrics"]["accuracy"] == conf["teacher"]["accuracy"]
    assert dep["metrics"]["latency_ms_p95_b1"] == validated["candidates"]["int8"]["latency_ms_p95_b1"]
    m = dep["metrics"]
    assert m["accuracy_drop_ci_low"] <= m["accuracy_drop"] <= m["accuracy_drop_ci_high"]
    assert set(m["agreement"]) == {"val", "test", "reference", "shifted", "unlabelled", "window_heldout"}
    # the default window is empty: said, not faked, and no window gate below
    assert m["agreement"]["unlabelled"] is None and m["agreement"]["window_heldout"] is None
    assert set(dep["gates"]) == {"min_accuracy", "max_accuracy_drop", "max_latency_ms_p95_b1",
                                 "max_size_mb", "min_speedup", "max_batch_prob_diff"}
    assert all((g["passed"] or not g["enforced"]) and {"value", "threshold"} <= set(g) for g in dep["gates"].values())
    # batch invariance was measured on val; what it found decides how the version is served
    inv = validated["candidates"]["int8"]["batch_invariance"]
    batch = dep["gates"]["max_batch_prob_diff"]
    assert inv["rows"] == len(pd.read_parquet(project / "data/prepared/val.parquet"))
    assert batch["value"] == inv["max_prob_diff"] and batch["threshold"] == 1e-4
    assert dep["serving"] == reg.manifest("v0001")["serving"] == {
        "per_row": not batch["passed"], "max_batch_prob_diff": inv["max_prob_diff"], "label_flips": inv["label_flips"]}
    assert inv["per_row"] is (not batch["passed"])
    # What was validated is what was deployed.
    assert reg.manifest("v0001")["files"] == validated["candidates"]["int8"]["files"]
    lin = dep["lineage"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert lin["git"]["commit"] == head
    assert lin["teacher_md5"] == next(o["md5"] for o in lock["train"]["outs"] if o["path"] == "models/teacher")
    assert lin["data_md5"] == {s: next(o["md5"] for o in lock["data"]["outs"]
                                       if o["path"] == f"data/prepared/{s}.parquet")
                               for s in ("train", "val", "test", "reference", "shifted")}
    assert len(lin["params_sha256"]) == 64
    assert lin["unlabelled_md5"] == next(d["md5"] for d in lock["compress"]["deps"]
                                         if d["path"] == "data/unlabelled/texts.txt")
    assert lin["libraries"]["torch"].startswith("2.13") and lin["libraries"]["onnxruntime"]
    assert lin["cpu"]
    assert set(lin["dvc_lock"]) == {"fetch", "data", "train", "compress", "validate"}
    assert dep["recipe"][0]["method"] == "quantize"
    # Cost and return, from what the stages metered (CPU time, codecarbon offline).
    roi = dep["roi"]
    train_compute = json.loads((project / "metrics/train.json").read_text())["compute"]
    built = json.loads((project / "metrics/compress.json").read_text())["candidates"]
    assert roi["train_cpu_seconds"] == round(train_compute["cpu_seconds"], 2) > 0
    assert train_compute["energy_kwh"] > 0 and train_compute["country_iso_code"] == "USA"
    assert roi["compress_cpu_seconds"] == round(built["int8"]["build_cpu_seconds"], 2) > 0
    for b in ("b1", "b32"):
        s = roi["serving"][b]
        assert s["deployed_cpu_ms_per_prediction"] == dep["metrics"][f"cpu_ms_per_prediction_{b}"] > 0
        assert s["teacher_cpu_ms_per_prediction"] == doc["teacher"]["metrics"][f"cpu_ms_per_prediction_{b}"]
        assert s["pays_back"] == (s["break_even_predictions"] is not None)
    status_text = run_cli(project, None, "status")[1]
    assert "cost and return of compressing" in status_text and "CPU-ms per prediction" in status_text
    md = (project / "reports/gates.md").read_text()
    assert "Selected 'int8' for deployment" in md and "Nothing deployed" not in md

    # 3. No change: every stage is skipped through DVC.
    code, out = run_cli(project, harness, "run")
    assert code == 0, out
    assert set(stages_line(out).values()) == {"skipped"}

    # 3b. The registry is lost (or this is a fresh clone): DVC sees nothing
    #     stale, but the flow notices production is missing and re-deploys.
    shutil.rmtree(project / "registry")
    code, out = run_cli(project, harness, "run")
    assert code == 0, out
    assert stages_line(out)["deploy"] == "ran" and stages_line(out)["train"] == "skipped"
    assert reg.alias() == "v0001" and status_json(project)["deployed"]["version"] == "v0001"

    # 4. A compress-only param change re-runs compress, validate and deploy only.
    write_params(project / "params.yaml", deep_merge(TINY, {"compress": {"candidates": [
        {"name": "int8", "recipe": [{"method": "quantize", "per_channel": True}]}]}}))
    code, out = run_cli(project, harness, "run")
    assert code == 0, out
    assert stages_line(out) == {"fetch": "skipped", "data": "skipped", "train": "skipped",
                                "compress": "ran", "validate": "ran", "deploy": "ran"}
    assert reg.alias() == "v0002" and reg.versions() == ["v0001", "v0002"]

    # 5. An impossible gate: exit 1 naming the gate and margin; v0002 keeps serving.
    write_params(project / "params.yaml", deep_merge(TINY, {
        "compress": {"candidates": [{"name": "int8", "recipe": [{"method": "quantize", "per_channel": True}]}]},
        "frontier": {"small_direct": {"num_layers": 1, "epochs": 2, "learning_rate": 3e-3},
                 "robustness_sparsities": [0.5]},
    "validate": {"gates": {"min_accuracy": 0.999}}}))
    code, out = run_cli(project, harness, "run")
    assert code == 1, out
    assert "NOT DEPLOYED" in out and re.search(r"min_accuracy FAILED: .*margin -0\.\d+", out)
    assert stages_line(out) == {"fetch": "skipped", "data": "skipped", "train": "skipped",
                                "compress": "skipped", "validate": "ran"}
    assert reg.alias() == "v0002"

    # 6. The Prefect run recorded the artifact with the gates table.
    from prefect.client.orchestration import get_client
    import asyncio

    async def latest_artifact():
        async with get_client() as client:
            from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["shrinkflow-lifecycle"])))
            return arts

    arts = asyncio.run(latest_artifact())
    assert arts and any("min_accuracy" in (a.data or "") and "**FAIL**" in (a.data or "") for a in arts)
    # runs that deployed also carry the cost and return of compressing
    assert any("## Cost and return of compressing" in (a.data or "") and "break-even" in (a.data or "")
               for a in arts)


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

    write_params(project / "params.yaml", DEPLOYABLE)
    reg = Registry(project / "registry")
    if reg.alias() is None:
        code, out = run_cli(project, harness, "run")
        assert code == 0, out[-4000:]
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
    assert code == 3 and "stage 'compress' failed" in out and "texts.txt" in out, out

    # A stage that crashes (undecodable input).
    texts.write_bytes(b"\xff\xfe not utf-8\n")
    try:
        code, out = run_cli(project, harness, "run")
    finally:
        texts.write_bytes(original)
    assert code == 3 and "stage 'compress' failed" in out and "UnicodeDecodeError" in out, out
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
    import signal
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
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
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
    the re-compression flow distils on the window through DVC (train
    skipped), gates on the held-out window, deploys, and records the window
    and the monitor run in the new version's lineage. The same window never
    triggers twice."""
    import uuid

    import pandas as pd

    from monitoring.evidently_reports import softmax_positive
    from shrinkflow.predlog import Prediction, PredictionLog, utc_now
    from shrinkflow.registry import Registry
    from shrinkflow.predictors import load_predictor
    from shrinkflow.window import restore_window

    reg = Registry(project / "registry")
    before = reg.alias()
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["monitor"].update({"min_window_rows": 40, "shadow_sample_rows": 50, "min_feedback_labels": 20})
    # The tiny model's window agreement is not what this test is about; the
    # gate's presence in the report is (its boundaries are unit-tested).
    params["validate"]["gates"]["min_window_agreement"] = 0.0
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    texts = pd.read_parquet(project / "data/prepared/shifted.parquet")["text"].tolist() + \
        pd.read_parquet(project / "data/prepared/test.parquet")["text"].tolist()[:30]
    probs = softmax_positive(load_predictor(reg.load().path, threads=1).predict_logits(texts))
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
    assert reg.alias() == before
    code, out = run_cli(project, harness, "monitor")
    assert code == 0, out[-4000:]
    assert "verdict: recompress" in out and "feedback_accuracy: FIRED" in out, out[-4000:]
    assert "not acted on" not in out and "cooldown" not in out
    assert "Running stage 'train'" not in out and "Running stage 'compress'" in out
    new = reg.alias()
    assert new != before and f"re-compression: DEPLOYED {new}" in out
    # the kept teacher was reused, not retrained
    assert (project / "models/teacher/model.safetensors").stat().st_mtime_ns == teacher_mtime
    assert yaml.safe_load((project / "dvc.lock").read_text())["stages"]["train"] == train_lock

    manifest = reg.manifest(new)
    window = manifest["lineage"]["window"]
    assert window["monitor_flow_run"] and "feedback_accuracy" in window["triggers"]
    assert window["rows"] == len(rows) and window["rows_distill"] + window["rows_heldout"] == len(set(texts))
    # lineage's unlabelled hash is the window DVC pinned, and it can be restored
    assert manifest["lineage"]["unlabelled_md5"] == window["texts_md5"]
    restored = restore_window(project, window["texts_md5"], project / "restored.txt")
    assert restored.read_text() == (project / "data/unlabelled/texts.txt").read_text()
    assert (project / "data/windows.dvc").is_file()
    assert "min_window_agreement" in manifest["gates"]
    code, out = run_cli(project, None, "window", new, "--out", str(project / "w.txt"))
    assert code == 0 and (project / "w.txt").read_text() == (project / "data/unlabelled/texts.txt").read_text()
    code, out = run_cli(project, None, "window", before, "--out", str(project / "w0.txt"))
    assert code == 4 and "was not re-compressed on a production window" in out  # ExitCode.NOTHING
    code, out = run_cli(project, None, "status")
    assert code == 0 and f"re-compressed on a production window: {window['rows_distill']} texts distilled" in out

    # reports on disk, the index lists the run with its verdict
    index = (project / "monitoring/reports/index.html").read_text()
    assert ">recompress</b>" in index and "report.html" in index
    # two runs: the report-only one, then the one that acted (names sort by time)
    run_dirs = sorted(d for d in (project / "monitoring/reports").iterdir() if d.is_dir())
    assert len(run_dirs) == 2 and all((d / "report.html").is_file() for d in run_dirs)
    decisions = [json.loads((d / "decision.json").read_text()) for d in run_dirs]
    assert [(d["action"], d["acted"]) for d in decisions] == [("recompress", False), ("recompress", True)]

    # the Prefect artifact: verdict, figures, reasons, links to the served reports
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def monitor_artifacts():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=["shrinkflow-monitor"])))

    arts = asyncio.run(monitor_artifacts())
    assert any("# Monitor: **recompress**" in (a.data or "") and "feedback_accuracy: FIRED" in (a.data or "")
               and f"/reports/{run_dirs[1].name}/report.html" in (a.data or "") for a in arts)

    # the same window again: not a second re-compression
    code, out = run_cli(project, harness, "monitor")
    assert code == 0 and "verdict: warn" in out and "already triggered" in out, out[-3000:]
    assert reg.alias() == new
