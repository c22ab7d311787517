"""Compression and measurement on a tiny real model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from shrinkflow.config import Candidate, LatencyParams, QuantizeStep
from shrinkflow.cpuload import disturbance
from shrinkflow.evaluate import interleaved_plan, measure_interleaved, percentiles_ms, time_interleaved
from shrinkflow.stats import accuracy_f1
from shrinkflow.files import dir_size_bytes
from shrinkflow.predictors import load_predictor, predict_labels, predict_served


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


@pytest.mark.slow  # ~10 s: in the full suite, not the quick run
def test_measure_interleaved_predicts_every_split_and_times_side_by_side(candidates, tiny_teacher_dir,
                                                                          small_splits):
    lat = LatencyParams(threads=1, warmup_iters=2, iters_b1=10, iters_b32=3, rounds=4, retimes_when_busy=0)
    splits = {"val": small_splits["val"]["text"].tolist(), "test": small_splits["test"]["text"].tolist(),
              "unlabelled": []}
    runs = measure_interleaved({"teacher": tiny_teacher_dir, "int8": candidates["int8"]}, splits,
                               splits["val"], lat, log=lambda m: None, invariance_texts=splits["val"][:40],
                               invariance_skip=frozenset({"teacher"}))
    assert set(runs) == {"teacher", "int8"}
    # batch invariance measured in the child, for the candidate only, as runtime.batch_invariance gives it here
    from shrinkflow.predictors import batch_invariance

    assert "batch_invariance" not in runs["teacher"]
    inv = dict(runs["int8"]["batch_invariance"])
    # dynamic int8 moves (tests/test_predictors.py), so its splits were predicted one text per call
    assert inv.pop("per_row") is True
    assert inv == batch_invariance(load_predictor(candidates["int8"], threads=1), splits["val"][:40], 32, lat.seed)
    for name, path in (("teacher", tiny_teacher_dir), ("int8", candidates["int8"])):
        preds, m = runs[name]["predictions"], runs[name]["performance"]
        assert {k: len(v) for k, v in preds.items()} == {k: len(v) for k, v in splits.items()}
        # what the child process predicted is what the predictor predicts here
        # (one text per call for int8, as it will be served)
        pred = load_predictor(path, threads=1)
        here = (predict_served(pred, splits["test"], per_row=True).logits.argmax(axis=1) if name == "int8"
                else predict_labels(pred, splits["test"]))
        assert preds["test"] == here.tolist()
        assert 0 < m["latency_ms_p50_b1"] <= m["latency_ms_p95_b1"]
        assert 0 < m["latency_ms_p50_b32"] <= m["latency_ms_p95_b32"] and m["throughput_eps_b32"] > 0
        assert m["cpu_ms_per_prediction_b1"] > 0 and m["cpu_ms_per_prediction_b32"] > 0
        # 10 calls in 4 rounds (3+3+2+2), 3 batches in 3 rounds, warm-up excluded
        assert (m["timing_rounds_b1"], m["timing_rounds_b32"]) == (4, 3)
        assert [len(r) for r in runs[name]["rounds_b1"]] == [3, 3, 2, 2]
        assert m["size_mb"] == pytest.approx(dir_size_bytes(path) / 1e6, rel=1e-3)
        assert m["peak_rss_mb"] > 20
    # torch imported only where the teacher was measured
    assert runs["teacher"]["performance"]["peak_rss_mb"] > runs["int8"]["performance"]["peak_rss_mb"]


def test_the_quietest_timing_is_kept_whatever_its_figures():
    from shrinkflow.evaluate import quietest_timing

    assert quietest_timing([0.9, 0.1, 0.1]) == 1          # the first among equals
    assert quietest_timing([None, 0.3]) == 0              # not measured counts as quiet
    assert quietest_timing([0.4]) == 0
    with pytest.raises(ValueError, match="no timing"):
        quietest_timing([])


@pytest.mark.slow  # ~10 s: in the full suite, not the quick run
@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux's /proc")
def test_models_timed_on_a_busy_machine_are_timed_again_and_the_quietest_timing_is_kept(
        candidates, tiny_teacher_dir, small_splits):
    """Two processes spin on the CPUs while the models are timed: other
    processes took more than a quarter core, so the models are timed again
    (the spinners stop while validate waits), and what the performance
    records is the quieter timing's load, as the log gave it."""
    spin = "while True: pass\n"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(2)]
    logged = []

    def log(msg):
        logged.append(msg)
        if "timing them again" in msg:     # validate waits: the machine goes quiet
            for p in spinners:
                p.kill()

    lat = LatencyParams(threads=1, warmup_iters=2, iters_b1=10, iters_b32=3, rounds=3,
                        retimes_when_busy=1, busy_retime_wait_s=0.5)
    try:
        runs = measure_interleaved({"teacher": tiny_teacher_dir, "int8": candidates["int8"]},
                                   {"val": small_splits["val"]["text"].tolist()[:20]},
                                   small_splits["val"]["text"].tolist(), lat, log=log)
    finally:
        for p in spinners:
            p.kill()
            p.wait(timeout=30)
    again = [m for m in logged if "timing them again" in m]
    assert len(again) == 1 and "(1 of 1 retimes_when_busy)" in again[0], logged
    kept = next(m for m in logged if m.startswith("measure: timed 2 times"))
    figures = [float(x) for x in kept.split("others took ")[1].split(" cores")[0].split(", ")]
    assert figures[0] > 0.25    # the spinners' timing: busy
    # and the timed thread waited for a CPU beside the spinners (three runnable threads on two cores;
    # not necessarily above CPU_WAIT_SHARE: the scheduler favours a thread that wakes from sleep). Not
    # compared with the second timing's: in the full suite the other tests keep the machine as busy
    # as the spinners did (a fresh-clone run: others 1.86 and 1.88 cores, waits 40.7% and 41.8%).
    waited = [float(x.rstrip("%")) / 100
              for x in kept.split("waited for a CPU ")[1].split(" of the time")[0].split(", ")]
    assert len(waited) == 2 and 0 < waited[0] <= 1 and 0 <= waited[1] <= 1, kept
    # The kept timing is the least disturbed by cpuload.disturbance (the largest of others' share of the
    # CPUs, the quota's throttled share and the timed threads' wait), within the log's rounding; comparing
    # others' cores alone picked the wrong one when the busier timing had waited less (a fresh-clone run:
    # the kept timing waited 4.5% where the other, with fewer others' cores, waited 47%).
    k = int(kept.split("kept timing ")[1].split(",")[0]) - 1
    throttled = ([float(x.rstrip("%")) / 100 if x != "?" else None
                  for x in kept.split("throttled ")[1].split(" of its periods")[0].split(", ")]
                 if "throttled " in kept else [None, None])
    for run in runs.values():
        perf = run["performance"]
        assert perf["timing_attempts"] == 2
        shares = [disturbance(c, perf["timing_cpus"], q, w) for c, q, w in zip(figures, throttled, waited)]
        assert shares[k] <= min(shares) + 0.006, (kept, shares)
        assert perf["timing_other_cores"] == pytest.approx(figures[k], abs=0.006)
        assert perf["timing_cpu_wait_share"] == pytest.approx(waited[k], abs=0.0006)


