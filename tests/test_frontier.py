"""The frontier: baseline construction, robustness rows, and the verdict."""

from __future__ import annotations

import pytest
import torch

from shrinkflow.config import SmallDirectParams
from shrinkflow.baseline import small_direct_model
from shrinkflow.frontier import (frontier_markdown, matched, plot, robustness_row, robustness_sentences,
                                verdict)

SD = {"accuracy_val": 0.78, "accuracy": 0.78, "accuracy_shifted": 0.60, "latency_ms_p95_b1": 2.0, "size_mb": 12.0,
      "throughput_eps_b32": 900}


def pt(acc, shifted, lat, size, val=None):
    return {"accuracy_val": acc if val is None else val, "accuracy": acc, "accuracy_shifted": shifted,
            "latency_ms_p95_b1": lat, "size_mb": size, "throughput_eps_b32": 500}


def test_matched_budget_includes_the_tolerance_edge():
    cands = {"edge": pt(0.8, 0.7, 2.2, 30), "over": pt(0.9, 0.8, 2.2001, 30), "fast": pt(0.7, 0.6, 1.0, 5)}
    assert set(matched(cands, SD, "latency_ms_p95_b1", 0.10)) == {"edge", "fast"}


def test_verdict_picks_most_accurate_within_each_budget():
    cands = {"distilled": pt(0.83, 0.70, 2.1, 11.0), "int8": pt(0.85, 0.73, 6.0, 23.0),
             "tiny": pt(0.70, 0.55, 1.0, 5.0)}
    lat, size = verdict(cands, "sd", SD, 0.10)
    assert lat["winner"] == "distilled" and lat["points_in_domain"] == pytest.approx(5.0)
    assert lat["points_shifted"] == pytest.approx(10.0)
    assert size["winner"] == "distilled" and size["key"] == "size_mb"


def test_verdict_chooses_on_val_and_reports_test():
    """The winner is the most accurate on val, even when another candidate
    happens to score higher on test: choosing on test would report the best
    of several tries."""
    cands = {"a": pt(0.80, 0.70, 2.0, 10.0, val=0.84), "b": pt(0.86, 0.71, 2.0, 10.0, val=0.82)}
    lat, _ = verdict(cands, "sd", SD, 0.10)
    assert lat["winner"] == "a" and lat["points_in_domain"] == pytest.approx(2.0)


def test_robustness_words_follow_the_figures():
    large = {"fp32": 0.85, "int8": 0.84, "magnitude_50": 0.83}
    small = {"fp32": 0.78, "int8": 0.74, "magnitude_50": 0.70}
    text = " ".join(robustness_sentences({"L": large, "S": small}, "L", "S"))
    assert "lost fewer points under every compression" in text and "holds here" in text
    text = " ".join(robustness_sentences({"L": small, "S": large}, "L", "S"))
    assert "does not show here" in text and "holds" not in text
    mixed = {"fp32": 0.78, "int8": 0.70, "magnitude_50": 0.78}
    text = " ".join(robustness_sentences({"L": large, "S": mixed}, "L", "S"))
    assert "mixed: the large model lost fewer points under 1 of 2 compressions (int8)" in text


def test_verdict_when_nothing_fits_the_budget():
    rows = verdict({"int8": pt(0.85, 0.73, 6.0, 23.0)}, "sd", SD, 0.10)
    assert all(r["winner"] is None for r in rows)


