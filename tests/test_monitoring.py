"""Monitoring on real Evidently reports: a tiny real model, real data slices,
a real SQLite prediction log; the reports served by a real `shrinkflow
serve` and rendered by headless Chromium (Debian's package)."""

from __future__ import annotations

import json
import re
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from shrinkflow.config import MonitorParams
from shrinkflow.predlog import Prediction, PredictionLog, utc_now
from shrinkflow.registry import Registry
from tests.conftest import PROJECT_ROOT, chromium_dom
from tests.test_serving import PASS, Server, free_port, record

PARAMS = MonitorParams(shadow_sample_rows=40, min_window_rows=10)


def log_window(tmp: Path, model_dir: Path, texts: list[str], labels=None):
    """Predict ``texts`` with the model and log them as the server would."""
    from monitoring.evidently_reports import softmax_positive
    from shrinkflow.predictors import load_predictor

    probs = softmax_positive(load_predictor(model_dir, threads=1).predict_logits(texts))
    log = PredictionLog(tmp / f"{uuid.uuid4().hex}.db").open()
    rows = [Prediction(uuid.uuid4().hex, utc_now(), "v0001", t, [1 - p, p], int(p >= 0.5), 2.0)
            for t, p in zip(texts, probs)]
    log.append(rows)
    for r, y in zip(rows, labels if labels is not None else []):
        log.add_feedback(r.prediction_id, int(y))
    return log.window(last=1000)


def build(tmp, model_dir, window, reference, train, name):
    from monitoring.evidently_reports import build as _build

    return _build(window, reference, served_dir=model_dir, teacher_dir=model_dir,
                  train_texts=train["text"].tolist(), validated={"version": "v0001", "accuracy": 0.8,
                                                                  "agreement": 1.0},
                  params=PARAMS, out_dir=tmp / "reports" / name, created=utc_now())


@pytest.fixture(scope="module")
def reports(tmp_path_factory, tiny_teacher_dir, small_splits):
    """Two real runs: an in-domain window and the product-review window."""
    tmp = tmp_path_factory.mktemp("monitoring")
    s = small_splits
    reference = s["val"]  # 60 movie-review sentences
    in_domain = log_window(tmp, tiny_teacher_dir, s["test"]["text"].tolist()[:60])
    shifted = s["shifted"]
    shifted_window = log_window(tmp, tiny_teacher_dir, shifted["text"].tolist(),
                                labels=shifted["label"].tolist()[:30])
    return tmp, {
        "in_domain": build(tmp, tiny_teacher_dir, in_domain, reference, s["train"], "20260101T000000_000000Z"),
        "shifted": build(tmp, tiny_teacher_dir, shifted_window, reference, s["train"], "20260102T000000_000000Z"),
    }, shifted_window


def test_summary_figures_come_from_the_real_report(reports):
    from monitoring.evidently_reports import DESCRIPTORS

    tmp, runs, window = reports
    s = runs["shifted"]
    # The served model is the teacher here: the shadow pass must agree with it
    # exactly, through a different code path (torch vs the predictor).
    assert s.teacher.rows == 40 and s.teacher.agreement == 1.0
    assert [d.column for d in s.descriptors] == list(DESCRIPTORS)
    # Every descriptor's p-value is in the saved Evidently JSON, by column.
    saved = json.loads((tmp / "reports" / "20260102T000000_000000Z" / "report.json").read_text())
    values = {m["config"]["column"]: m["value"] for m in saved["metrics"]
              if m["config"]["type"] == "evidently:metric_v2:ValueDrift"}
    for d in s.descriptors:
        assert d.value == pytest.approx(values[d.column]) and d.drifted == (d.value < 0.05)
    # Feedback quality: 30 labels, accuracy computed independently.
    labelled = window[window["feedback_label"].notna()]
    acc = float((labelled["label"].astype(int) == labelled["feedback_label"].astype(int)).mean())
    assert s.quality.labels == 30 and s.quality.accuracy == pytest.approx(acc, abs=1e-6)
    assert s.quality.accuracy_drop == pytest.approx(0.8 - acc, abs=1e-6)
    assert s.window.rows == len(window) and s.window.feedback_labels == 30
    pos = float((window["label"] == 1).mean())
    assert s.labels == ("negative", "positive")
    assert s.class_share_current == pytest.approx({"negative": 1 - pos, "positive": pos}, abs=1e-6)
    assert sum(s.class_share_reference.values()) == pytest.approx(1.0, abs=1e-5)
    # two classes: the prediction drift is the z-test of the one share, as before
    assert s.prediction_label.method == "z" and s.prediction_probability.column == "prob_predicted"
    assert s.quality.macro_f1 is not None and set(s.quality.recall) <= {"negative", "positive"}


