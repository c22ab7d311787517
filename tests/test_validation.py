"""Choose on one split, report on another: paired statistics, the accuracy-
drop basis, selection on val and confirmation on test, on tiny hand-made
predictions whose answers can be worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shrinkflow.config import Gates, ValidateParams
from shrinkflow.gates import evaluate_gates
from shrinkflow.stats import agreement, mcnemar_exact_p, paired_accuracy_drop, quality
from shrinkflow.validation import deployed_figures, validate_runs


def test_paired_drop_by_hand():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    t = [1, 1, 1, 1, 0, 0, 0, 0, 0, 1]   # 8/10
    c = [1, 1, 0, 0, 0, 0, 0, 1, 1, 1]   # 6/10
    d = paired_accuracy_drop(y, t, c, confidence=0.95)
    # discordant: teacher-only right at 2, 3, 7; candidate-only right at 8
    assert (d["teacher_only_correct"], d["candidate_only_correct"], d["n"]) == (3, 1, 10)
    assert d["accuracy_drop"] == pytest.approx(0.2)
    se = math.sqrt(3 + 1 - (3 - 1) ** 2 / 10) / 10
    assert d["accuracy_drop_se"] == pytest.approx(se, abs=1e-6)
    assert d["accuracy_drop_ci_high"] == pytest.approx(0.2 + 1.959964 * se, abs=1e-5)
    assert d["accuracy_drop_ci_low"] == pytest.approx(0.2 - 1.959964 * se, abs=1e-5)
    # exact two-sided binomial: 2 * P(X <= 1 | n=4, p=1/2) = 2 * 5/16
    assert d["mcnemar_p"] == pytest.approx(0.625)


def test_mcnemar_edges():
    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(5, 5) == 1.0
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)


def test_agreement_needs_no_labels():
    assert agreement([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert agreement([], []) is None
    with pytest.raises(ValueError):
        agreement([1], [1, 0])


def test_quality_three_rows():
    # class 0: tp 1, fp 1, fn 0 -> F1 2/3; class 1: tp 1, fp 0, fn 1 -> F1 2/3
    assert quality([1, 0, 1], [1, 0, 0], ("negative", "positive")) == {
        "accuracy": pytest.approx(0.666667), "f1": pytest.approx(2 / 3), "macro_f1": pytest.approx(2 / 3),
        "per_class_recall": {"negative": 1.0, "positive": 0.5}, "per_class_n": {"negative": 1, "positive": 2},
        "n": 3}


TEACHER = {"accuracy": 0.85, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}


@pytest.mark.parametrize("high, passes", [(0.01, True), (0.0101, False), (0.0099, True)])
def test_upper_bound_basis_gates_on_the_interval(high, passes):
    gates = Gates(accuracy_drop_basis="upper_bound", max_accuracy_drop=0.01, min_speedup=1.0)
    cand = {"accuracy": 0.85, "accuracy_drop": 0.0, "accuracy_drop_ci_high": high, "latency_ms_p95_b1": 1.0,
            "size_mb": 1.0}
    r = next(g for g in evaluate_gates("c", cand, TEACHER, gates).results if g.name == "max_accuracy_drop")
    assert r.passed is passes and r.value == high
    # the same candidate passes on the point estimate (drop 0)
    point = next(g for g in evaluate_gates("c", cand, TEACHER, gates.model_copy(
        update={"accuracy_drop_basis": "point"})).results if g.name == "max_accuracy_drop")
    assert point.passed and point.value == 0.0


def run(val, test, shifted=(1, 0), lat=1.0, size=1.0):
    return {"predictions": {"val": list(val), "test": list(test), "shifted": list(shifted), "unlabelled": [1, 0]},
            "performance": {"latency_ms_p50_b1": lat, "latency_ms_p95_b1": lat, "latency_ms_p50_b32": 10 * lat,
                            "latency_ms_p95_b32": 10 * lat, "throughput_eps_b32": 100.0, "size_mb": size,
                            "peak_rss_mb": 50.0, "cpu_ms_per_prediction_b1": 2 * lat,
                            "cpu_ms_per_prediction_b32": lat / 2}}


LABELS = {"val": [1, 1, 0, 0, 1, 0, 1, 0, 1, 0], "test": [1, 0, 1, 0, 1, 0, 1, 0, 1, 0], "shifted": [1, 1]}
FILES = {"fast": {"files": {"model.onnx": "a"}, "content_hash": "A"},
         "slow": {"files": {"model.onnx": "b"}, "content_hash": "B"}}
PARAMS = ValidateParams(gates=Gates(min_accuracy=0.5, max_accuracy_drop=0.15, max_latency_ms_p95_b1=100.0,
                                    max_size_mb=100.0, min_speedup=1.0))


def test_selection_on_val_confirmation_on_test():
    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    fast = run(LABELS["val"][:9] + [1], LABELS["test"], lat=2.0)        # val 9/10, test 10/10
    slow = run(LABELS["val"], LABELS["test"][:8] + [0, 1], lat=5.0)     # val 10/10, test 8/10
    metrics, gates = validate_runs(teacher, {"fast": fast, "slow": slow}, LABELS, PARAMS, FILES)
    assert gates.selected == "fast"  # fastest passing on val
    assert metrics.candidates["fast"].accuracy == 0.9 and metrics.candidates["fast"].split == "val"
    assert metrics.candidates["fast"].agreement == {"val": 0.9, "test": 1.0, "shifted": 1.0, "unlabelled": 1.0}
    conf = metrics.confirmation
    assert conf.candidate == "fast" and conf.split == "test" and conf.passed
    assert conf.metrics.accuracy == 1.0 and conf.teacher.accuracy == 1.0
    # the other candidate was never scored on test: no test accuracy anywhere
    assert "slow" not in str(conf.to_json_dict()) and all(
        "test" not in k for k in metrics.candidates["slow"].to_json_dict() if k != "agreement")
    shown = deployed_figures(metrics, "fast")
    assert shown.metrics.split == "test" and shown.metrics.accuracy == 1.0
    assert shown.metrics.latency_ms_p95_b1 == 2.0
    assert shown.selection_metrics.accuracy == 0.9 and shown.teacher_metrics.accuracy == 1.0
    assert "files" not in shown.to_json_dict()["selection_metrics"] and "files" not in shown.to_json_dict()["metrics"]
    with pytest.raises(ValueError):
        deployed_figures(metrics, "slow")


def test_a_choice_not_confirmed_on_test_is_not_deployed_or_only_reported():
    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    cand = run(LABELS["val"], [1 - y for y in LABELS["test"]], lat=2.0)   # perfect on val, 0/10 on test
    metrics, gates = validate_runs(teacher, {"fast": cand}, LABELS, PARAMS, {"fast": FILES["fast"]})
    assert gates.selected is None
    assert "was not confirmed on test" in gates.reason and "min_accuracy FAILED on test" in gates.reason
    assert gates.best_effort == "fast" and not metrics.confirmation.passed
    report_only = PARAMS.model_copy(update={"confirm_on_test": "report"})
    _, gates = validate_runs(teacher, {"fast": cand}, LABELS, report_only, {"fast": FILES["fast"]})
    assert gates.selected == "fast" and "not confirmed on test, reported only" in gates.reason


def test_a_choice_not_confirmed_on_test_is_set_aside_and_the_next_on_val_is_confirmed():
    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    fast = run(LABELS["val"], [1 - y for y in LABELS["test"]], lat=2.0)      # first on val, 0/10 on test
    slow = run(LABELS["val"], LABELS["test"][:9] + [1], lat=5.0)            # next on val, 9/10 on test
    metrics, gates = validate_runs(teacher, {"fast": fast, "slow": slow}, LABELS, PARAMS, FILES)
    assert gates.selected == "slow"
    assert metrics.confirmation.candidate == "slow" and metrics.confirmation.passed
    assert [c.candidate for c in gates.unconfirmed] == ["fast"] and not gates.unconfirmed[0].passed
    assert "Set aside before it: 'fast' passed every gate on val but was not confirmed on test: " \
           "min_accuracy FAILED on test: 0" in gates.reason
    assert deployed_figures(metrics, "slow").metrics.accuracy == 0.9
    from shrinkflow.markdown import validation_markdown

    md = validation_markdown(metrics, gates)
    assert "## Set aside on test" in md and md.index("'slow', is scored") < md.index("## Set aside on test")

    # both fail on test: nothing deployed, each set aside in val's order, the
    # first choice the best effort
    worse = run(LABELS["val"], [1 - y for y in LABELS["test"]], lat=5.0)
    metrics, gates = validate_runs(teacher, {"fast": fast, "slow": worse}, LABELS, PARAMS, FILES)
    assert gates.selected is None and gates.best_effort == "fast"
    assert [c.candidate for c in gates.unconfirmed] == ["fast"]   # and the last tried, in confirmation
    assert gates.reason.startswith("no candidate deployed: 'fast' passed every gate on val but was not confirmed")
    assert "'slow' passed every gate on val but was not confirmed on test" in gates.reason
    assert metrics.confirmation.candidate == "slow" and not metrics.confirmation.passed

    # a candidate failing on val is never scored on test, even when the one chosen fails there
    bad_val = run([1 - y for y in LABELS["val"]], LABELS["test"], lat=5.0)
    metrics, gates = validate_runs(teacher, {"fast": fast, "slow": bad_val}, LABELS, PARAMS, FILES)
    assert gates.selected is None and gates.unconfirmed is None and metrics.confirmation.candidate == "fast"


def test_on_a_recompression_an_unconfirmed_new_candidate_leaves_production_kept():
    from shrinkflow.artifacts import PRODUCTION_CANDIDATE

    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    fast = run(LABELS["val"], [1 - y for y in LABELS["test"]], lat=2.0)
    prod = run(LABELS["val"], LABELS["test"], lat=3.0)
    files = {"fast": FILES["fast"], PRODUCTION_CANDIDATE: FILES["slow"]}
    lenient = PARAMS.model_copy(update={"gates": PARAMS.gates.model_copy(update={
        "max_p95_b1_slowdown_vs_production": 10.0, "min_window_agreement": 0.0})})
    _, gates = validate_runs(teacher, {"fast": fast, PRODUCTION_CANDIDATE: prod}, LABELS, lenient, files,
                             production_version="v0003")
    assert gates.selected == PRODUCTION_CANDIDATE and [c.candidate for c in gates.unconfirmed] == ["fast"]


def test_nothing_passes_on_val_means_nothing_is_scored_on_test():
    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    bad = run([1 - y for y in LABELS["val"]], LABELS["test"], lat=2.0)
    metrics, gates = validate_runs(teacher, {"fast": bad}, LABELS, PARAMS, {"fast": FILES["fast"]})
    assert gates.selected is None and metrics.confirmation is None


def test_interleaved_rounds_give_a_round_by_round_speedup_that_the_gate_checks():
    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    cand = run(LABELS["val"], LABELS["test"], lat=2.0)
    # pooled p95s say 10x; round by round the candidate is only 1.5x faster except in one noisy round
    teacher["rounds_b1"] = [[0.003] * 5, [0.003] * 5, [0.003] * 5]
    cand["rounds_b1"] = [[0.002] * 5, [0.002] * 5, [0.0001] * 5]
    params = PARAMS.model_copy(update={"gates": PARAMS.gates.model_copy(update={"min_speedup": 2.0})})
    metrics, gates = validate_runs(teacher, {"fast": cand}, LABELS, params, {"fast": FILES["fast"]})
    assert metrics.candidates["fast"].speedup_p95_b1 == pytest.approx(1.5)
    g = gates.candidates["fast"].gates["min_speedup"]
    assert not g.passed and g.value == pytest.approx(1.5) and gates.selected is None


def test_a_recompression_gates_the_slowdown_on_the_candidates_own_rounds_against_productions():
    """Candidate and production timed in the same rounds: the slowdown is
    their ratio round by round (median), whatever the teacher did. Here the
    ratio of the two speedups over the teacher (10 / 5) would call "same"
    twice as slow as production; round by round it is as fast (2/1, 2/2,
    2/3: median 1), and "slower", 1.2x production in every round, fails by
    0.10."""
    from shrinkflow.artifacts import PRODUCTION_CANDIDATE
    from shrinkflow.validation import production_ratios

    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    prod = run(LABELS["val"], LABELS["test"], lat=3.0)
    same = run(LABELS["val"], LABELS["test"], lat=3.0)
    slower = run(LABELS["val"], LABELS["test"], lat=3.6)
    teacher["rounds_b1"] = [[0.010] * 4, [0.010] * 4, [0.030] * 4]
    prod["rounds_b1"] = [[0.001] * 4, [0.002] * 4, [0.003] * 4]
    same["rounds_b1"] = [[0.002] * 4, [0.002] * 4, [0.002] * 4]
    slower["rounds_b1"] = [[0.0012] * 4, [0.0024] * 4, [0.0036] * 4]
    runs = {"same": same, "slower": slower, PRODUCTION_CANDIDATE: prod}
    assert production_ratios(runs, PRODUCTION_CANDIDATE) == {"same": 1.0, "slower": pytest.approx(1.2)}
    assert production_ratios({**runs, PRODUCTION_CANDIDATE: {**prod, "rounds_b1": None}}, PRODUCTION_CANDIDATE) == {}
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):   # not timed together
        production_ratios({**runs, "same": {**same, "rounds_b1": same["rounds_b1"][:2]}}, PRODUCTION_CANDIDATE)
    params = PARAMS.model_copy(update={"gates": PARAMS.gates.model_copy(update={
        "min_window_agreement": 0.0, "min_speedup": 1.0})})
    files = {"same": FILES["fast"], "slower": FILES["slow"], PRODUCTION_CANDIDATE: FILES["slow"]}
    metrics, gates = validate_runs(teacher, runs, LABELS, params, files, production_version="v0003")
    assert metrics.candidates["same"].p95_b1_ratio_vs_production == 1.0
    assert metrics.candidates[PRODUCTION_CANDIDATE].speedup_p95_b1 / metrics.candidates["same"].speedup_p95_b1 == 2.0
    assert metrics.candidates[PRODUCTION_CANDIDATE].p95_b1_ratio_vs_production is None
    g = gates.candidates["same"].gates["max_p95_b1_slowdown_vs_production"]
    assert g.passed and g.value == 0.0
    g = gates.candidates["slower"].gates["max_p95_b1_slowdown_vs_production"]
    assert not g.passed and g.value == pytest.approx(0.2) and g.margin == pytest.approx(-0.1)
    assert "max_p95_b1_slowdown_vs_production" not in gates.candidates[PRODUCTION_CANDIDATE].gates
    assert gates.selected == "same"


@pytest.mark.parametrize("action, selected", [("serve_per_row", "fast"), ("refuse", "slow")])
def test_a_batch_dependent_candidate_is_served_per_row_or_refused_and_the_report_says_which(action, selected):
    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    fast = run(LABELS["val"], LABELS["test"], lat=2.0)
    slow = run(LABELS["val"], LABELS["test"], lat=5.0)
    fast["batch_invariance"] = {"rows": 10, "batch_size": 32, "max_prob_diff": 0.129, "mean_prob_diff": 0.01,
                                "label_flips": 1, "labels_alone": [1] * 10}
    slow["batch_invariance"] = {"rows": 10, "batch_size": 32, "max_prob_diff": 0.0, "mean_prob_diff": 0.0,
                                "label_flips": 0, "labels_alone": [1] * 10}
    params = PARAMS.model_copy(update={"gates": PARAMS.gates.model_copy(update={"batch_variant_action": action})})
    metrics, gates = validate_runs(teacher, {"fast": fast, "slow": slow}, LABELS, params, FILES)
    assert gates.selected == selected
    g = gates.candidates["fast"].gates["max_batch_prob_diff"]
    assert not g.passed and g.value == 0.129 and g.threshold == 1e-4
    assert g.enforced is (action == "refuse")
    assert ("served one text per call" if action == "serve_per_row" else "refused") in g.note
    assert gates.candidates["slow"].gates["max_batch_prob_diff"].passed
    # figures carry the measurement but not the per-text labels
    assert metrics.candidates["fast"].batch_invariance.label_flips == 1
    assert "labels_alone" not in metrics.candidates["fast"].batch_invariance.to_json_dict()
    from shrinkflow.gates import serves_per_row
    from shrinkflow.markdown import validation_markdown

    assert serves_per_row(gates.candidates["fast"].to_report()) is True
    assert serves_per_row(gates.candidates["slow"].to_report()) is False
    md = validation_markdown(metrics, gates)
    assert "max_batch_prob_diff" in md and ("served one text per call" in md if action == "serve_per_row"
                                            else "**FAIL**: not batch-invariant" in md)


def _validate_timed(timing: dict):
    """validate_runs on a slow teacher and a fast candidate whose timing went
    as ``timing`` says (the Performance timing_ fields)."""
    teacher, fast = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0), run(LABELS["val"], LABELS["test"], lat=2.0)
    for r in (teacher, fast):
        r["performance"].update(timing)
    return validate_runs(teacher, {"fast": fast}, LABELS, PARAMS, FILES)


@pytest.mark.parametrize("other, attempts", [(0.9, 2), (0.1, 2), (0.9, 1), (0.1, 1)])
def test_how_the_timing_went_reaches_the_gates_the_report_and_not_the_deployed_figures(other, attempts):
    """measure_interleaved records how many timings there were and what
    other processes took during the one kept; the latency gates' notes and
    reports/gates.md say so when the machine stayed busy (or was retimed),
    the verdicts are those of the figures, and a deployed version's figures
    carry no timing bookkeeping."""
    from shrinkflow.markdown import validation_markdown

    # on 4 cores: 0.9 of them is under max_timing_other_cpu_share (a quarter), so it notes but passes
    timing = {"timing_attempts": attempts, "timing_other_cores": other, "timing_cpus": 4}
    metrics, gates = _validate_timed(timing)
    assert gates.selected == "fast"
    assert (metrics.teacher.timing_attempts, metrics.candidates["fast"].timing_other_cores) == (attempts, other)
    notes = {n: g.note for n, g in gates.candidates["fast"].gates.items()}
    busy = other > 0.25
    assert all(("took 0.90 cores" in notes[n]) is busy for n in ("max_latency_ms_p95_b1", "min_speedup"))
    assert "cores" not in notes["max_size_mb"] + notes["min_accuracy"]
    md = validation_markdown(metrics, gates)
    timing_line = next((line for line in md.splitlines() if line.startswith("Timing:")), None)
    assert (timing_line is not None) is (busy or attempts > 1)
    if timing_line:
        assert (f"timed {attempts} times" in timing_line) is (attempts > 1)
        assert f"took {other:.2f} cores" in timing_line and ("may be off" in timing_line) is busy
    assert gates.candidates["fast"].gates["max_timing_other_cpu_share"].value == pytest.approx(other / 4)
    assert not {"timing_attempts", "timing_other_cores", "timing_cpus"} & set(
        deployed_figures(metrics, "fast").metrics.to_json_dict())


@pytest.mark.parametrize("share", [0.0, 0.3])
def test_a_timing_the_cgroup_quota_throttled_refuses_and_says_so(share):
    """In a container with a CPU quota, the share of its periods that
    throttled the models reaches metrics/validate.json, the gate
    max_timing_throttled_share and reports/gates.md; not a deployed
    version's figures."""
    from shrinkflow.markdown import validation_markdown

    timing = {"timing_attempts": 1, "timing_other_cores": 0.0, "timing_cpus": 2, "timing_cpu_quota": 1.0,
              "timing_throttled_share": share}
    metrics, gates = _validate_timed(timing)
    assert metrics.candidates["fast"].timing_throttled_share == share
    g = gates.candidates["fast"].gates["max_timing_throttled_share"]
    assert (g.passed, gates.selected) == ((True, "fast") if share == 0.0 else (False, None))
    md = validation_markdown(metrics, gates)
    timing_line = next((line for line in md.splitlines() if line.startswith("Timing:")), None)
    if share:
        assert "quota (1 cores) throttled 30.0% of its periods" in timing_line and "may be off" in timing_line
    else:
        assert timing_line is None
    if not share:   # only a confirmed candidate is deployed
        assert not {k for k in timing} & set(deployed_figures(metrics, "fast").metrics.to_json_dict())



