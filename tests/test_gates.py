"""Gates and selection on their boundary values."""

from __future__ import annotations

import pytest

from shrinkflow.config import Gates
from shrinkflow.cpuload import CPU_WAIT_SHARE, THROTTLED_SHARE
from shrinkflow.gates import GateReport, check_max, check_min, evaluate_gates, select_candidate

GATES = Gates(min_accuracy=0.80, max_accuracy_drop=0.01, max_latency_ms_p95_b1=5.0,
              max_size_mb=30.0, min_speedup=2.0)
TEACHER = {"accuracy": 0.85, "latency_ms_p95_b1": 10.0, "size_mb": 90.0}


def cand(**over):
    base = {"accuracy": 0.845, "latency_ms_p95_b1": 4.0, "size_mb": 20.0}
    return {**base, **over}


def gate(report: GateReport, name: str):
    return next(r for r in report.results if r.name == name)


@pytest.mark.parametrize("name, at, over, under", [
    # (gate, metrics exactly at threshold, just better, just worse)
    ("min_accuracy", cand(accuracy=0.80), cand(accuracy=0.8001), cand(accuracy=0.7999)),
    ("max_accuracy_drop", cand(accuracy=0.84), cand(accuracy=0.8401), cand(accuracy=0.8399)),
    ("max_latency_ms_p95_b1", cand(latency_ms_p95_b1=5.0), cand(latency_ms_p95_b1=4.999),
     cand(latency_ms_p95_b1=5.001)),
    ("max_size_mb", cand(size_mb=30.0), cand(size_mb=29.99), cand(size_mb=30.01)),
    ("min_speedup", cand(latency_ms_p95_b1=5.0), cand(latency_ms_p95_b1=4.99), cand(latency_ms_p95_b1=5.01)),
    ("min_window_agreement", cand(agreement={"window_heldout": 0.90}), cand(agreement={"window_heldout": 0.9001}),
     cand(agreement={"window_heldout": 0.8999})),
])
def test_gate_boundaries(name, at, over, under):
    gates = GATES if name != "min_speedup" else GATES.model_copy(update={"max_latency_ms_p95_b1": 100.0})
    exact = gate(evaluate_gates("c", at, TEACHER, gates), name)
    assert exact.passed and abs(exact.margin) < 1e-9
    better = gate(evaluate_gates("c", over, TEACHER, gates), name)
    assert better.passed and better.margin > 0
    worse = gate(evaluate_gates("c", under, TEACHER, gates), name)
    assert not worse.passed and worse.margin < 0


def test_failure_says_which_gate_and_by_how_much():
    rep = evaluate_gates("int8", cand(accuracy=0.83, size_mb=35.0), TEACHER, GATES)
    assert not rep.passed
    assert [f.name for f in rep.failures] == ["max_accuracy_drop", "max_size_mb"]
    drop = gate(rep, "max_accuracy_drop")
    assert drop.value == pytest.approx(0.02) and drop.margin == pytest.approx(-0.01)
    assert "max_size_mb FAILED: 35" in rep.summary() and "margin -5" in rep.summary()
    assert GateReport.from_dict(rep.to_dict()) == rep


def test_float_noise_at_threshold_passes():
    assert 0.85 - 0.84 > 0.01  # the floating-point trap the tolerance exists for
    assert check_max("d", 0.85 - 0.84, 0.01).passed
    assert check_min("a", 0.8 - 1e-12, 0.8).passed
    assert not check_min("a", 0.8 - 1e-6, 0.8).passed


def _reports(metrics):
    return {n: evaluate_gates(n, m, TEACHER, GATES) for n, m in metrics.items()}


def test_selection_picks_fastest_passing_not_first():
    metrics = {"a": cand(latency_ms_p95_b1=4.0), "b": cand(latency_ms_p95_b1=2.0), "c": cand(accuracy=0.5)}
    sel = select_candidate(metrics, _reports(metrics))
    assert sel.chosen == "b" and sel.best_effort == "b"


def test_selection_tie_breaks_on_accuracy_then_name():
    metrics = {"a": cand(accuracy=0.842), "b": cand(accuracy=0.846), "c": cand(accuracy=0.846)}
    assert select_candidate(metrics, _reports(metrics)).chosen == "b"


