"""Compression and measurement on a tiny real model."""

from __future__ import annotations

import numpy as np
import pytest

from shrinkflow.config import Candidate, LatencyParams, QuantizeStep
from shrinkflow.evaluate import measure_isolated, percentiles_ms
from shrinkflow.stats import accuracy_f1
from shrinkflow.io import dir_size_bytes
from shrinkflow.runtime import load_predictor, predict_labels


@pytest.fixture(scope="module")
def candidates(tmp_path_factory, tiny_teacher_dir):
    from shrinkflow.compress import apply_recipe

    out = tmp_path_factory.mktemp("cands")
    return {"fp32": apply_recipe(tiny_teacher_dir, Candidate(name="fp32"), out / "fp32"),
            "int8": apply_recipe(tiny_teacher_dir, Candidate(name="int8", recipe=(QuantizeStep(),)), out / "int8")}


def test_onnx_export_matches_torch(tiny_teacher_dir, candidates, small_splits):
    texts = small_splits["test"]["text"].tolist()[:16]
    torch_logits = load_predictor(tiny_teacher_dir, threads=1).predict_logits(texts)
    ort_logits = load_predictor(candidates["fp32"], threads=1).predict_logits(texts)
    np.testing.assert_allclose(ort_logits, torch_logits, atol=1e-4)
    # Batch 1 and a one-word text: shapes unlike the export example's.
    for one in (["Superb."], [texts[0]]):
        np.testing.assert_allclose(load_predictor(candidates["fp32"], threads=1).predict_logits(one),
                                   load_predictor(tiny_teacher_dir, threads=1).predict_logits(one), atol=1e-4)


def test_int8_shrinks_saved_size_and_keeps_predictions(tiny_teacher_dir, candidates, small_splits):
    onnx_fp32 = (candidates["fp32"] / "model.onnx").stat().st_size
    onnx_int8 = (candidates["int8"] / "model.onnx").stat().st_size
    assert onnx_int8 < 0.4 * onnx_fp32  # int8 weights: ~4x smaller, embeddings included
    assert dir_size_bytes(candidates["int8"]) < 0.5 * dir_size_bytes(tiny_teacher_dir)
    texts = small_splits["test"]["text"].tolist()
    a = predict_labels(load_predictor(tiny_teacher_dir, threads=1), texts)
    b = predict_labels(load_predictor(candidates["int8"], threads=1), texts)
    assert (a == b).mean() >= 0.9
    logits = load_predictor(candidates["int8"], threads=1).predict_logits(texts[:8])
    assert np.isfinite(logits).all() and logits.shape == (8, 2)


def test_candidate_dir_is_pickle_free_and_self_describing(candidates):
    files = sorted(p.name for p in candidates["int8"].iterdir())
    assert files == ["model.onnx", "shrinkflow_model.json", "tokenizer.json"]
    from shrinkflow.modeling import read_manifest

    man = read_manifest(candidates["int8"])
    assert man["format"] == "onnx" and man["recipe"][0]["method"] == "quantize"


def test_accuracy_f1_by_hand():
    acc, f1 = accuracy_f1(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    assert acc == 0.5 and f1 == pytest.approx(0.5)
    assert accuracy_f1(np.array([0, 0]), np.array([0, 0])) == (1.0, 0.0)
    p50, p95 = percentiles_ms([0.001] * 19 + [0.021])
    assert p50 == pytest.approx(1.0) and p95 == pytest.approx(2.0)


def test_measure_isolated_predicts_every_split_and_times(candidates, tiny_teacher_dir, small_splits):
    lat = LatencyParams(threads=1, warmup_iters=2, iters_b1=10, iters_b32=3)
    splits = {"val": small_splits["val"]["text"].tolist(), "test": small_splits["test"]["text"].tolist(),
              "unlabelled": []}
    run = measure_isolated(candidates["int8"], splits, splits["val"], lat)
    preds, m = run["predictions"], run["performance"]
    assert {k: len(v) for k, v in preds.items()} == {k: len(v) for k, v in splits.items()}
    # what the child process predicted is what the predictor predicts here
    here = predict_labels(load_predictor(candidates["int8"], threads=1), splits["test"])
    assert preds["test"] == here.tolist()
    assert 0 < m["latency_ms_p50_b1"] <= m["latency_ms_p95_b1"]
    assert 0 < m["latency_ms_p50_b32"] <= m["latency_ms_p95_b32"] and m["throughput_eps_b32"] > 0
    assert m["size_mb"] == pytest.approx(dir_size_bytes(candidates["int8"]) / 1e6, rel=1e-3)
    assert m["peak_rss_mb"] > 20
