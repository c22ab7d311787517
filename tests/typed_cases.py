"""Fixed inputs for tests/test_typed_documents.py: measured runs of a
teacher and candidates as ``shrinkflow.evaluate.measure_interleaved``
returns them, and the params they are validated under. One case per shape
the documents take (binary, several classes, not confirmed on test with the
confirmation enforced or reported only, nothing passing, a batch-variant
candidate served per row). tests/data/typed_before/<case>/ holds what the
code before the typed documents (commit fc418a7) wrote for each."""

from __future__ import annotations

from shrinkflow.config import Gates, ValidateParams

BINARY = ("negative", "positive")
THREE = ("billing", "outage", "feature")


def run(val, test, shifted=(1, 0), lat=1.0, size=1.0, rss=50, flips=0, diff=0.0, rounds=(1.0, 1.1, 1.3, 0.9),
        window=None):
    """One model's measured run: predictions by split, performance (ms, MB),
    its interleaved rounds and, unless ``diff`` is None, batch invariance."""
    preds = {"val": list(val), "test": list(test), "shifted": list(shifted), "reference": [1, 0, 1],
             "unlabelled": [1, 0]}
    if window is not None:
        preds["window_heldout"] = list(window)
    out = {"predictions": preds,
           "performance": {"latency_ms_p50_b1": round(0.8 * lat, 4), "latency_ms_p95_b1": lat,
                           "latency_ms_p50_b32": 10 * lat, "latency_ms_p95_b32": 12.5 * lat,
                           "throughput_eps_b32": round(3200 / lat, 1), "size_mb": size, "peak_rss_mb": rss,
                           "cpu_ms_per_prediction_b1": round(1.7 * lat, 3),
                           "cpu_ms_per_prediction_b32": round(lat / 3, 4),
                           "timing_rounds_b1": 4, "timing_rounds_b32": 4}}
    if rounds:
        out["rounds_b1"] = [[r * lat for r in rounds] for _ in range(4)]
    if diff is not None:
        out["batch_invariance"] = {"max_prob_diff": diff, "mean_prob_diff": diff / 10, "label_flips": flips,
                                   "rows": len(val), "batch_size": 32, "per_row": bool(flips or diff > 1e-4),
                                   "labels_alone": list(val)}
    return out


VAL = [0, 0, 0, 1, 1, 1, 1, 0, 1, 0]
TEST = [0, 1, 1, 0, 1, 0, 1, 0]
GATES = Gates(min_accuracy=0.5, max_accuracy_drop=0.2, max_latency_ms_p95_b1=100.0, max_size_mb=100.0,
              min_speedup=1.0)


def _files(*names):
    return {n: {"files": {"model.onnx": f"{n}-sha"}, "content_hash": f"{n}-hash"} for n in names}


def cases() -> dict[str, dict]:
    """Each case: the keyword arguments of ``validate_runs``."""
    teacher = run(VAL, TEST, lat=20.0, size=90.0, rss=400, diff=None, rounds=(1.0, 1.2, 1.1, 1.0), window=[1, 0, 1])
    binary = dict(teacher_run=teacher,
                  candidate_runs={"small": run(VAL[:9] + [1], TEST, lat=5.0, size=15.3,
                                               window=[1, 0, 0]),
                                  "smaller": run(VAL[:8] + [0, 1], TEST[:7] + [1], lat=4.0, size=6.4,
                                                 diff=2e-5, window=[1, 0, 1])},
                  labels={"val": VAL, "test": TEST, "shifted": [1, 0]},
                  params=ValidateParams(gates=GATES.model_copy(update={"min_window_agreement": 0.5})),
                  files=_files("small", "smaller"), label_names=BINARY)
    y3 = [0, 1, 2, 0, 1, 2, 0, 1, 2]
    multiclass = dict(teacher_run=run(y3, y3, shifted=(), lat=20.0, diff=None),
                      candidate_runs={"fast": run([0, 1, 2, 0, 1, 2, 0, 1, 1], [0, 1, 2, 0, 1, 0, 0, 1, 2], shifted=(),
                                                  lat=3.0)},
                      labels={"val": y3, "test": y3, "shifted": []},
                      params=ValidateParams(gates=GATES.model_copy(update={"max_macro_f1_drop": 0.3})),
                      files=_files("fast"), label_names=THREE)
    # passes on val, misses max_accuracy_drop on test
    bad_on_test = dict(teacher_run=run(VAL, TEST, lat=20.0, diff=None),
                       candidate_runs={"small": run(VAL, [1, 0, 0, 1, 1, 0, 1, 0], lat=5.0)},
                       labels={"val": VAL, "test": TEST, "shifted": [1, 0]},
                       params=ValidateParams(gates=GATES), files=_files("small"), label_names=BINARY)
    reported_only = {**bad_on_test, "params": ValidateParams(gates=GATES, confirm_on_test="report")}
    nothing_passes = dict(teacher_run=run(VAL, TEST, lat=20.0, diff=None),
                          candidate_runs={"a": run([1 - y for y in VAL], TEST, lat=5.0),
                                          "b": run(VAL, TEST, lat=5.0, size=150.0)},
                          labels={"val": VAL, "test": TEST, "shifted": [1, 0]},
                          params=ValidateParams(gates=GATES), files=_files("a", "b"), label_names=BINARY)
    per_row = dict(teacher_run=run(VAL, TEST, lat=20.0, diff=None),
                   candidate_runs={"int8": run(VAL, TEST, lat=5.0, diff=3e-3, flips=1)},
                   labels={"val": VAL, "test": TEST, "shifted": [1, 0]},
                   params=ValidateParams(gates=GATES), files=_files("int8"), label_names=BINARY)
    return {"binary": binary, "multiclass": multiclass, "bad_on_test": bad_on_test,
            "reported_only": reported_only, "nothing_passes": nothing_passes, "per_row": per_row}
