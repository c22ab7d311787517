"""Any number of classes in serving and monitoring (issue 15, item 3): a tiny
real 3-class model (hidden 32, 2 layers, random init) compressed to ONNX
int8, deployed into a real registry, served by a real `shrinkflow serve` on
loopback, its predictions in a real SQLite log, and a real `shrinkflow
monitor` run (Prefect's test harness, real Evidently) on that window."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.test_serving import AUTH, PASS, Server, free_port, log_of, record

THREE = ("billing", "bug", "sales")


def with_labels_of(teacher_dir: Path, model_dir: Path) -> Path:
    """``model_dir``, after checking that compression recorded the teacher's
    labels (names and order) in its manifest. Returns ``model_dir``."""
    from shrinkflow.modeling import read_manifest

    assert read_manifest(model_dir)["labels"] == read_manifest(teacher_dir)["labels"]
    return Path(model_dir)


def three_class_model(out: Path, tokenizer_from: Path, labels=THREE) -> Path:
    """A tiny random-init BertForSequenceClassification with ``len(labels)``
    outputs saved as a shrinkflow model directory (safetensors, the
    tokenizer of ``tokenizer_from``, a manifest naming ``labels``)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from shrinkflow.modeling import TOKENIZER, read_manifest, write_manifest

    tokenizer_from, out = Path(tokenizer_from), Path(out)
    vocab = json.loads((tokenizer_from / "config.json").read_text())["vocab_size"]
    max_seq_len = read_manifest(tokenizer_from)["max_seq_len"]
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max(64, max_seq_len), num_labels=len(labels)))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    shutil.copy(tokenizer_from / TOKENIZER, out / TOKENIZER)
    write_manifest(out, "torch", max_seq_len, labels=list(labels))
    return out


def three_class_splits(small_splits) -> dict:
    """The small splits relabelled into three classes (row i: class i % 3)."""
    out = {}
    for name, df in small_splits.items():
        df = df.reset_index(drop=True).copy()
        df["label"] = np.arange(len(df)) % 3
        out[name] = df
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_teacher_dir, small_splits) -> Path:
    """A project serving the 3-class model as ONNX int8 (what deploy ships),
    with its teacher kept and the reference and train splits in place."""
    from tests.test_monitor_robust import monitor_project

    model = three_class_model(tmp_path_factory.mktemp("three") / "teacher", tiny_teacher_dir)
    root = monitor_project(tmp_path_factory.mktemp("multiclass") / "project", model,
                           three_class_splits(small_splits))
    import yaml

    params = yaml.safe_load((root / "params.yaml").read_text())
    params["serve"].update({"reload_poll_s": 0.2, "threads": 1})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def server(project):
    srv = Server(project, free_port())
    yield srv
    srv.stop()