def test_a_model_that_cannot_load_names_itself(tmp_path, small_splits):
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "shrinkflow_model.json").write_text('{"format": "onnx", "max_seq_len": 16}')
    with pytest.raises(RuntimeError, match="broken"):
        measure_interleaved({"broken": bad}, {"val": ["a"]}, ["a"], LatencyParams(iters_b1=5, iters_b32=3),
                            log=lambda m: None)


class _Recorder:
    """A handle that records what the interleaved timer asks of it."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def warm(self, inputs):
        self.calls.append((self.name, "warm", len(inputs)))

    def time(self, inputs):
        self.calls.append((self.name, "time", len(inputs)))
        return [0.001] * len(inputs), 0.002 * len(inputs)


def test_interleaved_timer_gives_every_model_the_same_rounds_and_excludes_warmup():
    calls = []
    models = {n: _Recorder(n, calls) for n in ("a", "b", "c")}
    out = time_interleaved(models, ["w"] * 5, [["x"] * 3, ["x"] * 3, ["x"] * 2, ["x"] * 2])
    # warm-up first, untimed, for every model
    assert calls[:3] == [("a", "warm", 5), ("b", "warm", 5), ("c", "warm", 5)]
    timed = [c for c in calls if c[1] == "time"]
    # alternating: every model once per round, the order rotated each round
    assert [c[0] for c in timed] == list("abc" "bca" "cab" "abc")
    for n in "abc":
        assert out[n]["rounds"] == 4 and len(out[n]["seconds"]) == 10  # warm-up not counted
        assert out[n]["cpu_seconds"] == pytest.approx(0.02)
    assert interleaved_plan(["a", "b"], 3) == [["a", "b"], ["b", "a"], ["a", "b"]]
    assert interleaved_plan([], 3) == []


def test_latency_inputs_are_the_same_for_every_model_and_split_evenly():
    from shrinkflow.evaluate import latency_inputs

    lat = LatencyParams(warmup_iters=4, iters_b1=10, iters_b32=5, rounds=3, seed=1)
    texts = [f"t{i}" for i in range(50)]
    warm1, b1, warm32, b32 = latency_inputs(texts, lat)
    assert len(warm1) == 4 and [len(r) for r in b1] == [4, 3, 3] and all(len(x) == 1 for r in b1 for x in r)
    assert len(warm32) == 3 and [len(r) for r in b32] == [2, 2, 1] and all(len(x) == 32 for r in b32 for x in r)
    assert latency_inputs(texts, lat) == (warm1, b1, warm32, b32)  # seeded: drawn once, reproducible


def test_fused_graph_keeps_logits_and_quantizes(tmp_path, tiny_teacher_dir, small_splits):
    """ORT's transformer fusions change kernels, not the function: logits stay
    within a small tolerance of the unfused model, fp32 and after int8."""
    from shrinkflow.compress import apply_recipe
    from shrinkflow.modeling import read_manifest

    texts = small_splits["test"]["text"].tolist()[:24] + ["Superb."]
    train = small_splits["train"]["text"].tolist()
    built = {}
    for fuse in (False, True):
        for name, recipe in (("fp32", ()), ("int8", (QuantizeStep(),))):
            built[name, fuse] = apply_recipe(tiny_teacher_dir, Candidate(name=name, recipe=recipe),
                                             tmp_path / f"{name}-{fuse}", train_texts=train, progress=False,
                                             fuse=fuse)
    ops = read_manifest(built["fp32", True])["stats"]["fused_ops"]
    assert ops.get("SkipLayerNormalization", 0) >= 2 and ops.get("BiasGelu", 0) >= 2  # 2 layers
    assert "fused_ops" not in read_manifest(built["fp32", False])["stats"]
    import onnx

    kinds = {n.op_type for n in onnx.load(str(built["fp32", True] / "model.onnx")).graph.node}
    assert {"SkipLayerNormalization", "BiasGelu"} <= kinds
    ref = load_predictor(tiny_teacher_dir, threads=1).predict_logits(texts)
    fused = load_predictor(built["fp32", True], threads=1).predict_logits(texts)
    np.testing.assert_allclose(fused, ref, atol=1e-4)
    q, qf = (load_predictor(built["int8", f], threads=1).predict_logits(texts) for f in (False, True))
    assert np.abs(qf - ref).max() < 0.1 and (qf.argmax(1) == q.argmax(1)).mean() >= 0.9


def test_a_fusion_that_changes_the_logits_is_refused(tmp_path, candidates, small_splits):
    import shutil

    from shrinkflow.compress.export import fuse_transformer_graph
    from shrinkflow.compress.recipe import calibration_feeds
    from shrinkflow.modeling import TOKENIZER

    path = tmp_path / "model.onnx"
    shutil.copy(candidates["fp32"] / "model.onnx", path)
    before = path.read_bytes()
    feeds = calibration_feeds((candidates["fp32"] / TOKENIZER).read_text(), ["a fine film", "dull"], 8, 32)
    with pytest.raises(RuntimeError, match="differ by"):
        fuse_transformer_graph(path, 2, 32, feeds, atol=-1.0)  # no graph can pass a negative tolerance
    assert path.read_bytes() == before and not list(tmp_path.glob(".*"))


def test_measuring_processes_keep_the_tokenizer_to_the_callers_thread(candidates, small_splits, monkeypatch):
    """The tokenizer's own thread pool (Hugging Face tokenizers, rayon, one
    thread per CPU) adds runnable threads beyond validate.latency.threads:
    with it on, a quiet 2-core machine's timing of the R8 models waited
    17-19% of the time (the wait gate refuses above 5%) against 1.1% with
    it off, as every stage runs (TOKENIZERS_PARALLELISM=false). A measuring
    process turns it off whatever the caller's environment says."""
    from shrinkflow.evaluate import ModelProcess

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    texts = small_splits["test"]["text"].tolist()[:32]
    proc = ModelProcess(candidates["int8"], threads=1)
    try:
        loaded = len(os.listdir(f"/proc/{proc.pid}/task"))
        proc.warm([texts, texts])   # batches of 32: the tokenizer's pool would start here
        after = len(os.listdir(f"/proc/{proc.pid}/task"))
    finally:
        proc.stop()
    assert after == loaded, (loaded, after)
