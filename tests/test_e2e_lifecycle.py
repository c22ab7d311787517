"""End to end: the whole lifecycle through `shrinkflow run`, in a project of
its own (a temporary git+DVC copy of this one). Its own file, so that the
two workers run it beside tests/test_e2e.py's shared project.

Real Prefect (test harness), real DVC (a git repo with the project's own
dvc.yaml and local remote), real data (a slice), a tiny real model.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.e2e import METERED, TINY, copy_project, deep_merge, run_cli, stages_line, status_json, write_params

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# The tiny params with codecarbon on: this test checks the energy figures.
TINY = deep_merge(TINY, METERED)


@pytest.fixture()
def harness(prefect_api):
    return prefect_api


@pytest.fixture()
def fresh_project(tmp_path) -> Path:
    """A project of its own, nothing run in it yet."""
    return copy_project(tmp_path / "project")


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
    # the baselines outside the lifecycle read the teacher train just rebuilt: said, so
    # that `dvc status` does not look like a failure
    assert "not part of the lifecycle, now stale: small_direct, frontier" in out
    # what to commit to version the run: the tracked files it changed, by top folder
    hint = re.search(r"^to version this run: git add ([^&]+) && git commit", out, re.M)
    assert hint and {"dvc.lock", "metrics", "reports"} <= set(hint.group(1).split()), out[-3000:]

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
    assert set(m["agreement"]) == {"val", "test", "reference", "shifted", "unlabelled", "window_heldout",
                                   "feedback_heldout"}
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
    assert "now stale" not in out  # train skipped: nothing to say (and no DVC call)
    # one `dvc status` found every stage up to date: no stage's `dvc repro` started
    assert out.count("skipped (up to date: dvc status)") == 6 and "Data and pipelines are up to date" not in out, out

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
    assert out.count("skipped (up to date: dvc status)") == 3, out   # the three before compress
    assert reg.alias() == "v0002" and reg.versions() == ["v0001", "v0002"]

    # 4b. A run stopped after deploy moved production, before DVC recorded the
    #     stage (dvc.lock without it; a helper's finding): the next run re-runs
    #     deploy, which finds v0002 already is this deploy and stores no copy.
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    del lock["stages"]["deploy"]
    (project / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    code, out = run_cli(project, harness, "run")
    assert code == 0, out
    assert stages_line(out)["deploy"] == "ran" and stages_line(out)["validate"] == "skipped", out[-3000:]
    assert "is production as v0002 already" in out, out[-3000:]
    assert reg.versions() == ["v0001", "v0002"] and reg.alias() == "v0002"
    assert json.loads((project / "deploy/deployment.json").read_text())["version"] == "v0002"

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
    # 5b. Nothing changed, but --revalidate times and gates the candidates
    #     again (as after a timing refused on a busy machine); as in 3, a
    #     plain run would skip validate.
    code, out = run_cli(project, harness, "run", "--revalidate")
    assert code == 1 and re.search(r"min_accuracy FAILED: .*margin -0\.\d+", out), out
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
    # the --revalidate run's stages table: the stages skipped on the run's `dvc status` ran no process,
    # so they show no seconds; validate shows its repro's
    assert any("| fetch | skipped (up to date: dvc status) | - |" in (a.data or "")
               and re.search(r"^\| validate \| ran \| \d+\.\d \|$", a.data or "", re.M) for a in arts), [
        (a.data or "")[-400:] for a in arts]
    # runs that deployed also carry the cost and return of compressing
    assert any("## Cost and return of compressing" in (a.data or "") and "break-even" in (a.data or "")
               for a in arts)
