"""`dvc metrics show` shows a few figures per stage, not every measurement.

Each stage's full measurements stay in plain outs (metrics/<stage>.json,
reports/gates.json); dvc.yaml declares only metrics/headline/*.json as
metrics (shrinkflow.headline). The oracle is DVC itself: the project's real
dvc.yaml, in a scratch DVC repo, over the headline files built from this
checkout's committed measurements of a real run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from shrinkflow import paths
from shrinkflow.artifacts import ValidationReport
from shrinkflow.headline import frontier_headline, validate_headline, write_all
from shrinkflow.files import read_json
from tests.conftest import PROJECT_ROOT

FULL = (paths.METRICS_DATA, paths.METRICS_TRAIN, paths.METRICS_COMPRESS, paths.METRICS_VALIDATE,
        paths.METRICS_SMALL_DIRECT, paths.METRICS_FRONTIER, paths.GATES_JSON)
HEADLINES = (paths.HEADLINE_DATA, paths.HEADLINE_TRAIN, paths.HEADLINE_VALIDATE, paths.HEADLINE_SMALL_DIRECT,
             paths.HEADLINE_FRONTIER)


def scratch_repo(tmp_path: Path, dvc_yaml: str) -> Path:
    """A DVC repo holding this checkout's full measurement files, their
    headline files (built by write_all) and the given dvc.yaml."""
    root = tmp_path / "repo"
    for rel in FULL:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / rel, root / rel)
    assert len(write_all(root)) == len(HEADLINES)
    (root / "dvc.yaml").write_text(dvc_yaml)
    dvc(root, "init", "--no-scm", "-q")
    return root


def dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_dvc_metrics_show_is_one_short_table_of_the_headline_files(tmp_path):
    root = scratch_repo(tmp_path, (PROJECT_ROOT / "dvc.yaml").read_text())
    table = dvc(root, "metrics", "show").splitlines()
    width = max(len(line) for line in table)
    assert width <= 200, f"`dvc metrics show` is {width} characters wide:\n" + "\n".join(table)
    rows = {line.split()[0] for line in table[1:]}
    assert rows == {str(p) for p in HEADLINES}
    columns = table[0].split()[1:]
    assert len(columns) <= 12 and {"accuracy", "accuracy_drop", "speedup_p95_b1", "margin_latency"} <= set(columns)


def test_the_width_check_fails_on_the_full_files_as_metrics(tmp_path):
    # The declaration before issue 16: every full file as a metric.
    old = {"stages": {"s": {"cmd": "true", "metrics": [{str(p): {"cache": False}} for p in FULL]}}}
    root = scratch_repo(tmp_path, json.dumps(old))
    table = dvc(root, "metrics", "show").splitlines()
    assert max(len(line) for line in table) > 2000


def test_the_validate_headline_is_the_chosen_candidate_on_test():
    metrics = read_json(PROJECT_ROOT / paths.METRICS_VALIDATE)
    report = ValidationReport.model_validate(metrics)
    head = validate_headline(report)
    chosen = metrics["confirmation"]["candidate"]
    test = metrics["confirmation"]["metrics"]
    assert head == {"accuracy": test["accuracy"], "accuracy_drop": test["accuracy_drop"],
                    "latency_ms_p95_b1": metrics["candidates"][chosen]["latency_ms_p95_b1"],
                    "speedup_p95_b1": metrics["candidates"][chosen]["speedup_p95_b1"],
                    "size_mb": metrics["candidates"][chosen]["size_mb"]}
    # the sign the tool uses everywhere: teacher - candidate, positive = worse
    teacher = metrics["confirmation"]["teacher"]["accuracy"]
    assert abs(head["accuracy_drop"] - (teacher - head["accuracy"])) < 1e-5
    assert validate_headline(report.model_copy(update={"confirmation": None})) == {}


def test_a_frontier_budget_without_a_match_is_left_out():
    rows = [{"key": "latency_ms_p95_b1", "winner": None, "baseline": "sd"},
            {"key": "size_mb", "winner": "student", "points_in_domain": 5.21}]
    assert frontier_headline(rows) == {"margin_size": 5.21}


def test_the_committed_headline_files_match_the_committed_measurements(tmp_path):
    for rel in FULL:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT_ROOT / rel, tmp_path / rel)
    write_all(tmp_path)
    for rel in HEADLINES:
        assert read_json(PROJECT_ROOT / rel) == read_json(tmp_path / rel), rel
