"""Any number of classes in evaluation, gates and reports (issue 15, item 3).

Macro-F1 and per-class recall against scikit-learn and by hand on stated
examples; the paired accuracy drop and McNemar, which only see whether each
model was right, on three classes; the max_macro_f1_drop gate on its
boundary; validate on three classes, from hand-made predictions and from a
real run of the validate stage on tiny three-class BERTs whose answers are
fixed by their classifier bias, so every figure can be stated.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from sklearn.metrics import f1_score, recall_score

from shrinkflow.config import Gates, ValidateParams
from shrinkflow.errors import DataError
from shrinkflow.gates import confirm_gates, evaluate_gates, macro_f1_gates
from shrinkflow.markdown import validation_markdown
from shrinkflow.stats import paired_accuracy_drop, paired_macro_f1_drop, quality
from shrinkflow.validation import check_model_labels, deployed_figures, validate_runs
from tests.conftest import PROJECT_ROOT

CLASSES = ("billing", "bug", "sales")


# ------------------------------------------------------------------ stats
def test_macro_f1_and_per_class_recall_match_sklearn_and_the_hand_values():
    y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0]
    p = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0]
    q = quality(y, p, CLASSES)
    # billing: tp 3, fp 1, fn 1 -> F1 6/8; bug: tp 1, fp 1, fn 1 -> 2/4; sales: tp 3, fp 1, fn 1 -> 6/8
    assert q["macro_f1"] == pytest.approx((0.75 + 0.5 + 0.75) / 3, abs=1e-6)
    assert q["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-6)
    assert q["per_class_recall"] == {"billing": 0.75, "bug": 0.5, "sales": 0.75}
    assert list(q["per_class_recall"].values()) == pytest.approx(list(recall_score(y, p, average=None)))
    assert q["per_class_n"] == {"billing": 4, "bug": 2, "sales": 4}
    assert q["accuracy"] == 0.7 and q["n"] == 10
    assert q["f1"] is None  # no single "positive" class among three


def test_a_class_never_labelled_has_no_recall_and_one_never_seen_no_f1():
    y = [0, 0, 1, 1, 1]
    p = [0, 2, 1, 1, 0]   # class 2 predicted once but never labelled; class 3 neither
    q = quality(y, p, 4)
    # F1: class 0 1/2, class 1 4/5, class 2 0 (a false positive); class 3 absent: not averaged
    assert q["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3, abs=1e-6)
    assert q["macro_f1"] == pytest.approx(f1_score(y, p, average="macro"), abs=1e-6)
    assert q["per_class_recall"] == {"0": 0.5, "1": 0.666667, "2": None, "3": None}
    with pytest.raises(ValueError, match=r"class ids \[3\] are outside the 3 classes"):
        quality([0, 3], [0, 1], CLASSES)


def test_two_classes_keep_the_positive_class_f1():
    y, p = [1, 1, 0, 0], [1, 0, 1, 0]
    q = quality(y, p, ("negative", "positive"))
    assert q["f1"] == pytest.approx(f1_score(y, p), abs=1e-6) == pytest.approx(0.5)
    assert q["macro_f1"] == pytest.approx(0.5) and q["per_class_recall"] == {"negative": 0.5, "positive": 0.5}


def test_paired_accuracy_drop_and_mcnemar_only_see_right_or_wrong():
    y = [0, 1, 2, 2, 1, 0]
    t = [0, 1, 2, 0, 1, 1]   # right at 0, 1, 2, 4
    c = [0, 2, 2, 2, 0, 1]   # right at 0, 2, 3
    d = paired_accuracy_drop(y, t, c)
    # teacher-only right at 1 and 4, candidate-only right at 3: drop (2 - 1) / 6
    assert (d["teacher_only_correct"], d["candidate_only_correct"]) == (2, 1)
    assert d["accuracy_drop"] == pytest.approx(1 / 6, abs=1e-6)
    assert d["mcnemar_p"] == 1.0   # 2 * P(X <= 1 | n=3, p=1/2) = 2 * 4/8
    # the same figures from the right/wrong indicators alone, as a binary task
    ok = [1] * 6
    binary = paired_accuracy_drop(ok, [int(a == b) for a, b in zip(t, y)], [int(a == b) for a, b in zip(c, y)])
    assert binary == d


def test_paired_macro_f1_drop_is_the_difference_of_the_figures_with_a_paired_interval():
    y = [0, 0, 0, 1, 1, 2, 2, 2, 2, 0] * 5
    t = [0, 1, 0, 1, 2, 2, 2, 0, 2, 0] * 5
    c = [0, 1, 0, 0, 2, 2, 2, 0, 2, 0] * 5
    d = paired_macro_f1_drop(y, t, c, 3)
    assert d["macro_f1_drop"] == pytest.approx(quality(y, t, 3)["macro_f1"] - quality(y, c, 3)["macro_f1"],
                                               abs=2e-6)  # each figure rounded to 6 places
    assert d["macro_f1_drop"] > 0
    assert d["macro_f1_drop_ci_low"] <= d["macro_f1_drop"] <= d["macro_f1_drop_ci_high"]
    assert paired_macro_f1_drop(y, t, c, 3) == d  # seeded
    same = paired_macro_f1_drop(y, t, t, 3)
    assert same["macro_f1_drop"] == same["macro_f1_drop_ci_low"] == same["macro_f1_drop_ci_high"] == 0.0


# ------------------------------------------------------------------ gates
TEACHER = {"accuracy": 0.85, "macro_f1": 0.80, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}


def cand(macro_f1):
    return {"accuracy": 0.85, "macro_f1": macro_f1, "latency_ms_p95_b1": 1.0, "size_mb": 1.0}


def macro_gate(report):
    return next(r for r in report.results if r.name == "max_macro_f1_drop")


@pytest.mark.parametrize("macro_f1, passes", [(0.78, True), (0.7799, False), (0.7801, True)])
def test_max_macro_f1_drop_on_its_boundary(macro_f1, passes):
    gates = Gates(max_macro_f1_drop=0.02, min_accuracy=0.5)
    r = macro_gate(evaluate_gates("c", cand(macro_f1), TEACHER, gates))
    assert r.passed is passes and r.direction == "max" and r.threshold == 0.02
    assert r.value == pytest.approx(0.80 - macro_f1)
    assert r.margin == pytest.approx(0.02 - (0.80 - macro_f1), abs=1e-12)
    if not passes:
        assert "max_macro_f1_drop FAILED" in evaluate_gates("c", cand(macro_f1), TEACHER, gates).summary()
    # checked again on the confirmation split
    assert macro_gate(confirm_gates("c", cand(macro_f1), TEACHER, gates)).passed is passes


def test_max_macro_f1_drop_unset_is_not_a_gate():
    assert macro_f1_gates(cand(0.1), TEACHER, Gates()) == ()
    assert "max_macro_f1_drop" not in {r.name for r in evaluate_gates("c", cand(0.1), TEACHER, Gates()).results}


# ------------------------------------------------------------- validate
def run(val, test, lat=1.0):
    return {"predictions": {"val": list(val), "test": list(test), "shifted": []},
            "performance": {"latency_ms_p50_b1": lat, "latency_ms_p95_b1": lat, "latency_ms_p50_b32": 10 * lat,
                            "latency_ms_p95_b32": 10 * lat, "throughput_eps_b32": 100.0, "size_mb": 1.0,
                            "peak_rss_mb": 50.0, "cpu_ms_per_prediction_b1": lat, "cpu_ms_per_prediction_b32": lat}}


# val: 8 billing, 8 bug, 2 sales (the rare class)
VAL = [0] * 8 + [1] * 8 + [2] * 2
TEST = [0] * 4 + [1] * 4 + [2] * 2
LABELS = {"val": VAL, "test": TEST, "shifted": []}
FILES = {n: {"files": {"model.onnx": n}, "content_hash": n} for n in ("fast", "slow")}


def test_a_candidate_that_gives_up_the_rare_class_fails_the_macro_f1_gate_not_the_accuracy_one():
    teacher = run(VAL, TEST, lat=20.0)
    fast = run(VAL[:16] + [0, 0], TEST, lat=2.0)          # never says "sales" on val: 16/18
    slow = run(VAL[:15] + [0, 2, 2], TEST, lat=5.0)       # one bug called billing: 17/18
    gates = Gates(min_accuracy=0.5, max_accuracy_drop=0.12, max_latency_ms_p95_b1=100.0, max_size_mb=100.0,
                  min_speedup=1.0, max_macro_f1_drop=0.05)
    typed, selection = validate_runs(teacher, {"fast": fast, "slow": slow}, LABELS, ValidateParams(gates=gates),
                                     FILES, CLASSES)
    metrics, report = typed.to_json_dict(), selection.to_json_dict()
    f = metrics["candidates"]["fast"]
    # billing F1 16/18, bug 1, sales 0 -> macro 0.62963; the teacher's is 1
    assert f["macro_f1"] == pytest.approx((16 / 18 + 1 + 0) / 3, abs=1e-6)
    assert f["per_class_recall"] == {"billing": 1.0, "bug": 1.0, "sales": 0.0}
    assert f["accuracy_drop"] == pytest.approx(2 / 18, abs=1e-6) and f["macro_f1_drop"] == pytest.approx(
        1 - f["macro_f1"], abs=1e-6)
    g = report["candidates"]["fast"]["gates"]
    assert g["max_accuracy_drop"]["passed"] and not g["max_macro_f1_drop"]["passed"]
    assert g["max_macro_f1_drop"]["margin"] == pytest.approx(0.05 - (1 - f["macro_f1"]), abs=1e-6)
    assert report["selected"] == "slow" and metrics["labels"] == report["labels"] == list(CLASSES)
    conf = metrics["confirmation"]
    assert conf["passed"] and "max_macro_f1_drop" in conf["gates"]["gates"]
    assert conf["metrics"]["per_class_recall"] == {"billing": 1.0, "bug": 1.0, "sales": 1.0}
    shown = deployed_figures(typed, "slow")
    assert shown.metrics.macro_f1 == 1.0 and shown.teacher_metrics.per_class_n["sales"] == 2
    md = validation_markdown(typed, selection)
    assert "Classes (3): billing, bug, sales" in md and "| macro-F1 (val) |" in md
    assert "F1 of" not in md  # no positive class among three
    assert "## Per-class recall: the chosen candidate, 'slow'" in md
    assert "| sales | 1.0000 (n=2) | 1.0000 (n=2) | 1.0000 (n=2) | 1.0000 (n=2) |" in md
    line = next(x for x in md.splitlines() if x.startswith("| fast | max_macro_f1_drop |"))
    assert "| <= 0.05 |" in line and "**FAIL**" in line


def test_the_built_in_two_classes_keep_their_figures_and_name_the_positive_class():
    y = [1, 1, 0, 0, 1, 0, 1, 0, 1, 0]
    teacher = run(y, y, lat=20.0)
    c = run(y[:9] + [1], y, lat=2.0)
    gates = Gates(min_accuracy=0.5, max_accuracy_drop=0.15, max_latency_ms_p95_b1=100.0, max_size_mb=100.0,
                  min_speedup=1.0)
    typed, selection = validate_runs(teacher, {"fast": c}, {"val": y, "test": y, "shifted": []},
                                     ValidateParams(gates=gates), {"fast": FILES["fast"]}, ("negative", "positive"))
    metrics, report = typed.to_json_dict(), selection.to_json_dict()
    m = metrics["candidates"]["fast"]
    assert m["accuracy"] == 0.9 and m["accuracy_drop"] == pytest.approx(0.1) and m["f1"] == pytest.approx(10 / 11,
                                                                                                           abs=1e-6)
    assert [r["name"] for r in report["candidates"]["fast"]["gates"].values()] == [
        "min_accuracy", "max_accuracy_drop", "max_latency_ms_p95_b1", "max_size_mb", "min_speedup"]
    md = validation_markdown(typed, selection)
    assert "| F1 of 'positive' (val) |" in md and "| negative | 1.0000 (n=5) | 0.8000 (n=5) |" in md


def test_a_model_whose_labels_differ_from_the_data_is_named():
    check_model_labels(CLASSES, {"models/teacher": list(CLASSES)})
    with pytest.raises(DataError, match=r"models/candidates/x: \['bug', 'billing', 'sales'\]; "
                                        r"models/candidates/y: no labels in its manifest"):
        check_model_labels(CLASSES, {"models/teacher": list(CLASSES),
                                     "models/candidates/x": ["bug", "billing", "sales"],
                                     "models/candidates/y": None})


# ------------------------------------------ the validate stage, for real
# Class ids index CLASSES. Each tiny model's classifier weights are zero and
# its bias picks one class, so every text gets that class: the figures follow.
VAL_ROWS = [("refund my invoice", 0), ("charged twice this month", 0), ("billing address change", 0),
            ("invoice is wrong", 0), ("app crashes on start", 1), ("error when saving", 1),
            ("button does nothing", 1), ("need a price quote", 2), ("buy ten licences", 2)]
TEST_ROWS = [("cancel the charge", 0), ("receipt missing", 0), ("double billed", 0), ("it freezes", 1),
             ("stack trace on login", 1), ("volume discount", 2), ("talk to sales", 2)]


def tiny_model(path, labels, favour: int):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from shrinkflow.config import RandomInitModel
    from shrinkflow.modeling import tokenizer_path

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=3))
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0 if i == favour else 0.0 for i in range(3)]))
    path.mkdir(parents=True)
    model.save_pretrained(str(path), safe_serialization=True)
    shutil.copy(tokenizer_path(RandomInitModel()), path / "tokenizer.json")
    (path / "shrinkflow_model.json").write_text(json.dumps(
        {"format": "torch", "max_seq_len": 32, "labels": list(labels), "recipe": []}))


def validate_project(tmp_path, candidate_labels=CLASSES):
    import pandas as pd

    from shrinkflow.labels import write_labels

    root = tmp_path / "project"
    prepared = root / "data" / "prepared"
    prepared.mkdir(parents=True)
    frames = {"val": VAL_ROWS, "test": TEST_ROWS, "reference": VAL_ROWS[:3], "shifted": [], "feedback_heldout": []}
    for split, rows in frames.items():
        pd.DataFrame({"text": [t for t, _ in rows], "label": pd.array([y for _, y in rows], dtype="int64")}) \
            .to_parquet(prepared / f"{split}.parquet")
    write_labels(prepared / "labels.json", CLASSES)
    (root / "data" / "unlabelled").mkdir()
    for name in ("texts.txt", "heldout.txt"):
        (root / "data" / "unlabelled" / name).write_text("")
    tiny_model(root / "models" / "teacher", CLASSES, favour=0)          # always "billing"
    tiny_model(root / "models" / "candidates" / "same", CLASSES, favour=0)
    tiny_model(root / "models" / "candidates" / "bugs", candidate_labels, favour=1)   # always "bug"
    shutil.copy(PROJECT_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    params["compress"]["candidates"] = [{"name": "same", "recipe": []}, {"name": "bugs", "recipe": []}]
    params["validate"]["objective"] = "size_mb"
    params["validate"]["gates"].update(min_accuracy=0.3, max_accuracy_drop=0.2, max_latency_ms_p95_b1=1000.0,
                                       max_size_mb=1000.0, min_speedup=0.01, max_macro_f1_drop=0.03,
                                       max_timing_other_cpu_share=None, max_timing_throttled_share=None,
                                       max_timing_cpu_wait_share=None)
    params["validate"]["latency"] = {"threads": 1, "warmup_iters": 1, "iters_b1": 5, "iters_b32": 3,
                                     "rounds": 1, "seed": 0, "retimes_when_busy": 0}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def run_validate(root):
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", "stages.validate"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_validate_stage_on_three_classes(tmp_path):
    root = validate_project(tmp_path)
    proc = run_validate(root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = json.loads((root / "metrics" / "validate.json").read_text())
    gates = json.loads((root / "reports" / "gates.json").read_text())
    assert metrics["labels"] == gates["labels"] == list(CLASSES)
    t = metrics["teacher"]
    # val: 4 billing, 3 bug, 2 sales; the teacher says billing to all 9
    assert t["accuracy"] == pytest.approx(4 / 9, abs=1e-6)
    assert t["per_class_recall"] == {"billing": 1.0, "bug": 0.0, "sales": 0.0}
    assert t["per_class_n"] == {"billing": 4, "bug": 3, "sales": 2}
    assert t["macro_f1"] == pytest.approx((8 / 13) / 3, abs=1e-6)   # billing F1 2*4/(8+5)
    assert t["f1"] is None and t["accuracy_shifted"] is None        # no shifted split
    same, bugs = metrics["candidates"]["same"], metrics["candidates"]["bugs"]
    assert same["accuracy_drop"] == same["macro_f1_drop"] == 0.0 and same["agreement"]["val"] == 1.0
    assert bugs["accuracy_drop"] == pytest.approx(1 / 9, abs=1e-6)
    assert bugs["macro_f1_drop"] == pytest.approx((8 / 13 - 6 / 12) / 3, abs=1e-6)  # bug F1 2*3/(6+6)
    assert bugs["per_class_recall"] == {"billing": 0.0, "bug": 1.0, "sales": 0.0}
    g = gates["candidates"]["bugs"]["gates"]
    assert g["max_accuracy_drop"]["passed"] and not g["max_macro_f1_drop"]["passed"]
    assert gates["selected"] == "same"
    conf = metrics["confirmation"]
    assert conf["passed"] and conf["teacher"]["accuracy"] == pytest.approx(3 / 7, abs=1e-6)
    md = (root / "reports" / "gates.md").read_text()
    assert "Classes (3): billing, bug, sales" in md and "## Per-class recall: the chosen candidate, 'same'" in md
    assert "| bug | 0.0000 (n=3) | 0.0000 (n=3) | 0.0000 (n=2) | 0.0000 (n=2) |" in md


def test_the_validate_stage_refuses_a_candidate_with_other_labels_and_writes_nothing(tmp_path):
    root = validate_project(tmp_path, candidate_labels=("bug", "billing", "sales"))
    proc = run_validate(root)
    assert proc.returncode == 1
    assert "models/candidates/bugs: ['bug', 'billing', 'sales']" in proc.stderr
    assert "['billing', 'bug', 'sales']" in proc.stderr and "re-compress" in proc.stderr
    assert not (root / "metrics").exists() and not (root / "reports").exists()


# ------------------------------------------------------- registry, status
def test_the_registry_and_status_show_the_label_set_and_macro_f1(tmp_path):
    """A three-class version promoted as the deploy stage records it, then
    `shrinkflow status` (text and --json) as a user runs it."""
    from shrinkflow.gates import GateReport
    from shrinkflow.registry import Registry
    from shrinkflow.status import status_report

    teacher = run(VAL, TEST, lat=20.0)
    slow = run(VAL[:15] + [0, 2, 2], TEST[:9] + [0], lat=5.0)   # test: one sales called billing
    gates = Gates(min_accuracy=0.5, max_accuracy_drop=0.12, max_latency_ms_p95_b1=100.0, max_size_mb=100.0,
                  min_speedup=1.0, max_macro_f1_drop=0.2)
    typed, selection = validate_runs(teacher, {"slow": slow}, LABELS, ValidateParams(gates=gates),
                                     {"slow": FILES["slow"]}, CLASSES)
    metrics, report = typed.to_json_dict(), selection.to_json_dict()
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.onnx").write_bytes(b"weights")
    (model / "shrinkflow_model.json").write_text(json.dumps({"format": "onnx", "max_seq_len": 32,
                                                             "labels": list(CLASSES), "recipe": []}))
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    reg = Registry(tmp_path / "registry")
    record = {"candidate": "slow", "labels": metrics["labels"], "recipe": [], **deployed_figures(typed, "slow").to_json_dict(),
              "confirmation": metrics["confirmation"], "selection": report["reason"], "roi": None, "lineage": {}}
    v = reg.promote(model, GateReport.from_dict(report["candidates"]["slow"]), record).version
    doc = status_report(reg).to_json_dict()["deployed"]
    assert doc["labels"] == list(CLASSES) and doc["version"] == v
    m = doc["metrics"]
    # test: billing 4/4, bug 4/4, sales 1/2 -> F1 8/9, 1, 2/3
    assert m["split"] == "test" and m["macro_f1"] == pytest.approx((8 / 9 + 1 + 2 / 3) / 3, abs=1e-6)
    assert m["per_class_recall"] == {"billing": 1.0, "bug": 1.0, "sales": 0.5}
    assert m["macro_f1_drop"] == pytest.approx(1 - m["macro_f1"], abs=1e-6)
    assert reg.describe_versions()[0].metrics.macro_f1 == m["macro_f1"]

    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "status", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout + proc.stderr

    code, out = cli("--json")
    assert code == 0 and json.loads(out)["deployed"]["labels"] == list(CLASSES)
    code, out = cli()
    assert code == 0, out
    assert "labels (3): billing, bug, sales" in out
    assert "macro_f1                 0.8519   teacher          1" in out
    assert "macro-F1 drop           +0.1481" in out and "McNemar p=1" in out
    assert "recall by class (test): billing 1.000 (teacher 1.000); bug 1.000 (teacher 1.000); " \
           "sales 0.500 (teacher 1.000)" in out
    assert "\n  f1 " not in out  # no positive class among three