@pytest.mark.parametrize("wait", [0.03, 0.2])
def test_a_timing_whose_threads_waited_for_a_cpu_refuses_and_says_so(wait):
    """The share of the time the timed threads waited for a CPU reaches
    metrics/validate.json, the gate max_timing_cpu_wait_share and
    reports/gates.md (others' share was low: only the wait tells); not a
    deployed version's figures."""
    from shrinkflow.markdown import validation_markdown

    GATE_WAIT = Gates().max_timing_cpu_wait_share

    timing = {"timing_attempts": 2, "timing_other_cores": 0.2, "timing_cpus": 2, "timing_cpu_wait_share": wait}
    metrics, gates = _validate_timed(timing)
    assert metrics.candidates["fast"].timing_cpu_wait_share == wait
    g = gates.candidates["fast"].gates["max_timing_cpu_wait_share"]
    assert (g.passed, gates.selected) == ((True, "fast") if wait < GATE_WAIT else (False, None))
    assert gates.candidates["fast"].gates["max_timing_other_cpu_share"].passed
    timing_line = next(line for line in validation_markdown(metrics, gates).splitlines() if line.startswith("Timing:"))
    assert "timed 2 times" in timing_line
    assert ("the timed threads waited for a CPU 20.0% of the time" in timing_line) is (wait > GATE_WAIT)
    assert ("may be off" in timing_line) is (wait > GATE_WAIT)
    if wait < GATE_WAIT:
        assert not {k for k in timing} & set(deployed_figures(metrics, "fast").metrics.to_json_dict())