def test_selection_by_size_objective():
    metrics = {"a": cand(size_mb=25.0, latency_ms_p95_b1=2.0), "b": cand(size_mb=10.0)}
    assert select_candidate(metrics, _reports(metrics), objective="size_mb").chosen == "b"


def test_selection_when_none_passes_keeps_best_effort():
    metrics = {"a": cand(accuracy=0.70, size_mb=50.0), "b": cand(size_mb=31.0)}
    sel = select_candidate(metrics, _reports(metrics))
    assert sel.chosen is None and sel.best_effort == "b"
    assert "max_size_mb FAILED" in sel.reason


def test_the_window_gate_applies_only_to_a_recompression():
    """No held-out production text (the default run): no window gate at all,
    rather than a gate that passes on nothing."""
    names = {r.name for r in evaluate_gates("c", cand(agreement={"test": 0.95, "window_heldout": None}),
                                            TEACHER, GATES).results}
    assert "min_window_agreement" not in names
    failed = evaluate_gates("c", cand(agreement={"window_heldout": 0.5}), TEACHER, GATES)
    assert not failed.passed and "min_window_agreement" in failed.summary()


def test_min_speedup_uses_the_round_by_round_ratio_when_validate_measured_one():
    # pooled p95s say 2.5x; the interleaved, round-by-round ratio says 1.9x: the gate uses the latter
    rep = evaluate_gates("c", cand(speedup_p95_b1=1.9), TEACHER, GATES)
    assert gate(rep, "min_speedup").value == 1.9 and not gate(rep, "min_speedup").passed
    assert gate(evaluate_gates("c", cand(speedup_p95_b1=2.0), TEACHER, GATES), "min_speedup").passed
    assert gate(evaluate_gates("c", cand(), TEACHER, GATES), "min_speedup").value == pytest.approx(2.5)


def test_round_ratio_ignores_a_burst_that_moves_the_pooled_ratio():
    import numpy as np

    from shrinkflow.stats import round_ratio_p95

    rng = np.random.default_rng(0)
    teacher = [list(10 + rng.random(10)) for _ in range(20)]
    cand_ = [list(2 + 0.2 * rng.random(10)) for _ in range(20)]
    steady = round_ratio_p95(teacher, cand_)
    assert 4.5 < steady < 5.5
    # a burst of machine noise during two of the candidate's turns
    noisy = [r if i not in (3, 11) else [x + 3.0 for x in r] for i, r in enumerate(cand_)]
    pooled = lambda t, c: np.percentile(sum(t, []), 95) / np.percentile(sum(c, []), 95)  # noqa: E731
    assert pooled(teacher, noisy) < 0.6 * pooled(teacher, cand_)  # the pooled p95 ratio collapses
    assert round_ratio_p95(teacher, noisy) == pytest.approx(steady, rel=0.05)  # the median of rounds does not
    with pytest.raises(ValueError, match="same, non-zero number of rounds"):
        round_ratio_p95(teacher, cand_[:-1])
    with pytest.raises(ValueError):
        round_ratio_p95([], [])


def inv(diff: float, flips: int = 0) -> dict:
    return {"rows": 100, "batch_size": 32, "max_prob_diff": diff, "mean_prob_diff": diff / 10, "label_flips": flips}


@pytest.mark.parametrize("action", ["serve_per_row", "refuse"])
def test_batch_invariance_gate_boundaries_and_what_a_failure_means(action):
    gates = GATES.model_copy(update={"max_batch_prob_diff": 1e-4, "batch_variant_action": action})
    at = gate(evaluate_gates("c", cand(batch_invariance=inv(1e-4)), TEACHER, gates), "max_batch_prob_diff")
    assert at.passed and at.enforced and abs(at.margin) < 1e-9 and at.note == ""
    under = gate(evaluate_gates("c", cand(batch_invariance=inv(0.99e-4)), TEACHER, gates), "max_batch_prob_diff")
    assert under.passed and under.margin > 0
    rep = evaluate_gates("c", cand(batch_invariance=inv(1.01e-4)), TEACHER, gates)
    over = gate(rep, "max_batch_prob_diff")
    assert not over.passed and over.margin == pytest.approx(-0.01e-4)
    if action == "serve_per_row":
        # deployable, served one text per call, and the report says so
        assert rep.passed and not rep.failures and rep.advisories == (over,)
        assert not over.enforced and "served one text per call" in over.note
        assert "not met" in over.describe() and "served one text per call" in over.describe()
    else:
        assert not rep.passed and rep.failures == (over,) and "refused" in over.note
    assert GateReport.from_dict(rep.to_dict()) == rep


