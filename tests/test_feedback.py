"""The retrain's feedback dataset and the retrained teacher's gates: append
(normalised, deduplicated, a later label winning), label mapping, the stable
held-out split, the window's labels, and the teacher gates on their
boundaries (a figure exactly at its threshold passes)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from shrinkflow.artifacts import GatesReport, PreviousTeacher, RetrainRecord
from shrinkflow.config import Gates
from shrinkflow.errors import DataError
from shrinkflow.feedback import (append_feedback, feedback_splits, is_heldout, md5_text, merge, normalise, parse,
                                 read_feedback)
from shrinkflow.gates import teacher_gates
from shrinkflow.paths import FEEDBACK, FEEDBACK_ARCHIVE
from shrinkflow.validation import gate_teacher, retrained_teacher_gates

EPS = 1e-6
G = Gates(max_teacher_val_drop=0.01, min_teacher_feedback_gain=0.05)
PREV = PreviousTeacher(content_hash="old", val_accuracy=0.90, feedback_heldout_accuracy=0.60,
                       feedback_heldout_rows=40)


# ------------------------------------------------------------ the dataset


def test_normalise_collapses_whitespace():
    assert normalise("  a\tgem\n of  a film ") == "a gem of a film"


def test_merge_dedups_by_normalised_text_and_a_later_label_wins_in_place():
    rows, counts = merge([{"text": "old one", "label": "negative"}],
                         [("new  one", "positive"), ("new one\n", "positive"), ("old   one", "positive"),
                          ("   ", "positive"), ("third", "negative")])
    assert rows == [{"text": "old one", "label": "positive"}, {"text": "new one", "label": "positive"},
                    {"text": "third", "label": "negative"}]
    assert counts == {"added": 2, "relabelled": 1, "unchanged": 1, "blank": 1}


def test_append_writes_the_dataset_and_archives_each_version(tmp_path):
    first = append_feedback(tmp_path, [("a good film", "positive"), ("a bad film", "negative")])
    body = (tmp_path / FEEDBACK).read_text()
    assert [json.loads(line) for line in body.splitlines()] == [{"label": "positive", "text": "a good film"},
                                                                 {"label": "negative", "text": "a bad film"}]
    assert first["md5"] == md5_text(body) and first["rows"] == 2 and first["added"] == 2
    assert (tmp_path / FEEDBACK_ARCHIVE / f"{first['md5']}.jsonl").read_text() == body
    again = append_feedback(tmp_path, [("a good  film", "positive")])
    assert again["md5"] == first["md5"] and again["added"] == 0 and again["unchanged"] == 1
    second = append_feedback(tmp_path, [("a bad film", "positive")])
    assert second["md5"] != first["md5"] and second["relabelled"] == 1
    assert read_feedback(tmp_path / FEEDBACK)[1] == {"text": "a bad film", "label": "positive"}
    assert (tmp_path / FEEDBACK_ARCHIVE / f"{first['md5']}.jsonl").is_file()   # the older version is kept


def test_a_line_that_is_not_a_labelled_text_is_refused_with_its_line():
    with pytest.raises(DataError, match=r"labels.jsonl:2: expected"):
        parse('{"text": "a", "label": "x"}\n{"text": "b"}\n', "labels.jsonl")


def test_splits_map_names_to_class_ids_for_any_number_of_classes():
    labels = ("billing", "bug", "praise")
    rows = [{"text": f"text {i}", "label": labels[i % 3]} for i in range(300)]
    train, heldout = feedback_splits(rows, labels, 0.3)
    assert len(train) + len(heldout) == 300 and 0.2 < len(heldout) / 300 < 0.4
    assert train["label"].dtype == "int64" and set(train["label"]) == {0, 1, 2}
    both = pd.concat([train, heldout])
    assert all(both.set_index("text").loc[f"text {i}", "label"] == i % 3 for i in range(300))
    # stable as the dataset grows: a text never changes side
    _, more_heldout = feedback_splits(rows + [{"text": "new", "label": "bug"}], labels, 0.3)
    assert set(heldout["text"]) <= set(more_heldout["text"])
    assert all(is_heldout(t, 0.3) for t in heldout["text"]) and not any(is_heldout(t, 0.3) for t in train["text"])


def test_the_default_empty_dataset_gives_empty_typed_splits():
    train, heldout = feedback_splits([], ("negative", "positive"), 0.3)
    assert len(train) == len(heldout) == 0 and list(train.columns) == ["text", "label"]
    assert train["label"].dtype == "int64"


def test_a_label_the_task_does_not_have_is_named():
    with pytest.raises(DataError, match=r"label\(s\) \['neutral'\] are not labels of this task "
                                        r"\['negative', 'positive'\]"):
        feedback_splits([{"text": "meh", "label": "neutral"}, {"text": "ok", "label": "positive"}],
                        ("negative", "positive"), 0.3, "data/feedback/labels.jsonl")


def test_train_on_the_split_plus_feedback_and_the_same_frame_without():
    from stages.train import with_feedback

    train = pd.DataFrame({"text": ["a", "b"], "label": [0, 1]})
    assert with_feedback(train, train.iloc[:0]) is train   # default run: the very same frame
    both = with_feedback(train, pd.DataFrame({"label": [1], "text": ["c"]}))
    assert both.to_dict("list") == {"text": ["a", "b", "c"], "label": [0, 1, 1]}


def test_the_windows_feedback_as_label_names_oldest_first():
    from monitoring.run import window_feedback

    raw = pd.DataFrame({"prediction_id": list("abcd"), "ts": ["t1", "t2", "t3", "t4"], "model_version": ["v1"] * 4,
                        "text": ["x", "y", "z", "w"], "probabilities": [[0.1, 0.2, 0.7]] * 4, "label": [2] * 4,
                        "latency_ms": [1.0] * 4, "feedback_label": [None, 0, 2, 5], "feedback_ts": [None] * 4,
                        "tokens_seen": [3] * 4, "truncated": [0] * 4, "labels": [["a", "b", "c"]] * 4})
    assert window_feedback(raw, ["a", "b", "c"]) == [("y", "a"), ("z", "c")]   # 5: not a class, left out


# ------------------------------------------------------------ the teacher gates


@pytest.mark.parametrize("val_accuracy, passes", [(0.89, True),          # drop exactly 0.01
                                                  (0.89 - EPS, False),   # just over
                                                  (0.89 + EPS, True)])   # just under
def test_max_teacher_val_drop_boundary(val_accuracy, passes):
    r = teacher_gates(PREV, val_accuracy, 0.70, G)
    g = {x.name: x for x in r.results}["max_teacher_val_drop"]
    assert g.passed is passes and g.value == pytest.approx(0.90 - val_accuracy) and g.threshold == 0.01
    assert r.passed is passes


@pytest.mark.parametrize("heldout, passes", [(0.65, True),           # gain exactly 0.05
                                             (0.65 - EPS, False),    # just under
                                             (0.65 + EPS, True)])    # just over
def test_min_teacher_feedback_gain_boundary(heldout, passes):
    r = teacher_gates(PREV, 0.90, heldout, G)
    g = {x.name: x for x in r.results}["min_teacher_feedback_gain"]
    assert g.passed is passes and g.value == pytest.approx(heldout - 0.60) and g.direction == "min"


def test_no_heldout_labels_fails_the_gain_gate_and_says_why():
    r = teacher_gates(PREV.model_copy(update={"feedback_heldout_accuracy": None}), 0.95, None,
                      G.model_copy(update={"min_teacher_feedback_gain": 0.0}))
    g = {x.name: x for x in r.results}["min_teacher_feedback_gain"]
    assert not g.passed and not r.passed and "no held-out production labels" in g.note


def selection(selected="student"):
    return GatesReport(selected=selected, best_effort="student", reason="'student': lowest latency",
                       candidates={}, confirmation=None)


def test_a_failed_teacher_gate_deploys_nothing_and_says_which_and_by_how_much():
    out = gate_teacher(selection(), teacher_gates(PREV, 0.85, 0.70, G))
    assert out.selected is None and out.teacher_gates is not None and not out.teacher_gates.passed
    assert out.reason.startswith("no candidate deployed: the retrained teacher failed max_teacher_val_drop "
                                 "FAILED: 0.05 (needs <= 0.01; margin -0.04)")
    ok = gate_teacher(selection(), teacher_gates(PREV, 0.90, 0.70, G))
    assert ok.selected == "student" and ok.teacher_gates.passed and ok.reason == selection().reason
    assert gate_teacher(selection(), None) == selection()
    # the stored form reads back
    assert GatesReport.model_validate(out.to_json_dict()) == out


def test_teacher_gates_apply_only_to_a_teacher_the_retrain_replaced():
    record = RetrainRecord(previous_teacher=PREV)
    assert retrained_teacher_gates(RetrainRecord(), "new", 0.9, [1], [1], G) is None        # no retrain
    assert retrained_teacher_gates(record, "old", 0.5, [1], [0], G) is None                # the old teacher
    r = retrained_teacher_gates(record, "new", 0.90, [1, 1, 0, 0], [1, 1, 0, 1], G)         # 0.75 held out
    assert r.passed and {x.name: x.value for x in r.results}["min_teacher_feedback_gain"] == pytest.approx(0.15)


# ------------------------------------------------------------ what a retrain did

FEEDBACK_VERSION = {"md5": "abc", "rows": 40, "added": 30, "relabelled": 2, "archive": "data/feedback/archive/abc.jsonl",
                    "unchanged": 8}


def test_the_retrain_outcome_says_what_was_deployed_with_every_teacher_gate_and_each_failed_candidate_gate():
    from shrinkflow.artifacts import CandidateGates
    from shrinkflow.gates import GateReport, check_max, check_min
    from shrinkflow.retrain import retrain_markdown, retrain_outcome

    student = CandidateGates.from_report(GateReport("student", (check_min("min_accuracy", 0.84, 0.82),)))
    int8 = CandidateGates.from_report(GateReport("int8", (check_max("max_size_mb", 60.0, 40.0),)))
    passed = gate_teacher(GatesReport(selected="student", best_effort="student", reason="'student': lowest latency",
                                      candidates={"student": student, "int8": int8}, confirmation=None),
                          teacher_gates(PREV, 0.895, 0.70, G))
    out = retrain_outcome(passed, "v0004", FEEDBACK_VERSION, PREV)
    assert out["outcome"] == "deployed" and out["deployed_version"] == "v0004" and out["selected"] == "student"
    assert out["feedback"] == {k: FEEDBACK_VERSION[k] for k in ("md5", "rows", "added", "relabelled", "archive")}
    assert out["previous_teacher"]["val_accuracy"] == 0.90
    assert set(out["teacher_gates"]) == {"max_teacher_val_drop", "min_teacher_feedback_gain"}
    assert out["teacher_gates"]["max_teacher_val_drop"]["passed"]
    assert out["teacher_gates"]["max_teacher_val_drop"]["margin"] == pytest.approx(0.005)
    assert out["candidates"]["student"] == {"passed": True, "failed": {}}
    assert out["candidates"]["int8"]["failed"]["max_size_mb"]["margin"] == pytest.approx(-20.0)
    json.dumps(out)  # what decision.json stores
    md = retrain_markdown(out)
    assert "**Deployed v0004** ('student')." in md and "Feedback dataset abc: 40 labels (30 added, 2 relabelled)" in md
    assert "| teacher | max_teacher_val_drop passed | 0.005 | <= 0.01 | +0.005 |" in md
    assert "| teacher | min_teacher_feedback_gain passed | 0.1 | >= 0.05 | +0.05 |" in md
    assert "| int8 | max_size_mb FAILED | 60 | <= 40 | -20 |" in md and "| student | every gate passed |" in md

    # the teacher passed, no candidate did: nothing; production keeps serving
    none = retrain_outcome(passed.model_copy(update={"selected": None}), None, FEEDBACK_VERSION, PREV)
    assert none["outcome"] == "nothing" and "production keeps serving" in retrain_markdown(none)


def test_a_rejected_or_unchanged_retrain_says_so():
    from shrinkflow.retrain import retrain_markdown, retrain_outcome

    rejected = retrain_outcome(gate_teacher(selection(), teacher_gates(PREV, 0.85, 0.70, G)), None,
                               FEEDBACK_VERSION, PREV)
    assert rejected["outcome"] == "rejected" and rejected["deployed_version"] is None
    assert rejected["reason"].startswith("no candidate deployed: the retrained teacher failed max_teacher_val_drop")
    assert not rejected["teacher_gates"]["max_teacher_val_drop"]["passed"]
    assert rejected["teacher_gates"]["max_teacher_val_drop"]["margin"] == pytest.approx(-0.04)
    md = retrain_markdown(rejected)
    assert "**Rejected**: the retrained teacher failed its gates" in md
    assert "| teacher | max_teacher_val_drop FAILED | 0.05 | <= 0.01 | -0.04 |" in md

    same = retrain_outcome(None, None, {**FEEDBACK_VERSION, "added": 0, "relabelled": 0})
    assert same["outcome"] == "unchanged" and same["teacher_gates"] is None and same["candidates"] == {}
    assert "**Nothing retrained**" in retrain_markdown(same) and "| candidate |" not in retrain_markdown(same)


def test_the_monitor_run_records_the_retrain_in_its_decision_and_the_index(tmp_path):
    from monitoring.run import record_retrain
    from shrinkflow.retrain import retrain_outcome

    run_dir = tmp_path / "reports" / "20260101T000000_000000Z"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"created": "t", "window": {"rows": 3}}))
    (run_dir / "decision.json").write_text(json.dumps({"action": "retrain", "acted": True, "reasons": []}))
    out = retrain_outcome(gate_teacher(selection(), teacher_gates(PREV, 0.90, 0.70, G)), "v0002", FEEDBACK_VERSION,
                          PREV)
    doc = record_retrain(run_dir, out)
    assert doc["retrain"] == out and doc["acted"] is True
    assert json.loads((run_dir / "decision.json").read_text())["retrain"]["deployed_version"] == "v0002"
    assert "(deployed v0002)" in (tmp_path / "reports" / "index.html").read_text()
    rejected = retrain_outcome(gate_teacher(selection(), teacher_gates(PREV, 0.85, 0.70, G)), None,
                               FEEDBACK_VERSION, PREV)
    record_retrain(run_dir, rejected)
    assert "(retrained teacher rejected)" in (tmp_path / "reports" / "index.html").read_text()


def test_a_retrain_records_productions_val_accuracy_as_its_manifest_has_it(tmp_path):
    from shrinkflow.files import read_json, write_json
    from shrinkflow.retrain import recorded_production
    from tests.registry_outputs import build

    registry = build(tmp_path / "registry", "v0003")
    manifest = read_json(registry / "versions" / "v0003" / "manifest.json")
    prod = recorded_production(registry)
    assert (prod.version, prod.val_accuracy, prod.val_md5) == (
        "v0003", manifest["selection_metrics"]["accuracy"], manifest["lineage"]["data_md5"]["val"])
    # and the confirmation's test accuracy, on its test split
    assert manifest["metrics"]["split"] == "test"
    assert (prod.test_accuracy, prod.test_md5) == (manifest["metrics"]["accuracy"],
                                                   manifest["lineage"]["data_md5"]["test"])
    # a manifest without the test split's md5: val alone
    md5s = manifest["lineage"]["data_md5"]
    write_json(registry / "versions" / "v0003" / "manifest.json",
               {**manifest, "lineage": {**manifest["lineage"], "data_md5": {"val": md5s["val"]}}})
    prod = recorded_production(registry)
    assert prod.val_md5 == md5s["val"] and (prod.test_accuracy, prod.test_md5) == (None, None)
    # an older manifest without the figure: nothing to gate against
    del manifest["selection_metrics"]
    write_json(registry / "versions" / "v0003" / "manifest.json", manifest)
    assert recorded_production(registry) is None
    assert recorded_production(build(tmp_path / "empty", "empty")) is None


def test_a_recorded_production_figure_out_of_range_or_form_is_refused():
    from pydantic import ValidationError

    from shrinkflow.artifacts import RecordedProduction

    ok = {"version": "v0001", "val_accuracy": 0.84, "val_md5": "b56d3331ef45435ba3d6e26c96f7b5ef"}
    assert RecordedProduction(**ok).val_accuracy == 0.84
    full = {**ok, "test_accuracy": 0.86, "test_md5": "e048ad190b8c3b12a7497ebaefa2cc6a"}
    assert RecordedProduction(**full).test_accuracy == 0.86
    for bad in ({"val_accuracy": 1.5}, {"version": "banana"}, {"val_md5": "nope"},
                {"test_accuracy": 0.86},                                      # no md5 to match today's test
                {"test_md5": "e048ad190b8c3b12a7497ebaefa2cc6a"}):           # an md5 with no figure
        with pytest.raises(ValidationError):
            RecordedProduction(**{**ok, **bad})


def test_a_retrain_record_without_its_old_teacher_is_refused(tmp_path):
    """A record with feedback or production but no previous_teacher would
    switch off the teacher gates and max_accuracy_drop_vs_production without
    a word (a newcomer's hand-edited retrain.json deployed unchecked): it is
    refused when read, naming the file; {} (no retrain) still reads."""
    from shrinkflow.catalog import ArtifactInvalid, load_retrain_record

    prod = {"version": "v0001", "val_accuracy": 0.84, "val_md5": "b56d3331ef45435ba3d6e26c96f7b5ef"}
    path = tmp_path / "data" / "feedback" / "retrain.json"
    path.parent.mkdir(parents=True)
    path.write_text("{}")
    assert load_retrain_record(tmp_path) == RetrainRecord()
    for doc in ({"production": prod}, {"feedback": {"md5": "f" * 32}, "previous_teacher": None},
                {"requested_by": {"run": "x"}}):
        path.write_text(json.dumps(doc))
        with pytest.raises(ArtifactInvalid, match=r"retrain\.json.*previous_teacher is missing"):
            load_retrain_record(tmp_path)
    path.write_text(json.dumps({"production": prod, "previous_teacher": PREV.model_dump()}))
    assert load_retrain_record(tmp_path).production.version == "v0001"