# ---------------------------------------------------------------- in-domain accuracy against production

def test_a_recompression_gates_new_candidates_on_val_against_productions_measured_accuracy():
    from shrinkflow.artifacts import PRODUCTION_CANDIDATE

    # the teacher 9/10 on val: the new candidate (8/10) is within max_accuracy_drop (0.15) of it
    teacher = run(LABELS["val"][:9] + [1], LABELS["test"], lat=20.0, size=90.0)
    prod = run(LABELS["val"], LABELS["test"], lat=3.0)                     # val 10/10
    worse = run(LABELS["val"][:8] + [0, 1], LABELS["test"], lat=2.0)      # val 8/10: 0.2 under production
    params = PARAMS.model_copy(update={"gates": PARAMS.gates.model_copy(update={
        "max_p95_b1_slowdown_vs_production": 10.0, "max_accuracy_drop_vs_production": 0.1})})
    files = {"fast": FILES["fast"], PRODUCTION_CANDIDATE: FILES["slow"]}
    _, gates = validate_runs(teacher, {"fast": worse, PRODUCTION_CANDIDATE: prod}, LABELS, params, files,
                             production_version="v0003")
    g = gates.candidates["fast"].gates["max_accuracy_drop_vs_production"]
    assert not g.passed and g.value == pytest.approx(0.2) and g.margin == pytest.approx(-0.1)
    assert "production v0003's 1" in g.note
    assert "max_accuracy_drop_vs_production" not in gates.candidates[PRODUCTION_CANDIDATE].gates
    assert gates.selected == PRODUCTION_CANDIDATE    # production kept: the new one loses in domain
    loose = params.model_copy(update={"gates": params.gates.model_copy(update={
        "max_accuracy_drop_vs_production": 0.2})})
    _, gates = validate_runs(teacher, {"fast": worse, PRODUCTION_CANDIDATE: prod}, LABELS, loose, files,
                             production_version="v0003")
    assert gates.selected == "fast"