def test_a_changed_label_fails_batch_invariance_whatever_the_probabilities():
    rep = evaluate_gates("c", cand(batch_invariance=inv(5e-5, flips=1)), TEACHER,
                         GATES.model_copy(update={"batch_variant_action": "refuse"}))
    g = gate(rep, "max_batch_prob_diff")
    assert not g.passed and g.margin > 0 and "1 of 100 labels changed" in g.note and not rep.passed


def test_no_invariance_measurement_no_gate_and_old_reports_still_load():
    rep = evaluate_gates("c", cand(), TEACHER, GATES)
    assert "max_batch_prob_diff" not in {r.name for r in rep.results}
    # a gate report written before the enforced/note fields existed
    old = {"candidate": "c", "passed": True, "gates": {"min_accuracy": {
        "name": "min_accuracy", "passed": True, "value": 0.9, "threshold": 0.8, "direction": "min", "margin": 0.1}}}
    loaded = GateReport.from_dict(old)
    assert loaded.passed and loaded.results[0].enforced and loaded.results[0].note == ""


# ---------------------------------------------------------------- the window gate against production

def window_report(agreement: float, production: float | None, floor: float = 0.90, gain: float = 0.02,
                  is_candidate: bool = False) -> GateReport:
    from shrinkflow.gates import ProductionBaseline

    gates = GATES.model_copy(update={"min_window_agreement": floor, "min_window_agreement_gain": gain})
    base = ProductionBaseline("v0003", production, is_candidate) if production is not None else None
    return evaluate_gates("c", cand(agreement={"window_heldout": agreement}), TEACHER, gates, base)


@pytest.mark.parametrize("agreement, passes", [(0.82, True),            # exactly the gain over production
                                               (0.8201, True),          # just over
                                               (0.8199, False)])        # just under (and under the floor)
def test_the_window_gate_passes_on_the_gain_over_production_under_the_floor(agreement, passes):
    rep = window_report(agreement, production=0.80)
    floor, gain = gate(rep, "min_window_agreement"), gate(rep, "min_window_agreement_gain")
    assert rep.passed is passes
    assert not floor.passed and floor.value == agreement and floor.threshold == 0.90
    assert gain.passed is passes and gain.value == pytest.approx(agreement - 0.80) and gain.threshold == 0.02
    assert "against production v0003's 0.8" in gain.note
    if passes:
        assert not floor.enforced and "meets min_window_agreement_gain 0.02" in floor.note
        assert gain.enforced and gain.margin == pytest.approx(agreement - 0.82)
    else:
        # both ways missed: both fail, each saying by how much
        assert [f.name for f in rep.failures] == ["min_window_agreement", "min_window_agreement_gain"]
        assert gain.margin == pytest.approx(-0.0001) and floor.margin == pytest.approx(-0.0801)
        assert "min_window_agreement_gain FAILED" in rep.summary() and "margin -0.0001" in rep.summary()


@pytest.mark.parametrize("agreement, passes", [(0.90, True), (0.9001, True), (0.8999, False)])
def test_the_window_gate_passes_on_the_floor_without_the_gain(agreement, passes):
    """Production agrees better than the candidate: only the floor lets it through."""
    rep = window_report(agreement, production=0.95)
    floor, gain = gate(rep, "min_window_agreement"), gate(rep, "min_window_agreement_gain")
    assert rep.passed is passes and floor.passed is passes and not gain.passed
    assert gain.value == pytest.approx(agreement - 0.95)
    assert gain.enforced is (not passes)
    if passes:
        assert "not needed: the floor was met" in gain.note and rep.failures == ()


def test_the_window_gate_float_noise_at_the_gain_passes():
    # 0.92 - 0.90 is 0.020000000000000018, 0.91 - 0.89 is 0.020000000000000018: at the gain either way
    for a, p in ((0.92, 0.90), (0.91, 0.89), (0.3, 0.28)):
        assert gate(window_report(a, production=p, floor=0.999), "min_window_agreement_gain").passed