def predict(server, texts: list[str]) -> list[dict]:
    r = httpx.post(f"{server.url}/predict", json={"texts": texts}, headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_predict_returns_one_probability_per_class_by_name(server, project):
    preds = predict(server, ["my invoice is wrong", "the app crashes on start", "do you sell licences?"])
    for p in preds:
        assert list(p["probabilities"]) == list(THREE)           # every class, by name, in class-id order
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == THREE[p["label_id"]] == max(p["probabilities"], key=p["probabilities"].get)
    rows = log_of(project).window()
    row = rows[rows["prediction_id"] == preds[0]["prediction_id"]].iloc[0]
    assert row["labels"] == list(THREE) and len(row["probabilities"]) == 3   # schema 3: the names, N probabilities
    assert row["label"] == preds[0]["label_id"]


def test_feedback_by_name_or_index_and_unknown_labels_get_422_listing_the_labels(server, project):
    p = predict(server, ["please refund the double charge"])[0]
    f = httpx.post(f"{server.url}/feedback", json={"prediction_id": p["prediction_id"], "label": "sales"},
                   headers=AUTH)
    assert f.status_code == 200 and f.json() == {"prediction_id": p["prediction_id"], "label": "sales",
                                                 "replaced": False}
    rows = log_of(project).window(with_feedback=True)
    assert rows[rows["prediction_id"] == p["prediction_id"]]["feedback_label"].tolist() == [2]
    f = httpx.post(f"{server.url}/feedback", json={"prediction_id": p["prediction_id"], "label": 0}, headers=AUTH)
    assert f.status_code == 200 and f.json()["label"] == "billing" and f.json()["replaced"] is True
    for label, said in (("refunds", "unknown label 'refunds': the label must be one of ['billing', 'bug', "
                                    "'sales'] or its index"),
                        ("Bug", "unknown label 'Bug'"),                      # names are exact: no case folding
                        (3, "label index must be in 0..2 (the labels are ['billing', 'bug', 'sales'])")):
        f = httpx.post(f"{server.url}/feedback", json={"prediction_id": p["prediction_id"], "label": label},
                       headers=AUTH)
        assert f.status_code == 422, f.text
        assert said in f.json()["detail"] and f.json()["labels"] == list(THREE)
    rows = log_of(project).window(with_feedback=True)
    assert rows[rows["prediction_id"] == p["prediction_id"]]["feedback_label"].tolist() == [0]  # unchanged


def test_feedback_on_a_prediction_an_earlier_version_answered_uses_that_versions_labels(server, project):
    """A newcomer's finding: the server checked a name against the labels it
    serves now, refusing "2" for a row answered with labels 1, 2, 3, and
    named an id by today's labels ("billing") while storing it against the
    row's ("1"). The row's own names decide both, and an id among integer
    names is refused as ambiguous."""
    from shrinkflow.predlog import Prediction, utc_now

    log = log_of(project).open()
    pid = uuid.uuid4().hex
    log.append([Prediction(pid, utc_now(), "v0000", "an older answer", (0.2, 0.3, 0.5), 2, 1.0,
                           labels=("1", "2", "3"))])
    log.close()

    def post(label):
        return httpx.post(f"{server.url}/feedback", json={"prediction_id": pid, "label": label}, headers=AUTH)

    f = post("2")
    assert f.status_code == 200 and f.json() == {"prediction_id": pid, "label": "2", "replaced": False}, f.text
    f = post(1)
    assert f.status_code == 422 and "ambiguous" in f.json()["detail"], f.text
    f = post("billing")
    assert f.status_code == 422 and "['1', '2', '3']" in f.json()["detail"], f.text
    assert f.json()["labels"] == ["1", "2", "3"]     # what this row's client must pick from, not today's
    rows = log_of(project).window(with_feedback=True)
    assert rows[rows["prediction_id"] == pid]["feedback_label"].tolist() == [1]   # "2", unchanged since


def test_a_model_without_labels_in_its_manifest_is_never_promoted(tmp_path, tiny_teacher_dir):
    """No version without its class names reaches the registry, so the server
    never has to guess them (it also refuses one at load: RegistryError)."""
    from shrinkflow.errors import PromotionRefused
    from shrinkflow.modeling import MANIFEST
    from shrinkflow.registry import Registry

    model = shutil.copytree(tiny_teacher_dir, tmp_path / "nolabels")
    manifest = json.loads((model / MANIFEST).read_text())
    manifest.pop("labels")
    (model / MANIFEST).write_text(json.dumps(manifest))
    reg = Registry(tmp_path / "registry")
    with pytest.raises(PromotionRefused, match=r"nolabels/shrinkflow_model\.json has no valid 'labels'.*got None"):
        reg.promote(model, PASS, record("nolabels"))
    assert reg.versions() == [] and reg.alias() is None


@pytest.mark.slow  # a real `shrinkflow monitor` run on the served window: about 30 s
def test_monitor_on_a_three_class_window_with_one_class_of_feedback(server, project, small_splits, prefect_api):
    """Real traffic through the server, feedback by name, all of one class:
    the monitor gives per-class shares and a verdict and exits 0; Evidently's
    multiclass report is either there or not computed with its reason."""
    from tests.test_monitor_robust import monitor_cli, only_run, set_monitor

    set_monitor(project, window_last_n=40)   # exactly the predictions below: earlier tests' rows are older
    texts = [f"{t} ({i})" for i, t in enumerate(small_splits["test"]["text"].tolist()[:40])]
    preds = [p for i in range(0, len(texts), 8) for p in predict(server, texts[i:i + 8])]
    for p in preds[:25]:
        r = httpx.post(f"{server.url}/feedback", json={"prediction_id": p["prediction_id"], "label": "bug"},
                       headers=AUTH)
        assert r.status_code == 200, r.text
    code, out, _ = monitor_cli(project, prefect_api, "--report-only")
    assert code == 0, out[-4000:]
    assert "verdict: " in out and "error:" not in out
    summary = json.loads((only_run(project) / "summary.json").read_text())
    assert summary["labels"] == list(THREE)
    served = [p["label"] for p in preds]
    window = log_of(project).window(last=40)
    assert window["prediction_id"].tolist() == [p["prediction_id"] for p in preds]
    want = {name: float((window["label"] == k).mean()) for k, name in enumerate(THREE)}
    assert summary["class_share_current"] == pytest.approx(want, abs=1e-6)
    assert set(summary["class_share_reference"]) == set(THREE)
    assert sum(summary["class_share_reference"].values()) == pytest.approx(1.0, abs=1e-5)
    assert summary["largest_share_shift"]["label"] in THREE
    assert summary["prediction_label"] is None or summary["prediction_label"]["method"] == "chisquare"
    q = summary["quality"]
    assert q["labels"] == 25 and q["accuracy"] == pytest.approx(np.mean([s == "bug" for s in served[:25]]), abs=1e-6)
    assert set(q["recall"]) == {"bug"}
    not_computed = {n["metric"]: n["reason"] for n in summary["not_computed"]}
    assert ("quality_report" in not_computed) is not (only_run(project) / "quality.html").is_file()
    decision = json.loads((only_run(project) / "decision.json").read_text())
    assert decision["action"] in ("ok", "warn", "recompress", "retrain")


def test_monitor_build_on_three_classes_names_the_classes(project, small_splits, tmp_path):
    """The library call behind the monitor, on a hand-made 3-class window of
    two classes (neither the one Evidently takes for positive): shares by
    name, macro-F1 and per-class recall computed, the Evidently multiclass
    report not computed with its reason, nothing crashes."""
    import pandas as pd

    from monitoring.evidently_reports import build
    from shrinkflow.config import MonitorParams
    from shrinkflow.paths import TEACHER, split_path
    from shrinkflow.predlog import Prediction, PredictionLog, utc_now
    from shrinkflow.registry import Registry

    log = PredictionLog(tmp_path / "log.db").open()
    texts = small_splits["test"]["text"].tolist()[:12]
    rows = [Prediction(uuid.uuid4().hex, utc_now(), "v0001", t, [0.7, 0.1, 0.2] if i % 2 else [0.2, 0.1, 0.7],
                       0 if i % 2 else 2, 1.0, tokens_seen=5, truncated=i % 4 == 0, labels=THREE)
            for i, t in enumerate(texts)]
    log.append(rows)
    for i, r in enumerate(rows):
        log.add_feedback(r.prediction_id, "sales" if i < 9 else "billing")
    ref = Registry(project / "registry").load()
    s = build(log.window(), pd.read_parquet(project / split_path("reference")), served_dir=ref.path,
              teacher_dir=project / TEACHER, train_texts=pd.read_parquet(project / split_path("train"))["text"].tolist(),
              validated={"version": ref.version, "accuracy": 0.5, "agreement": 0.9},
              params=MonitorParams(shadow_sample_rows=12, min_window_rows=5), out_dir=tmp_path / "run",
              created=utc_now())
    assert s.labels == THREE
    assert s.class_share_current == {"billing": 0.5, "bug": 0.0, "sales": 0.5}
    # feedback: 9 x sales then 3 x billing; predicted: even rows sales, odd rows billing
    y = np.array([2] * 9 + [0] * 3)
    pred = np.array([2 if i % 2 == 0 else 0 for i in range(12)])
    assert s.quality.accuracy == pytest.approx(float((y == pred).mean()), abs=1e-6)
    recall_sales = float((pred[y == 2] == 2).mean())
    recall_billing = float((pred[y == 0] == 0).mean())
    assert s.quality.recall == pytest.approx({"billing": recall_billing, "sales": recall_sales}, abs=1e-6)

    def f1(k):
        tp = ((pred == k) & (y == k)).sum()
        return 2 * tp / (2 * tp + ((pred == k) & (y != k)).sum() + ((pred != k) & (y == k)).sum())

    assert s.quality.macro_f1 == pytest.approx((f1(0) + f1(2)) / 2, abs=1e-6) == s.quality.f1
    assert "Evidently 0.7's multiclass report needs" in s.reason_not_computed("quality_report")
    assert "classes ['billing', 'sales']" in s.reason_not_computed("quality_report")
    assert s.truncation.share == pytest.approx(3 / 12, abs=1e-6) and s.truncation.drift is not None
    assert s.truncation.drift.column == "truncated" and s.truncation.drift.method == "z"
    assert s.prediction_probability.column == "prob_predicted"
    assert (tmp_path / "run" / "summary.json").is_file()


def test_simulated_traffic_draws_the_users_splits_and_posts_feedback_by_name(server, project, small_splits):
    """`data.source.kind: files`: in-domain traffic is the user's test split,
    shifted traffic the pool of their shifted split (never its recovery
    part), and the true label goes to /feedback by name."""
    from shrinkflow.paths import split_path
    from shrinkflow.traffic import shifted_part, simulate, traffic_order, traffic_pool, user_shifted_split

    splits = three_class_splits(small_splits)
    for name in ("test", "shifted"):
        splits[name].to_parquet(project / split_path(name))
    shifted = splits["shifted"]
    parts = user_shifted_split(project / split_path("shifted"))
    assert len(parts["pool"]) + len(parts["recovery"]) == len(shifted) and len(parts["recovery"]) > 0
    assert all(shifted_part(t) == "recovery" for t in parts["recovery"]["text"])
    pool = traffic_pool("shifted", project, "files")
    assert pool.equals(parts["pool"])
    assert traffic_pool("in", project, "files").equals(splits["test"][["text", "label"]])
    rows, _ = traffic_order(pool, 12, seed=4)
    before = set(log_of(project).window()["prediction_id"])
    res = simulate(server.url, rows["text"].tolist(), [THREE[int(y)] for y in rows["label"]], feedback_rate=0.5,
                   seed=4, concurrency=2, token=AUTH["Authorization"].split()[1], progress=False)
    assert res.ok and res.answered == 12 and res.feedback_posted == 6
    log = log_of(project).window()
    new = log[~log["prediction_id"].isin(before)]
    assert set(new["text"]) <= set(parts["pool"]["text"])
    truth = dict(zip(shifted["text"], shifted["label"]))
    labelled = new[new["feedback_label"].notna()]
    assert len(labelled) == 6 and [int(y) for y in labelled["feedback_label"]] == \
        [int(truth[t]) for t in labelled["text"]]
    with pytest.raises(FileNotFoundError, match="data.source.shifted_path"):
        user_shifted_split(project / "data/prepared/nothing.parquet")


def test_clean_window_maps_each_row_by_its_own_label_names():
    """A window spanning a change of label set: ids are read through each
    row's names into the served version's; a class it lacks is unknown;
    rows before schema 3 (no names) are ids of the served labels."""
    import math

    import pandas as pd

    from monitoring.evidently_reports import clean_window

    old_set = ["billing", "sales"]                      # before "bug" arrived: sales was id 1
    raw = pd.DataFrame({
        "prediction_id": ["a", "b", "c", "d"], "ts": ["t1", "t2", "t3", "t4"], "model_version": ["v1", "v1", "v2", "v0"],
        "text": ["x", "y", "z", "w"],
        "probabilities": [[0.3, 0.7], [0.9, 0.1], [0.1, 0.2, 0.3, 0.4], [0.2, 0.5, 0.3]],
        "label": [1, 0, 3, 1], "latency_ms": [1.0] * 4, "feedback_label": [0, 1, 2, 2], "feedback_ts": [None] * 4,
        "tokens_seen": [3] * 4, "truncated": [0, 1, None, 0],
        "labels": [old_set, old_set, ["billing", "bug", "outage", "sales"], []]})
    w = clean_window(raw, THREE)
    assert w["label"].tolist() == [2.0, 0.0, 2.0, 1.0]          # sales, billing, sales (by name), bug (by id)
    assert w["prob"].tolist() == [0.7, 0.9, 0.4, 0.5]           # the answered class's own probability
    assert w["feedback"].tolist()[:2] == [0.0, 2.0]
    assert math.isnan(w["feedback"][2])                         # "outage": not a class of the served version
    assert w["feedback"][3] == 2.0


def test_rows_under_a_renumbered_integer_label_set_have_unknown_classes(tiny_teacher_dir, small_splits, tmp_path):
    """A helper's finding: a label set of integers renumbered (``1, 2`` ->
    ``0, 1``, the same two classes) read the older rows by name as the
    other class; the teacher agreement came out near 0. Those rows' classes
    and feedback are unknown now: the agreement is the served version's
    alone (the served model is the teacher here: exactly 1.0), feedback
    counts its rows only, the summary counts the others and says why, and
    their texts are still in the window. A row of the same integer set in
    another order, and a named set, still map by name (above)."""
    from monitoring.evidently_reports import build, clean_window, softmax_positive
    from shrinkflow.config import MonitorParams
    from shrinkflow.predictors import load_predictor
    from shrinkflow.predlog import Prediction, PredictionLog, utc_now

    texts = small_splits["test"]["text"].tolist()[:30]
    probs = softmax_positive(load_predictor(tiny_teacher_dir, threads=1).predict_logits(texts))
    log = PredictionLog(tmp_path / "log.db").open()
    rows = [Prediction(uuid.uuid4().hex, utc_now(), "v0001" if i < 12 else "v0002", t, [1 - p, p], int(p >= 0.5),
                       1.0, labels=["1", "2"] if i < 12 else (["0", "1"] if i % 2 else ["1", "0"]))
            for i, (t, p) in enumerate(zip(texts, probs))]
    for i, r in enumerate(rows):   # "1, 0": the same set in another order, its probabilities in that order too
        if i >= 12 and i % 2 == 0:
            rows[i] = Prediction(r.prediction_id, r.ts, r.model_version, r.text, list(r.probabilities)[::-1],
                                 1 - r.label, 1.0, labels=r.labels)
    log.append(rows)
    for i, r in enumerate(rows):
        log.add_feedback(r.prediction_id, r.labels[0])   # the first name of the row's own set
    window = log.window()
    w = clean_window(window, ("0", "1"))
    assert w["other_label_set"].tolist() == [True] * 12 + [False] * 18
    assert w["label"][:12].isna().all() and w["feedback"][:12].isna().all() and w["prob"][:12].isna().all()
    assert w["label"][12:].tolist() == [float(p >= 0.5) for p in probs[12:]]
    assert w["text"].tolist() == texts
    # the same window with its label lists as numpy arrays (a Parquet read): the same reading
    arrays = window.assign(labels=[np.array(v) if isinstance(v, list) else v for v in window["labels"]])
    assert clean_window(arrays, ("0", "1")).equals(w)
    s = build(window, small_splits["val"], served_dir=tiny_teacher_dir, teacher_dir=tiny_teacher_dir,
              train_texts=small_splits["train"]["text"].tolist(), labels=("0", "1"),
              validated={"version": "v0002", "accuracy": 0.8, "agreement": 1.0},
              params=MonitorParams(shadow_sample_rows=30, min_window_rows=5), out_dir=tmp_path / "run",
              created=utc_now())
    assert s.teacher.rows == 18 and s.teacher.agreement == 1.0
    assert s.window.rows == 30 and s.window.other_label_set_rows == 12 and s.window.feedback_labels == 18
    reason = s.reason_not_computed("class_of_rows_under_another_label_set")
    assert reason.startswith("12 row(s) were answered under another label set of integer names (v0001: 1, 2; "
                             "served: 0, 1)")


@pytest.mark.parametrize("served, row, other", [
    (("0", "1"), ["1", "2"], True),                   # renumbered
    (("-1", "0", "1"), ["0", "1", "2"], True),        # negative ids
    (("0", "1"), ["0", "1", "2"], True),              # a class dropped
    (("0", "1", "neutral"), ["0", "1"], True),        # the served set mixed, the row's all integers
    (("1", "2"), [" 1", " 2"], True),                 # integers written with a space
    (("0", "1"), ["1", "0"], False),                  # the same set in another order: by name
    (("billing", "sales"), ["billing", "bug", "sales"], False),   # named: by name
    (("0", "a"), ["0", "b"], False),                  # neither set all integers: by name
    (("0", "1"), [], False),                          # no names (before schema 3): ids of the served
])
def test_which_rows_count_as_another_integer_label_set(served, row, other):
    """The kind behind the renumbering finding, as a table: a row's classes
    are unknown exactly when its set differs from the served one and either
    is all integer names."""
    import math

    import pandas as pd

    from monitoring.evidently_reports import clean_window

    raw = pd.DataFrame({
        "prediction_id": ["a"], "ts": ["t"], "model_version": ["v1"], "text": ["x"],
        "probabilities": [[0.4, 0.6] + [0.0] * (max(len(row), 2) - 2)], "label": [1], "latency_ms": [1.0],
        "feedback_label": [0], "feedback_ts": [None], "tokens_seen": [3], "truncated": [0], "labels": [row]})
    w = clean_window(raw, served)
    assert bool(w["other_label_set"][0]) is other
    if other:
        assert math.isnan(w["label"][0]) and math.isnan(w["feedback"][0])
    else:   # read by the row's own names (or, with none, as ids of the served labels)
        name = row[1] if row else served[1]
        assert w["label"][0] == served.index(name) if name in served else math.isnan(w["label"][0])