def test_a_retrain_gates_its_candidates_against_productions_recorded_val_accuracy_on_the_same_split():
    from shrinkflow.artifacts import PreviousTeacher, RecordedProduction, RetrainRecord
    from shrinkflow.validation import retrain_production

    prod = RecordedProduction(version="v0002", val_accuracy=1.0, val_md5="a" * 32, test_accuracy=1.0,
                              test_md5="c" * 32)
    record = RetrainRecord(previous_teacher=PreviousTeacher(content_hash="old", val_accuracy=0.9,
                                                            feedback_heldout_accuracy=0.5, feedback_heldout_rows=4),
                           production=prod)
    assert retrain_production(record, "new", "a" * 32, "c" * 32) == (prod, None)
    assert retrain_production(record, "old", "a" * 32, "c" * 32) == (None, None)  # the teacher was not retrained
    assert retrain_production(RetrainRecord(), "new", "a" * 32) == (None, None)  # no retrain at all
    recorded, why = retrain_production(record, "new", "b" * 32, "c" * 32)
    assert recorded is None and "measured on another val split" in why and "b" * 32 in why
    recorded, why = retrain_production(record.model_copy(update={"production": None}), "new", "a" * 32)
    assert recorded is None and "not applied" in why
    # another test split: val still gates, test does not confirm against it
    recorded, why = retrain_production(record, "new", "a" * 32, "d" * 32)
    assert recorded.val_accuracy == 1.0 and recorded.test_accuracy is None
    assert "another test split" in why and "d" * 32 in why
    # an older manifest without a test accuracy: the same, and said
    recorded, why = retrain_production(record.model_copy(update={"production": prod.model_copy(
        update={"test_accuracy": None, "test_md5": None})}), "new", "a" * 32, "c" * 32)
    assert recorded.test_accuracy is None and "records no test accuracy" in why

    teacher = run(LABELS["val"][:9] + [1], LABELS["test"], lat=20.0, size=90.0)     # val 0.9
    worse = run(LABELS["val"][:8] + [0, 1], LABELS["test"], lat=2.0)      # val 0.8 against production's 1.0
    _, gates = validate_runs(teacher, {"fast": worse}, LABELS, PARAMS, {"fast": FILES["fast"]},
                             recorded_production=prod)
    g = gates.candidates["fast"].gates["max_accuracy_drop_vs_production"]
    assert not g.passed and g.value == pytest.approx(0.2) and "production v0002's 1" in g.note
    assert gates.selected is None and gates.production is None   # production is no candidate on a retrain
    _, gates = validate_runs(teacher, {"fast": worse}, LABELS, PARAMS, {"fast": FILES["fast"]})
    assert "max_accuracy_drop_vs_production" not in gates.candidates["fast"].gates and gates.selected == "fast"