def test_small_direct_has_the_student_shape_and_teacher_embeddings(tiny_teacher_dir):
    from shrinkflow.modeling import load_torch_model

    teacher = load_torch_model(tiny_teacher_dir)
    sd = small_direct_model(teacher, SmallDirectParams(num_layers=1))
    assert sd.config.num_hidden_layers == 1 and sd.config.hidden_size == teacher.config.hidden_size
    assert torch.equal(sd.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    assert not torch.equal(sd.bert.encoder.layer[0].output.dense.weight,
                           teacher.bert.encoder.layer[0].output.dense.weight)
    rnd = small_direct_model(teacher, SmallDirectParams(num_layers=1, init="random"))
    assert not torch.equal(rnd.bert.embeddings.word_embeddings.weight,
                           teacher.bert.embeddings.word_embeddings.weight)


def test_robustness_row_and_report(tmp_path, tiny_teacher_dir, small_splits):
    from shrinkflow.modeling import TOKENIZER, load_tokenizer, load_torch_model

    test = small_splits["test"]
    model = load_torch_model(tiny_teacher_dir)
    before = [p.clone() for p in model.parameters()]
    row = robustness_row(model, load_tokenizer(tiny_teacher_dir / TOKENIZER, 32), test["text"].tolist(),
                         test["label"].to_numpy(), (0.3, 0.9), int8_accuracy=0.5)
    assert set(row) == {"fp32", "int8", "magnitude_30", "magnitude_90"}
    assert all(0.0 <= v <= 1.0 for v in row.values())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # pruned a copy
    points = {"distilled": pt(0.83, 0.70, 2.1, 11.0), "sd": SD}
    plot(points, {"sd"}, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    worse = {k: v - 0.05 for k, v in row.items() if k != "fp32"} | {"fp32": row["fp32"]}
    md = frontier_markdown(pt(0.85, 0.74, 20.0, 91.0), points, {"sd"}, verdict({"distilled": points["distilled"]},
                           "sd", SD, 0.1), {"teacher (large)": row, "small-direct": worse}, SmallDirectParams(), 0.1)
    assert "compressed-large **beats** small-direct by **+5.00 points** in domain" in md
    assert "the large model lost fewer points under every compression" in md


def test_frontier_with_macro_f1_and_no_shifted_split():
    """A user's task without a shifted split: the shifted figures are n/a,
    and macro-F1 margins stand next to the accuracy ones."""
    sd = {**SD, "accuracy_shifted": None, "macro_f1_val": 0.70, "macro_f1": 0.71, "macro_f1_shifted": None}
    student = {**pt(0.83, None, 2.1, 11.0), "macro_f1_val": 0.76, "macro_f1": 0.745, "macro_f1_shifted": None}
    rows = verdict({"student": student}, "sd", sd, 0.10)
    assert rows[0]["points_in_domain"] == pytest.approx(5.0) and rows[0]["points_shifted"] is None
    assert rows[0]["macro_f1_points_in_domain"] == pytest.approx(3.5) and rows[0]["macro_f1_points_shifted"] is None
    teacher = {**pt(0.85, None, 20.0, 91.0), "macro_f1_val": 0.8, "macro_f1": 0.79}
    robustness = {"L": {"fp32": 0.85, "int8": 0.84}, "S": {"fp32": 0.8, "int8": 0.7}}
    md = frontier_markdown(teacher, {"student": student, "sd": sd}, {"sd"}, rows, robustness,
                           SmallDirectParams(), 0.1)
    assert ("compressed-large **beats** small-direct by **+5.00 points** in domain (accuracy) "
            "(macro-F1: +3.50 points in domain)") in md
    assert "| student | compressed large | 0.8300 | 0.8300 | n/a | 0.7600 | 0.7450 | n/a |" in md
    # the built-in task's rows (no macro-F1 recorded) still read as before, with n/a for macro-F1
    legacy = verdict({"d": pt(0.83, 0.70, 2.1, 11.0)}, "sd", SD, 0.10)
    assert legacy[0]["points_shifted"] == pytest.approx(10.0) and legacy[0]["macro_f1_points_in_domain"] is None


def test_frontier_points_on_three_classes_without_a_shifted_split():
    from stages.frontier import _point

    labels = {"val": [0, 1, 2, 2], "test": [0, 1, 2, 1], "shifted": []}
    run = {"predictions": {"val": [0, 1, 2, 0], "test": [0, 1, 2, 1], "shifted": []},
           "performance": {"latency_ms_p95_b1": 1.0, "size_mb": 2.0}}
    p = _point(run, labels, ("billing", "bug", "sales"))
    # val: billing F1 2/3, bug 1, sales 2/3 (tp 1, fn 1)
    assert p["accuracy_val"] == 0.75 and p["macro_f1_val"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3, abs=1e-6)
    assert p["accuracy"] == 1.0 and p["macro_f1"] == 1.0
    assert p["accuracy_shifted"] is None and p["macro_f1_shifted"] is None and p["size_mb"] == 2.0