def test_the_production_model_passes_the_window_gate_only_through_the_floor():
    """It has no gain over itself: with a min gain of 0 it would otherwise
    always pass, and a re-compression could keep a model under the floor."""
    below = window_report(0.85, production=0.85, gain=0.0, is_candidate=True)
    assert [r.name for r in below.results if r.name.startswith("min_window")] == ["min_window_agreement"]
    assert not below.passed and "the production model itself (v0003)" in gate(below, "min_window_agreement").note
    assert window_report(0.90, production=0.90, gain=0.0, is_candidate=True).passed


def test_without_a_measured_production_model_the_window_gate_is_the_floor_alone():
    rep = window_report(0.5, production=None)
    assert [r.name for r in rep.results if r.name.startswith("min_window")] == ["min_window_agreement"]
    from shrinkflow.gates import ProductionBaseline

    rep = evaluate_gates("c", cand(agreement={"window_heldout": 0.5}), TEACHER, GATES,
                         ProductionBaseline("v0003", None))
    assert [r.name for r in rep.results if r.name.startswith("min_window")] == ["min_window_agreement"]


def test_the_window_gain_defaults_to_soft_agreement_at_0_005():
    assert Gates().min_window_agreement_gain == 0.005 and Gates().window_agreement_gain_on == "probabilities"
    with pytest.raises(ValueError):
        Gates(min_window_agreement_gain=-0.01)
    with pytest.raises(ValueError):
        Gates(window_agreement_gain_on="logits")


def soft_window_report(soft: float | None, production_soft: float | None, on: str = "probabilities",
                       labels: float = 0.88, production_labels: float = 0.88) -> GateReport:
    """A candidate tied with production on label agreement (0.88, under the
    0.90 floor), with the given soft agreements."""
    from shrinkflow.gates import ProductionBaseline

    gates = GATES.model_copy(update={"min_window_agreement": 0.90, "min_window_agreement_gain": 0.005,
                                     "window_agreement_gain_on": on})
    base = ProductionBaseline("v0003", production_labels, soft_agreement=production_soft)
    over = {"soft_agreement": {"window_heldout": soft}} if soft is not None else {}
    return evaluate_gates("c", cand(agreement={"window_heldout": labels}, **over), TEACHER, gates, base)


@pytest.mark.parametrize("soft, passes", [(0.855, True),     # exactly the gain over production's 0.85
                                          (0.8551, True),    # just over
                                          (0.8549, False)])  # just under
def test_the_window_gain_is_measured_on_soft_agreement(soft, passes):
    """Tied on labels, the gain in soft agreement decides, and the note
    gives both measures."""
    rep = soft_window_report(soft, production_soft=0.85)
    gain = gate(rep, "min_window_agreement_gain")
    assert rep.passed is passes and gain.passed is passes
    assert gain.value == pytest.approx(soft - 0.85) and gain.threshold == 0.005
    assert gain.note.startswith(f"soft agreement {soft:.4g} against production v0003's 0.85; ")
    assert "labels 0.88 against production v0003's 0.88 (+0)" in gain.note
    assert gate(rep, "min_window_agreement").enforced is not passes


def test_the_window_gain_on_labels_ignores_soft_agreement():
    rep = soft_window_report(0.90, production_soft=0.85, on="labels", labels=0.884)
    gain = gate(rep, "min_window_agreement_gain")
    assert not rep.passed and gain.value == pytest.approx(0.004) and gain.margin == pytest.approx(-0.001)
    assert gain.note == "labels 0.884 against production v0003's 0.88"
    assert soft_window_report(0.90, production_soft=0.85, on="labels", labels=0.885).passed


@pytest.mark.parametrize("soft, production_soft", [(None, 0.85), (0.90, None)])
def test_the_window_gain_falls_back_to_labels_without_probabilities(soft, production_soft):
    """A report without probabilities for one side (an older production
    figure): the gain is on labels, and the note says so."""
    rep = soft_window_report(soft, production_soft, labels=0.885)
    gain = gate(rep, "min_window_agreement_gain")
    assert rep.passed and gain.value == pytest.approx(0.005)
    assert gain.note.endswith("; on labels: the probabilities were not measured")


# ---------------------------------------------------------------- latency against production; production as fallback

def slowdown_report(speedup: float, production_speedup: float | None, limit: float = 0.10,
                    is_candidate: bool = False) -> GateReport:
    from shrinkflow.gates import ProductionBaseline

    gates = GATES.model_copy(update={"max_p95_b1_slowdown_vs_production": limit})
    base = ProductionBaseline("v0003", 0.95, is_candidate, speedup_p95_b1=production_speedup)
    return evaluate_gates("c", cand(speedup_p95_b1=speedup, agreement={"window_heldout": 0.95}), TEACHER, gates,
                          base)