def test_the_choice_is_confirmed_against_production_on_test_too():
    """Val within max_accuracy_drop_vs_production but test not: the choice is
    set aside on a re-compression (production kept) and on a retrain (the
    next candidate on val's order is confirmed instead)."""
    from shrinkflow.artifacts import PRODUCTION_CANDIDATE, RecordedProduction
    from shrinkflow.retrain import production_lines, retrain_outcome

    teacher = run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0)
    prod = run(LABELS["val"], LABELS["test"], lat=3.0)                        # test 10/10
    fast = run(LABELS["val"], LABELS["test"][:9] + [1], lat=2.0)              # test 9/10: 0.1 under it
    params = PARAMS.model_copy(update={"gates": PARAMS.gates.model_copy(update={
        "max_p95_b1_slowdown_vs_production": 10.0, "min_window_agreement": 0.0,
        "max_accuracy_drop_vs_production": 0.05})})
    files = {"fast": FILES["fast"], PRODUCTION_CANDIDATE: FILES["slow"]}
    _, gates = validate_runs(teacher, {"fast": fast, PRODUCTION_CANDIDATE: prod}, LABELS, params, files,
                             production_version="v0003")
    assert gates.candidates["fast"].passed        # on val it ties production
    (miss,) = gates.unconfirmed
    g = miss.gates.gates["max_accuracy_drop_vs_production"]
    assert (miss.candidate, g.passed, g.value, g.margin) == ("fast", False, pytest.approx(0.1), pytest.approx(-0.05))
    assert "test accuracy 0.9 against production v0003's 1" in g.note
    assert gates.selected == PRODUCTION_CANDIDATE and "max_accuracy_drop_vs_production" in gates.reason
    # production's own confirmation is not gated against itself
    assert "max_accuracy_drop_vs_production" not in gates.confirmation.gates.gates
    at_edge = params.model_copy(update={"gates": params.gates.model_copy(update={
        "max_accuracy_drop_vs_production": 0.1})})
    _, gates = validate_runs(teacher, {"fast": fast, PRODUCTION_CANDIDATE: prod}, LABELS, at_edge, files,
                             production_version="v0003")
    assert gates.selected == "fast" and gates.confirmation.gates.gates["max_accuracy_drop_vs_production"].passed

    # a retrain: production's recorded test accuracy
    recorded = RecordedProduction(version="v0002", val_accuracy=1.0, val_md5="a" * 32, test_accuracy=1.0,
                                  test_md5="c" * 32)
    slow = run(LABELS["val"], LABELS["test"], lat=5.0)
    _, gates = validate_runs(teacher, {"fast": fast, "slow": slow}, LABELS, params, FILES,
                             recorded_production=recorded)
    assert [c.candidate for c in gates.unconfirmed] == ["fast"] and gates.selected == "slow"
    out = retrain_outcome(gates, "v0004", {"md5": "f" * 32, "rows": 4}, production=recorded)
    assert out["production_before"]["version"] == "v0002"
    assert out["vs_production"]["val"]["value"] == 0 and out["vs_production"]["test"]["passed"] is True
    lines = production_lines(out)
    assert lines[0].startswith("production before the retrain: v0002 (val 1, test 1)")
    assert any("on test: test accuracy 1 against production v0002's 1" in line for line in lines)
    # without a recorded test accuracy: confirmed on the teacher's gates alone
    _, gates = validate_runs(teacher, {"fast": fast, "slow": slow}, LABELS, params, FILES,
                             recorded_production=recorded.model_copy(update={"test_accuracy": None}))
    assert gates.selected == "fast" and not gates.unconfirmed