def test_truncated_share_is_reported_beside_the_reference_share(reports, small_splits, tiny_teacher_dir):
    from monitoring.evidently_reports import served_outputs

    _, runs, _ = reports
    t = runs["shifted"].truncation
    # these windows were logged without saying whether a text was cut
    assert t.strategy == "head" and t.known_rows == 0 and t.share is None
    assert "rows logged before prediction-log schema 2" in runs["shifted"].reason_not_computed("truncated_share")
    assert t.drift is None and "no finite value of truncated in the window" in \
        runs["shifted"].reason_not_computed("truncation_drift")
    # the reference: what the served model (32 tokens) cuts, as the server reads it
    cut = served_outputs(tiny_teacher_dir, small_splits["val"]["text"].tolist(), "head").truncated
    assert t.reference_share == pytest.approx(float(cut.mean()), abs=1e-6) and 0 < t.reference_share < 1


def test_product_reviews_drift_more_than_movie_reviews(reports):
    _, runs, _ = reports
    a, b = runs["in_domain"], runs["shifted"]
    assert b.drifted_descriptor_share > a.drifted_descriptor_share
    assert b.embedding.roc_auc > a.embedding.roc_auc
    assert a.quality is None  # no feedback in that window


def test_each_run_writes_html_json_and_summary(reports):
    tmp, _, _ = reports
    run = tmp / "reports" / "20260102T000000_000000Z"
    for name in ("report.html", "report.json", "embeddings.html", "quality.html", "summary.json"):
        assert (run / name).stat().st_size > 0, name
    assert (run / "report.html").read_text()[:200].lower().lstrip().startswith("<!doctype html") or \
        "<html" in (run / "report.html").read_text()[:2000].lower()
    assert not list((tmp / "reports").glob(".*tmp"))  # no half-written run left behind


def test_extraction_is_by_name_not_position(reports):
    from monitoring.evidently_reports import DESCRIPTORS
    from monitoring.summary import extract

    tmp, runs, _ = reports
    saved = json.loads((tmp / "reports" / "20260102T000000_000000Z" / "report.json").read_text())
    emb = json.loads((tmp / "reports" / "20260102T000000_000000Z" / "embeddings.json").read_text())
    metrics = saved["metrics"] + emb["metrics"]
    kw = dict(label_column="prediction", probability_column="prob_predicted", embeddings_name="sentence",
              embedding_threshold=0.55, embedding_dims=32)
    forward = extract({"metrics": metrics}, list(DESCRIPTORS), **kw)
    backward = extract({"metrics": metrics[::-1]}, list(DESCRIPTORS), **kw)
    assert forward == backward
    assert forward["embedding"].roc_auc == runs["shifted"].embedding.roc_auc
    with pytest.raises(KeyError, match="oov_share"):
        extract({"metrics": [m for m in metrics if m["config"].get("column") != "oov_share"]},
                list(DESCRIPTORS), **kw)


def test_distance_methods_drift_above_the_threshold():
    from monitoring.summary import column_drifts

    def metric(method, value):
        return {"config": {"type": "evidently:metric_v2:ValueDrift", "column": method, "method": method,
                           "threshold": 0.1}, "value": value}

    d = column_drifts([metric("ks", 0.05), metric("wasserstein", 0.05), metric("psi", 0.1),
                       metric("K-S p_value", 0.2)])
    assert d["ks"].drifted and not d["wasserstein"].drifted and d["psi"].drifted and not d["K-S p_value"].drifted


def test_oov_share_counts_words_never_seen_in_training():
    from monitoring.evidently_reports import oov_share, vocabulary

    vocab = vocabulary(["a good film", "a bad film"])
    assert oov_share(["good film", "great phone", "", "a GOOD zzz"], vocab).tolist() == [0.0, 1.0, 0.0, 1 / 3]


def test_window_snapshot_split_archive_and_restore(tmp_path):
    from shrinkflow.paths import UNLABELLED, WINDOW_HELDOUT, WINDOW_META
    from shrinkflow.window import md5_text, restore_window, split_window, write_snapshot

    texts = [f"sentence number {i}" for i in range(200)] + ["sentence number 3", "  ", "two\nlines"]
    distill, heldout = split_window(texts, 0.2)
    assert not set(distill) & set(heldout) and len(distill) + len(heldout) == 201  # dedup, blank dropped
    assert 20 < len(heldout) < 60
    assert set(split_window(list(reversed(texts)), 0.2)[1]) == set(heldout)  # by text, not position
    doc = write_snapshot(tmp_path, texts, 0.2, {"monitor_flow_run": "run-1", "window_sha256": "f" * 64})
    body = (tmp_path / UNLABELLED).read_text()
    assert doc["texts_md5"] == md5_text(body) and doc["rows_heldout"] == len(heldout)
    assert "two lines\n" in body or "two lines\n" in (tmp_path / WINDOW_HELDOUT).read_text()
    assert json.loads((tmp_path / WINDOW_META).read_text())["monitor_flow_run"] == "run-1"
    restored = restore_window(tmp_path, doc["texts_md5"], tmp_path / "restored.txt")
    assert restored.read_text() == body
    with pytest.raises(FileNotFoundError, match="dvc pull"):
        restore_window(tmp_path, "0" * 32, tmp_path / "x.txt")
    with pytest.raises(ValueError, match="too small"):
        write_snapshot(tmp_path / "tiny", ["one"], 0.2, {})