@pytest.mark.parametrize("speedup, passes", [(4.0, True),                 # exactly 10% slower: 4.4 / 4.0 - 1
                                             (4.001, True),               # just faster than that
                                             (3.999, False),              # just slower
                                             (2.2, False)])               # the int8 teacher replacing a student
def test_a_recompression_never_deploys_a_model_slower_than_production_beyond_the_limit(speedup, passes):
    r = gate(slowdown_report(speedup, 4.4), "max_p95_b1_slowdown_vs_production")
    assert r.passed is passes
    assert r.value == pytest.approx(4.4 / speedup - 1)
    assert "production v0003" in r.note
    if not passes:
        assert "max_p95_b1_slowdown_vs_production FAILED" in slowdown_report(speedup, 4.4).summary()


def test_no_latency_gate_against_production_without_its_timing_or_for_production_itself():
    for report in (slowdown_report(1.0, None), slowdown_report(1.0, 4.4, is_candidate=True),
                   evaluate_gates("c", cand(speedup_p95_b1=1.0), TEACHER, GATES)):
        assert "max_p95_b1_slowdown_vs_production" not in {r.name for r in report.results}


@pytest.mark.parametrize("ratio, passes", [(1.10, True),      # exactly 10% slower, round by round
                                           (1.0999, True),
                                           (1.1001, False),
                                           (1.79, False)])     # the int8 teacher replacing a student
def test_the_slowdown_is_the_direct_round_by_round_ratio_when_measured(ratio, passes):
    """The direct ratio to production decides; the speedups over the teacher
    (here 13% slower through them, as the noise made it at 20:45 on
    2026-12-04) are not used when it is there."""
    from shrinkflow.gates import ProductionBaseline

    base = ProductionBaseline("v0003", 0.95, speedup_p95_b1=6.59)
    c = cand(speedup_p95_b1=5.82, p95_b1_ratio_vs_production=ratio, agreement={"window_heldout": 0.95})
    r = gate(evaluate_gates("c", c, TEACHER, GATES, base), "max_p95_b1_slowdown_vs_production")
    assert r.passed is passes and r.value == pytest.approx(ratio - 1)
    assert "round by round" in r.note and "production v0003" in r.note and "speedups" not in r.note


def test_the_direct_ratio_gates_even_without_productions_speedup():
    from shrinkflow.gates import ProductionBaseline

    base = ProductionBaseline("v0003", 0.95)
    c = cand(p95_b1_ratio_vs_production=1.5, agreement={"window_heldout": 0.95})
    assert not gate(evaluate_gates("c", c, TEACHER, GATES, base), "max_p95_b1_slowdown_vs_production").passed
    own = ProductionBaseline("v0003", 0.95, is_candidate=True)
    assert "max_p95_b1_slowdown_vs_production" not in {
        r.name for r in evaluate_gates("c", c, TEACHER, GATES, own).results}


LATENCY_GATES = {"max_latency_ms_p95_b1", "min_speedup", "max_p95_b1_slowdown_vs_production"}


@pytest.mark.parametrize("other, attempts, noted", [
    (0.25, 1, False),     # at the threshold (cpuload.BUSY_CORES): a quiet machine
    (0.26, 1, True),      # just above: timed once (retimes_when_busy 0)
    (1.2, 2, True),       # still busy after a second timing
    (None, 1, False),     # not measured (no /proc)
])
def test_the_latency_gates_say_when_the_machine_was_busy_and_keep_their_verdicts(other, attempts, noted):
    from shrinkflow.gates import ProductionBaseline

    gates = GATES.model_copy(update={"max_p95_b1_slowdown_vs_production": 0.10})
    base = ProductionBaseline("v0003", 0.95, speedup_p95_b1=6.59)
    quiet = cand(p95_b1_ratio_vs_production=1.2, agreement={"window_heldout": 0.95})
    busy = {**quiet, "timing_other_cores": other, "timing_attempts": attempts}
    q, b = evaluate_gates("c", quiet, TEACHER, gates, base), evaluate_gates("c", busy, TEACHER, gates, base)
    assert [r.name for r in b.results] == [r.name for r in q.results]
    for rq, rb in zip(q.results, b.results):
        assert (rb.passed, rb.value, rb.margin) == (rq.passed, rq.value, rq.margin)   # the verdict stands
        if noted and rb.name in LATENCY_GATES:
            assert rb.note.startswith(rq.note) and f"took {other:.2f} cores" in rb.note
            assert "shrinkflow run --revalidate" in rb.note
            assert (f"the quietest of {attempts} timings" in rb.note) is (attempts > 1)
        else:
            assert rb.note == rq.note
    # the refusal (1.2x production) names the load in the report's summary
    assert ("took 1.20 cores" in b.summary()) is (other == 1.2) and not b.passed