def test_soft_agreement_is_the_overlap_of_the_class_probabilities():
    from shrinkflow.stats import soft_agreement

    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    assert soft_agreement(p, p) == 1.0
    # row by row: min overlap 0.7 + 0.1, 0.2 + 0.6, 0.5 + 0.2 -> mean of 0.8, 0.8, 0.7
    q = np.array([[0.7, 0.3], [0.4, 0.6], [0.8, 0.2]])
    assert soft_agreement(p, q) == pytest.approx(2.3 / 3) == soft_agreement(q, p)
    assert soft_agreement(p, q) == pytest.approx(1 - np.abs(p - q).sum(axis=1).mean() / 2)  # 1 - total variation
    # one-hot rows: the label agreement
    a, b = [0, 1, 1, 2], [0, 2, 1, 1]
    assert soft_agreement(np.eye(3)[a], np.eye(3)[b]) == agreement(a, b) == 0.5
    assert soft_agreement(np.eye(2)[[0]], np.eye(2)[[1]]) == 0.0
    assert soft_agreement(np.empty((0, 2)), np.empty((0, 2))) is None
    with pytest.raises(ValueError, match=r"shape \(3, 2\) with \(2, 2\)"):
        soft_agreement(p, q[:2])


def _probability_rows(draw, n: int, c: int) -> np.ndarray:
    from hypothesis import strategies as st

    w = np.array(draw(st.lists(st.lists(st.floats(0.0, 1.0), min_size=c, max_size=c), min_size=n, max_size=n)))
    w[w.sum(axis=1) == 0, 0] = 1.0   # an all-zero draw: all mass on class 0
    return w / w.sum(axis=1, keepdims=True)