def test_index_lists_every_run_with_its_verdict(reports):
    from monitoring.index import write_index

    tmp, _, _ = reports
    (tmp / "reports" / "20260102T000000_000000Z" / "decision.json").write_text(
        json.dumps({"action": "recompress", "reasons": ["teacher_agreement fired"]}))
    page = write_index(tmp / "reports").read_text()
    assert "2 run(s)" in page and page.count("<tr>") == 3
    assert page.index("20260102T000000_000000Z/report.html") < page.index("20260101T000000_000000Z/report.html")
    assert ">recompress</b>" in page and ">undecided</b>" in page




def rendered_text(dom: str) -> str:
    """Text that a script put on the page: scripts and styles removed."""
    body = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", body))


@pytest.fixture(scope="module")
def served_reports(reports, tmp_path_factory, tiny_teacher_dir):
    """A project whose monitor.reports_dir holds the real runs, served by
    `shrinkflow serve` with and without a token."""
    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import Candidate

    tmp, _, _ = reports
    root = tmp_path_factory.mktemp("reports-serve") / "project"
    root.mkdir()
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["serve"]["threads"] = 1
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    cand = apply_recipe(tiny_teacher_dir, Candidate(name="fp32"), tmp / "fp32", progress=False)
    Registry(root / "registry").promote(cand, PASS, record("fp32"))
    from monitoring.index import write_index

    write_index(tmp / "reports")
    shutil.copytree(tmp / "reports", root / params["monitor"]["reports_dir"])
    open_srv, locked = Server(root, free_port(), token=None), Server(root, free_port())
    yield open_srv, locked
    open_srv.stop()
    locked.stop()


def test_reports_are_served_under_the_token_rule(served_reports):
    from tests.test_serving import AUTH

    open_srv, locked = served_reports
    assert httpx.get(f"{locked.url}/reports/").status_code == 401
    assert httpx.get(f"{locked.url}/reports/20260101T000000_000000Z/report.html").status_code == 401
    r = httpx.get(f"{locked.url}/reports/", headers=AUTH)
    assert r.status_code == 200 and "shrinkflow monitoring" in r.text
    assert httpx.get(f"{open_srv.url}/reports/nope.html").status_code == 404
    assert httpx.post(f"{open_srv.url}/reports/index.html", content=b"x").status_code == 405  # read-only


def test_index_and_report_render_in_headless_chromium(served_reports):
    open_srv, _ = served_reports
    dom = chromium_dom(f"{open_srv.url}/reports/", budget_ms=15000)
    index = rendered_text(dom)
    assert "shrinkflow monitoring" in index and "2 run(s)" in index and "drift report" in index
    assert 'href="20260102T000000_000000Z/report.html"' in dom
    # Evidently's report is a JavaScript app: this text exists only once it ran.
    report = rendered_text(chromium_dom(f"{open_srv.url}/reports/20260102T000000_000000Z/report.html", budget_ms=15000))
    assert "Dataset Drift" in report and "oov_share" in report and "K-S p_value" in report


def test_calibration_mixes_the_window_with_training_text():
    from shrinkflow.compress.recipe import calibration_texts

    assert calibration_texts(["t1", "t2", "t3"], None) == ["t1", "t2", "t3"]  # default runs unchanged
    assert calibration_texts(["t1", "t2", "t3"], ["w1", " "]) == ["w1", "t1", "t2", "t3"]
    assert calibration_texts(["t1"], ["w1", "w2", "w3"]) == ["w1", "t1", "w2", "w3"]


def test_old_report_runs_are_pruned_newest_kept(tmp_path):
    from monitoring.index import prune, write_index

    for name in ("20260101T000000_000000Z", "20260103T000000_000000Z", "20260102T000000_000000Z"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.html").write_text("<html></html>")
    gone = prune(tmp_path, keep=2)
    assert [d.name for d in gone] == ["20260101T000000_000000Z"]
    assert sorted(d.name for d in tmp_path.iterdir()) == ["20260102T000000_000000Z", "20260103T000000_000000Z"]
    assert prune(tmp_path / "missing", keep=1) == []
    assert "0 run(s)" in write_index(tmp_path).read_text()  # no summary.json: unfinished runs are not listed


def test_the_shadow_teacher_answers_the_feedback_labels_too(reports):
    """The retrain rule's input: the kept teacher's accuracy on the window's
    feedback labels (the served model is the teacher here, so the two agree)."""
    _, runs, window = reports
    q = runs["shifted"].quality
    labelled = window[window["feedback_label"].notna()]
    acc = float((labelled["label"].astype(int) == labelled["feedback_label"].astype(int)).mean())
    assert q.teacher_labels == 30 and q.teacher_accuracy == pytest.approx(acc, abs=1e-6)
    # this run's validated dict names no teacher accuracy: no drop to judge
    assert q.teacher_validated_accuracy is None and q.teacher_accuracy_drop is None