@pytest.mark.parametrize("other_cores, cpus, passes", [
    (0.5, 2, True),        # exactly a quarter of the machine
    (0.5002, 2, False),    # just above
    (0.65, 2, False),      # the burst under which the int8 teacher measured 1.01x production
    (0.008, 2, True),      # a quiet timing
    (3.9, 16, True),       # the same cores on a bigger machine leave it room
])
def test_no_candidate_passes_on_a_timing_the_machine_was_too_busy_for(other_cores, cpus, passes):
    c = cand(timing_other_cores=other_cores, timing_cpus=cpus, timing_attempts=2)
    rep = evaluate_gates("c", c, TEACHER, GATES)
    r = gate(rep, "max_timing_other_cpu_share")
    assert r.passed is passes and rep.passed is passes
    assert r.value == pytest.approx(other_cores / cpus) and r.threshold == GATES.max_timing_other_cpu_share
    assert f"took {other_cores:.2f} of {cpus} cores" in r.note and "the quietest of 2 timings" in r.note
    assert ("shrinkflow run --revalidate" in r.note) is not passes
    if not passes:
        assert [f.name for f in rep.failures] == ["max_timing_other_cpu_share"]


def test_no_timing_gate_when_unset_or_not_measured():
    for c, gates in ((cand(timing_other_cores=1.5, timing_cpus=2), GATES.model_copy(
                          update={"max_timing_other_cpu_share": None})),
                     (cand(), GATES), (cand(timing_other_cores=None, timing_cpus=2), GATES)):
        rep = evaluate_gates("c", c, TEACHER, gates)
        assert "max_timing_other_cpu_share" not in {r.name for r in rep.results} and rep.passed


@pytest.mark.parametrize("share, passes", [
    (0.0, True),                                           # a quota that never ran out
    (GATES.max_timing_throttled_share, True),              # at the gate
    (GATES.max_timing_throttled_share + 0.0002, False),    # just above
    (0.6, False),
])
def test_no_candidate_passes_on_a_timing_the_cgroup_quota_throttled(share, passes):
    c = cand(timing_cpu_quota=1.0, timing_throttled_share=share, timing_attempts=2)
    rep = evaluate_gates("c", c, TEACHER, GATES)
    r = gate(rep, "max_timing_throttled_share")
    assert r.passed is passes and rep.passed is passes
    assert r.value == pytest.approx(share) and r.threshold == GATES.max_timing_throttled_share
    assert "quota (1 cores) throttled the models in" in r.note and "the quietest of 2 timings" in r.note
    assert ("validate.latency.threads within the quota" in r.note) is not passes
    if not passes:
        assert [f.name for f in rep.failures] == ["max_timing_throttled_share"]


def test_no_throttling_gate_without_a_quota_or_when_unset():
    for c, gates in ((cand(timing_cpu_quota=1.0, timing_throttled_share=0.9),
                      GATES.model_copy(update={"max_timing_throttled_share": None})),
                     (cand(), GATES)):
        rep = evaluate_gates("c", c, TEACHER, gates)
        assert "max_timing_throttled_share" not in {r.name for r in rep.results} and rep.passed


@pytest.mark.parametrize("wait, passes", [
    (0.025, True),                                          # 2 threads on a quiet 2-core machine: 1.9-2.5%
    (GATES.max_timing_cpu_wait_share, True),                # at the gate
    (GATES.max_timing_cpu_wait_share + 0.0002, False),      # just above
    (0.089, False),                                         # one process at 25% duty beside: 8.9-9.3%
])
def test_no_candidate_passes_on_a_timing_whose_threads_waited_for_a_cpu(wait, passes):
    # others took little (a bursty load under-counts): the wait alone refuses
    c = cand(timing_other_cores=0.05, timing_cpus=2, timing_cpu_wait_share=wait, timing_attempts=2)
    rep = evaluate_gates("c", c, TEACHER, GATES)
    r = gate(rep, "max_timing_cpu_wait_share")
    assert r.passed is passes and rep.passed is passes
    assert r.value == pytest.approx(wait) and r.threshold == GATES.max_timing_cpu_wait_share
    assert f"waited for a CPU {wait:.1%} of the time" in r.note and "the quietest of 2 timings" in r.note
    assert ("shrinkflow run --revalidate" in r.note) is not passes
    if not passes:
        assert [f.name for f in rep.failures] == ["max_timing_cpu_wait_share"]