def test_soft_agreement_over_any_probabilities():
    """The whole kind, not one example: any two ``[N, C]`` probability
    arrays give a value in [0, 1] that is symmetric, 1 minus the mean total
    variation, 1 for identical rows, and the label agreement of their argmax
    when the rows are one-hot; ``overlap_rows`` are its terms."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from shrinkflow.stats import overlap_rows, soft_agreement

    @settings(max_examples=200, deadline=None)
    @given(st.data(), st.integers(1, 12), st.integers(2, 6))
    def check(data, n, c):
        p, q = _probability_rows(data.draw, n, c), _probability_rows(data.draw, n, c)
        s = soft_agreement(p, q)
        assert 0.0 <= s <= 1.0 and s == soft_agreement(q, p)
        assert s == pytest.approx(1 - np.abs(p - q).sum(axis=1).mean() / 2, abs=2e-6)
        assert s == pytest.approx(float(overlap_rows(p, q).mean()), abs=1e-6)
        assert soft_agreement(p, p) == pytest.approx(1.0, abs=1e-6)
        a, b = p.argmax(axis=1), q.argmax(axis=1)
        assert soft_agreement(np.eye(c)[a], np.eye(c)[b]) == agreement(a, b)

    check()


# ---------------------------------------------------------------- a retrain's production baseline

WINDOW_T = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]   # the retrained teacher on the held-out window texts


def windowed(r: dict, agree: int) -> dict:
    """``r`` predicting the held-out window texts, agreeing with the teacher on the first ``agree`` of 10."""
    return {**r, "predictions": {**r["predictions"],
                                 "window_heldout": WINDOW_T[:agree] + [1 - y for y in WINDOW_T[agree:]]}}


def test_a_retrain_measures_production_as_the_window_gain_baseline_never_as_a_candidate():
    """On a retrain (production staged with role "baseline"), a student under
    the window floor passes by its gain over production's agreement with the
    new teacher; production is neither gated nor selected, even where it
    would pass and is the fastest, and no candidate is gated on its latency
    against production (the teacher changed). As a candidate (a
    re-compression) the same production is gated, and the slower student
    fails the slowdown gate."""
    from shrinkflow.artifacts import PRODUCTION_CANDIDATE

    teacher = windowed(run(LABELS["val"], LABELS["test"], lat=20.0, size=90.0), 10)
    prod = windowed(run(LABELS["val"], LABELS["test"], lat=1.0), 5)          # 0.5 with the new teacher
    student = windowed(run(LABELS["val"], LABELS["test"], lat=3.0), 8)       # 0.8: under the floor, +0.3
    int8 = windowed(run(LABELS["val"], LABELS["test"], lat=6.0), 10)
    files = {"fast": FILES["fast"], "slow": FILES["slow"],
             PRODUCTION_CANDIDATE: {"files": {"model.onnx": "p"}, "content_hash": "P"}}
    params = PARAMS.model_copy(update={"gates": PARAMS.gates.model_copy(update={
        "min_window_agreement": 0.9, "min_window_agreement_gain": 0.005, "window_agreement_gain_on": "labels",
        "max_p95_b1_slowdown_vs_production": 0.1})})
    for r, secs in ((teacher, 0.02), (prod, 0.001), (student, 0.003), (int8, 0.006)):
        r["rounds_b1"] = [[secs] * 4] * 3          # timed in the same rounds
    runs = {"fast": student, "slow": int8, PRODUCTION_CANDIDATE: prod}
    metrics, gates = validate_runs(teacher, runs, LABELS, params, files, production_version="v0002",
                                   production_baseline_only=True)
    assert gates.selected == "fast" and gates.production is None and gates.production_baseline == "v0002"
    assert PRODUCTION_CANDIDATE not in metrics.candidates and PRODUCTION_CANDIDATE not in gates.candidates
    g = gates.candidates["fast"].gates
    assert g["min_window_agreement_gain"].passed and g["min_window_agreement_gain"].value == pytest.approx(0.3)
    assert "production v0002's 0.5" in g["min_window_agreement_gain"].note
    assert not g["min_window_agreement"].passed and not g["min_window_agreement"].enforced
    assert "max_p95_b1_slowdown_vs_production" not in g
    # the same production as a re-compression's candidate: the 3x slower student is refused
    _, as_candidate = validate_runs(teacher, runs, LABELS, params, files, production_version="v0002")
    assert not as_candidate.candidates["fast"].gates["max_p95_b1_slowdown_vs_production"].passed
    assert as_candidate.production == "v0002" and as_candidate.production_baseline is None

    # production would pass every gate and is the fastest: still never selected
    agreeing = windowed(prod, 10)
    _, gates = validate_runs(teacher, {**runs, PRODUCTION_CANDIDATE: agreeing}, LABELS, params, files,
                             production_version="v0002", production_baseline_only=True)
    assert gates.selected == "slow"      # the student no longer gains over production
    assert not gates.candidates["fast"].gates["min_window_agreement_gain"].passed
    _, gates = validate_runs(teacher, {"fast": student, PRODUCTION_CANDIDATE: agreeing}, LABELS, params,
                             {"fast": files["fast"], PRODUCTION_CANDIDATE: files[PRODUCTION_CANDIDATE]},
                             production_version="v0002", production_baseline_only=True)
    assert gates.selected is None and gates.best_effort == "fast"
