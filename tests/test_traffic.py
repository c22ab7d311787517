"""`shrinkflow simulate-traffic` against a real `shrinkflow serve` (issue 14,
item 8), and the one split of the shifted domain into a traffic pool and a
recovery set.

The server is the real CLI under uvicorn on a free loopback port, serving a
tiny real model from a temporary registry; the texts come from the real
pinned archive (tweets) and the real test split of a small slice of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from shrinkflow.config import Candidate, Gates
from shrinkflow.gates import evaluate_gates
from shrinkflow.predlog import PredictionLog
from shrinkflow.registry import Registry
from shrinkflow.traffic import (feedback_choice, feedback_count, shifted_part, shifted_split, shifted_texts,
                                traffic_order, traffic_pool)
from tests.conftest import PROJECT_ROOT
from tests.test_serving import Server, free_port, record  # `shrinkflow serve` as a user starts it

TOKEN = "traffic-token"
PASS = evaluate_gates("c", {"accuracy": 0.85, "latency_ms_p95_b1": 1.0, "size_mb": 1.0},
                      {"accuracy": 0.85, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}, Gates())


# ------------------------------------------------------- the split, once
def test_the_tweets_are_cut_once_into_a_pool_and_a_recovery_set(raw_archive):
    everything = shifted_texts(raw_archive)
    parts = shifted_split(raw_archive)
    pool, recovery = parts["pool"], parts["recovery"]
    assert (len(everything), len(pool), len(recovery)) == (4136, 2760, 1376)
    assert round(float(pool["label"].mean()), 3) == 0.683 and round(float(recovery["label"].mean()), 3) == 0.714
    assert not set(pool["text"]) & set(recovery["text"])
    assert sorted(pool["text"].tolist() + recovery["text"].tolist()) == sorted(everything["text"])
    # Decided by each text alone: any subset, in any order, gets the same sides;
    # case and spacing do not move a text across.
    sample = everything.sample(300, random_state=1)
    assert [shifted_part(t) for t in sample["text"]] == \
           ["recovery" if t in set(recovery["text"]) else "pool" for t in sample["text"]]
    t = recovery["text"].iloc[0]
    assert shifted_part("  " + t.upper().replace(" ", "   ") + " ") == "recovery"


def test_order_cycles_a_small_pool_and_feedback_counts_are_exact():
    pool = pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    rows, passes = traffic_order(pool, 7, seed=0)
    assert passes == 3 and len(rows) == 7
    assert sorted(rows["text"].iloc[:3]) == sorted(rows["text"].iloc[3:6]) == ["a", "b", "c"]
    assert traffic_order(pool, 7, seed=0)[0].equals(rows)  # seeded
    with pytest.raises(ValueError):
        traffic_order(pool, 0, seed=0)
    assert [feedback_count(25, 0.1), feedback_count(40, 0.25), feedback_count(7, 0.0), feedback_count(7, 1.0),
            feedback_count(3, 0.5)] == [3, 10, 0, 7, 2]
    chosen = feedback_choice(40, 0.25, seed=5)
    assert len(chosen) == 10 == len(set(chosen)) and list(chosen) == sorted(chosen)
    assert list(feedback_choice(40, 0.25, seed=5)) == list(chosen)


# ------------------------------------------------- against a real server
@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_teacher_dir, raw_archive, small_splits):
    from shrinkflow.compress import apply_recipe

    root = tmp_path_factory.mktemp("traffic") / "project"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["serve"].update({"reload_poll_s": 0.5, "threads": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data/raw").mkdir(parents=True)
    shutil.copy(raw_archive, root / "data/raw/source.tar.gz")
    (root / "data/prepared").mkdir(parents=True)
    small_splits["test"].to_parquet(root / "data/prepared/test.parquet")
    model = apply_recipe(tiny_teacher_dir, Candidate(name="fp32"), tmp_path_factory.mktemp("traffic-model") / "fp32",
                         progress=False)
    Registry(root / "registry").promote(model, PASS, record("fp32"))
    return root


@pytest.fixture(scope="module")
def server(project):
    srv = Server(project, free_port(), token=TOKEN, output=project / "serve.out")
    yield srv
    srv.stop()


def simulate(root: Path, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("SHRINKFLOW_API_TOKEN", None)
    if token:
        env["SHRINKFLOW_API_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "flows.cli", "simulate-traffic", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def new_rows(root: Path, before: set) -> pd.DataFrame:
    df = PredictionLog(root / ".shrinkflow" / "predictions.db").window()
    return df[~df["prediction_id"].isin(before)]


def logged_ids(root: Path) -> set:
    path = root / ".shrinkflow" / "predictions.db"
    return set(PredictionLog(path).window()["prediction_id"]) if path.exists() else set()


def test_shifted_traffic_comes_from_the_pool_with_the_seeded_share_of_true_labels(server, project, raw_archive):
    parts = shifted_split(raw_archive)
    truth = dict(zip(parts["pool"]["text"], parts["pool"]["label"]))
    recovery = set(parts["recovery"]["text"])
    before = logged_ids(project)
    proc = simulate(project, "--domain", "shifted", "--n", "45", "--feedback-rate", "0.2", "--seed", "3",
                    "--concurrency", "4", "--url", server.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = new_rows(project, before)
    assert len(rows) == 45
    assert set(rows["text"]) <= set(truth) and not set(rows["text"]) & recovery
    labelled = rows[rows["feedback_label"].notna()]
    assert len(labelled) == 9  # round(0.2 * 45), exactly
    assert [int(y) for y in labelled["feedback_label"]] == [int(truth[t]) for t in labelled["text"]]
    assert "predict: 45 requests; by status 200: 45" in proc.stdout
    assert "feedback: 9 labels posted (20.0% of 45 answered predictions; asked 20.0%)" in proc.stdout
    assert "\r" not in proc.stderr   # no progress bar piled up on one line when stderr is not a terminal
    # the same seed sends the same texts in the same order
    rows_again = traffic_order(traffic_pool("shifted", project), 45, seed=3)[0]
    assert sorted(rows["text"]) == sorted(rows_again["text"])


def test_in_domain_traffic_is_the_test_split_cycled_when_n_is_larger(server, project, small_splits):
    test = small_splits["test"]
    truth = dict(zip(test["text"], test["label"]))
    n = len(test) + 7
    before = logged_ids(project)
    # the default URL: serve.host and serve.port from params
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["serve"]["port"] = server.port
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = simulate(project, "--domain", "in", "--n", str(n), "--feedback-rate", "0.5", "--seed", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"to {server.url}" in proc.stdout
    assert f"n is larger than the pool, so it is cycled (2 passes)" in proc.stdout
    rows = new_rows(project, before)
    assert len(rows) == n and set(rows["text"]) == set(truth)
    labelled = rows[rows["feedback_label"].notna()]
    assert len(labelled) == feedback_count(n, 0.5)
    assert [int(y) for y in labelled["feedback_label"]] == [int(truth[t]) for t in labelled["text"]]


def test_without_the_token_every_request_fails_and_it_exits_1(server, project):
    before = logged_ids(project)
    proc = simulate(project, "--domain", "shifted", "--n", "5", "--feedback-rate", "1", "--url", server.url,
                    token=None)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "by status 401: 5" in proc.stdout and "401: set SHRINKFLOW_API_TOKEN" in proc.stderr
    assert "feedback: 0 labels posted" in proc.stdout
    assert len(new_rows(project, before)) == 0


def test_an_unreachable_server_exits_3_naming_the_url(project):
    url = f"http://127.0.0.1:{free_port()}"
    proc = simulate(project, "--domain", "shifted", "--n", "5", "--url", url)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert f"cannot reach a shrinkflow server at {url}" in proc.stderr


@pytest.mark.parametrize("args", [["--n", "0"], ["--n", "-3"], ["--n", "5", "--feedback-rate", "1.5"],
                                  ["--n", "5", "--domain", "tweets"]])
def test_bad_usage_exits_2(project, args):
    if "--domain" not in args:
        args = ["--domain", "in", *args]
    proc = simulate(project, *args, "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2, proc.stdout + proc.stderr


@pytest.mark.parametrize("url", ["not-a-url", "localhost:8765"])   # no scheme; a host read as the scheme
def test_a_url_that_is_not_an_http_url_is_bad_usage_not_an_unreachable_server(project, url):
    proc = simulate(project, "--domain", "in", "--n", "5", "--url", url)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--url {url!r} is not" in proc.stderr and "cannot reach" not in proc.stderr


def test_shifted_traffic_of_a_task_without_shifted_data_exits_2_saying_what_to_set(tmp_path):
    """A user's task with no ``shifted_path`` has an empty shifted split:
    there is nothing to send, and the message says which param fills it."""
    root = tmp_path / "project"
    (root / "data/prepared").mkdir(parents=True)
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["data"]["source"] = {"kind": "files", "path": "data/user/tickets.csv"}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype="int64")}).to_parquet(
        root / "data/prepared/shifted.parquet", index=False)
    (root / "data/prepared/labels.json").write_text('{"labels": ["billing", "bug", "sales"]}\n')
    proc = simulate(root, "--domain", "shifted", "--n", "5", "--url", "http://127.0.0.1:9")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no shifted data; set data.source.shifted_path" in proc.stderr


def test_feedback_is_refused_before_anything_is_sent_when_the_served_version_names_other_classes(server, project):
    """A helper's finding: after a rollback across a change of the label
    set, simulate-traffic posted today's names (data/prepared/labels.json),
    which the answering version stored as its own class of that name."""
    from shrinkflow.paths import LABELS_JSON

    labels = project / LABELS_JSON
    assert not labels.exists()          # the built-in task: the served version's two names
    labels.write_text('{"labels": ["negative", "neutral"]}\n')   # a set that shares a name with the served one
    try:
        before = logged_ids(project)
        proc = simulate(project, "--domain", "shifted", "--n", "5", "--feedback-rate", "1", "--url", server.url)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "whose classes are ['negative', 'positive'], but this traffic's labels are ['negative', " \
               "'neutral']" in proc.stderr and "Nothing was sent" in proc.stderr
        assert len(new_rows(project, before)) == 0
        # the same names in another order: posted by name, so each is stored as the class it names
        labels.write_text('{"labels": ["positive", "negative"]}\n')
        proc = simulate(project, "--domain", "shifted", "--n", "4", "--feedback-rate", "1", "--url", server.url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(new_rows(project, before)) == 4
        # predictions alone carry no label: sent
        proc = simulate(project, "--domain", "shifted", "--n", "5", "--url", server.url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(new_rows(project, before)) == 9
    finally:
        labels.unlink()