@pytest.mark.parametrize("throttled, quota_advice", [(THROTTLED_SHARE, False), (THROTTLED_SHARE + 0.001, True)])
def test_a_wait_refusal_in_a_throttling_quota_says_to_fit_the_threads_to_it(throttled, quota_advice):
    """2 threads in a 1-core quota: 92% of periods throttled, and the
    stalls count as run-queue wait (a helper's finding: the wait gate said
    to stop what else runs, which would change nothing)."""
    c = cand(timing_other_cores=0.0, timing_cpus=2, timing_cpu_quota=1.0, timing_throttled_share=throttled,
             timing_cpu_wait_share=0.5)
    r = gate(evaluate_gates("c", c, TEACHER, GATES), "max_timing_cpu_wait_share")
    assert not r.passed
    assert ("validate.latency.threads within the quota" in r.note) is quota_advice
    assert ("nothing else running beside validate" in r.note) is not quota_advice
    assert (f"throttled the models in {throttled:.1%}" in r.note) is quota_advice


@pytest.mark.parametrize("gate_at, throttled, quota_advice", [(0.2, 0.1, False), (0.2, 0.201, True),
                                                              (0.01, 0.02, True), (None, 0.02, False),
                                                              (None, THROTTLED_SHARE + 0.001, True)])
def test_the_wait_refusal_names_the_quota_above_the_throttle_gate_the_params_set(gate_at, throttled, quota_advice):
    """The quota is blamed above gates.max_timing_throttled_share (a
    helper's finding: it was blamed above the fixed THROTTLED_SHARE whatever
    the gate said); with that gate unset, above THROTTLED_SHARE."""
    c = cand(timing_other_cores=0.0, timing_cpus=2, timing_cpu_quota=1.0, timing_throttled_share=throttled,
             timing_cpu_wait_share=0.5)
    gates = GATES.model_copy(update={"max_timing_throttled_share": gate_at})
    r = gate(evaluate_gates("c", c, TEACHER, gates), "max_timing_cpu_wait_share")
    assert not r.passed
    assert ("validate.latency.threads within the quota" in r.note) is quota_advice
    assert ("nothing else running beside validate" in r.note) is not quota_advice


def test_no_wait_gate_when_unset_or_not_measured():
    for c, gates in ((cand(timing_cpu_wait_share=0.9), GATES.model_copy(update={"max_timing_cpu_wait_share": None})),
                     (cand(), GATES)):
        rep = evaluate_gates("c", c, TEACHER, gates)
        assert "max_timing_cpu_wait_share" not in {r.name for r in rep.results} and rep.passed


@pytest.mark.parametrize("wait, noted", [(CPU_WAIT_SHARE, False), (CPU_WAIT_SHARE + 0.001, True)])
def test_the_latency_gates_say_when_the_timed_threads_waited(wait, noted):
    gates = GATES.model_copy(update={"max_timing_cpu_wait_share": None})
    rep = evaluate_gates("c", cand(timing_cpu_wait_share=wait), TEACHER, gates)
    for r in rep.results:
        assert ("waited for a CPU" in (r.note or "")) is (noted and r.name in LATENCY_GATES - {
            "max_p95_b1_slowdown_vs_production"})
    assert rep.passed


@pytest.mark.parametrize("share, noted", [(THROTTLED_SHARE, False), (THROTTLED_SHARE + 0.001, True)])
def test_the_latency_gates_say_when_the_quota_throttled_the_timing(share, noted):
    gates = GATES.model_copy(update={"max_timing_throttled_share": None})
    c = cand(timing_cpu_quota=1.0, timing_throttled_share=share)
    rep = evaluate_gates("c", c, TEACHER, gates)
    for r in rep.results:
        assert ("quota throttled" in (r.note or "")) is (noted and r.name in LATENCY_GATES - {
            "max_p95_b1_slowdown_vs_production"})
    assert rep.passed


def test_production_is_kept_only_when_no_new_candidate_passes():
    # production measured faster by noise: a new candidate that passed every gate still replaces it
    metrics = {"production": cand(latency_ms_p95_b1=2.0), "new": cand(latency_ms_p95_b1=2.1),
               "bad": cand(accuracy=0.5)}
    sel = select_candidate(metrics, _reports(metrics), fallback="production")
    assert sel.chosen == "new" and "kept only when nothing new passes" in sel.reason
    metrics = {"production": cand(latency_ms_p95_b1=2.0), "bad": cand(accuracy=0.5)}
    sel = select_candidate(metrics, _reports(metrics), fallback="production")
    assert sel.chosen == "production" and "no new candidate passed" in sel.reason
    metrics = {"production": cand(accuracy=0.5), "bad": cand(accuracy=0.5)}
    assert select_candidate(metrics, _reports(metrics), fallback="production").chosen is None


# ---------------------------------------------------------------- in-domain accuracy against production

def vs_production(accuracy: float, production_accuracy: float | None = 0.86, limit: float | None = 0.01,
                  is_candidate: bool = False) -> GateReport:
    from shrinkflow.gates import ProductionBaseline

    gates = GATES.model_copy(update={"max_accuracy_drop": 0.5, "max_accuracy_drop_vs_production": limit})
    return evaluate_gates("c", cand(accuracy=accuracy), TEACHER, gates,
                          ProductionBaseline("v0003", None, is_candidate, accuracy=production_accuracy))


@pytest.mark.parametrize("accuracy, passes", [(0.85, True),             # exactly one point under production
                                              (0.85 + 1e-6, True),      # just within
                                              (0.85 - 1e-6, False),     # just over
                                              (0.87, True)])            # better than production
def test_a_new_candidate_may_lose_at_most_the_limit_against_productions_val_accuracy(accuracy, passes):
    r = gate(vs_production(accuracy), "max_accuracy_drop_vs_production")
    assert r.passed is passes and r.value == pytest.approx(0.86 - accuracy) and r.threshold == 0.01
    assert "against production v0003's 0.86" in r.note
    if not passes:
        assert "max_accuracy_drop_vs_production FAILED" in vs_production(accuracy).summary()


def test_no_accuracy_gate_against_production_without_its_figure_for_itself_or_when_not_set():
    for report in (vs_production(0.5, production_accuracy=None), vs_production(0.5, is_candidate=True),
                   vs_production(0.5, limit=None), evaluate_gates("c", cand(accuracy=0.5), TEACHER, GATES)):
        assert "max_accuracy_drop_vs_production" not in {r.name for r in report.results}
    assert Gates().max_accuracy_drop_vs_production == 0.01
    with pytest.raises(ValueError):
        Gates(max_accuracy_drop_vs_production=-0.01)


def test_a_gate_stores_its_value_and_margin_without_float_noise_and_decides_before_rounding():
    r = check_max("max_accuracy_drop", 0.85 - 0.84, 0.01)       # 0.010000000000000009 in binary
    assert (r.value, r.margin, r.passed) == (0.01, 0.0, True)
    r = check_min("min_window_agreement_gain", 0.9 - 0.8, 0.1)   # 0.09999999999999998
    assert (r.value, r.margin, r.passed) == (0.1, 0.0, True)
    # a real miss far below the stored digits still fails
    assert not check_max("max_size_mb", 1.0 + 1e-6, 1.0).passed
    # a measured figure is stored as measured, to its last digit
    assert check_max("max_batch_prob_diff", 0.03471069242934802, 1e-4).value == 0.03471069242934802
    assert check_max("max_latency_ms_p95_b1", 123.45678901234567, 200.0).value == 123.45678901234567


@pytest.mark.parametrize("soft, production_soft", [(float("nan"), 0.85), (0.90, float("nan"))])
def test_non_finite_probabilities_fail_the_window_gain(soft, production_soft):
    """A model whose probabilities were not finite (soft agreement NaN)
    never passes on its gain: the gate fails and shows the NaN."""
    rep = soft_window_report(soft, production_soft)
    gain = gate(rep, "min_window_agreement_gain")
    assert not rep.passed and not gain.passed and "nan" in gain.describe()
