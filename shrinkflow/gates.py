"""Deployment gates and candidate selection: pure functions, no I/O.

A gate passes when its value is on the right side of the threshold or
exactly on it. Values within 1e-9 of a threshold count as on it, so that an
accuracy drop of 0.85 - 0.84 (= 0.010000000000000009 in floating point)
passes a 0.01 gate as a person would expect.

The gates read a candidate's and the teacher's figures by field name: the
typed measurements of ``shrinkflow.artifacts`` (``CandidateMeasurements``,
``TeacherMeasurements``, and on test ``ConfirmationMetrics`` and
``Quality``), or a plain mapping of the same names (a hand-made test case),
where a missing figure reads as None. A verdict is a ``GateResult``, the
model a stored gate report holds (``shrinkflow.artifacts.CandidateGates``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

# The verdict types live with the documents that store them (the train and
# compress stages import the artifacts without importing the gates); they
# are imported from here as well.
from shrinkflow.artifacts import GateReport, GateResult  # noqa: F401
from shrinkflow.config import LATENCY_P95_B1, Gates
from shrinkflow.cpuload import is_busy, is_disturbed

TOLERANCE = 1e-9

class _Mapped:
    """A mapping of figures read by attribute, as the typed measurements are
    read; a name it lacks reads as None (an optional figure not measured)."""

    __slots__ = ("_figures",)

    def __init__(self, figures: Mapping):
        self._figures = figures

    def __getattr__(self, name: str) -> Any:
        return self._figures.get(name)


def figures(measured: Any) -> Any:
    """``measured`` read by field name: a typed measurement as it is, a
    mapping through an attribute view (absent names read as None)."""
    return _Mapped(measured) if isinstance(measured, Mapping) else measured


def _result(name: str, value: float, threshold: float, direction: Literal["min", "max"],
            margin: float) -> GateResult:
    # Every field given, so the stored form always carries enforced and note
    # (Artifact.to_json_dict dumps the fields that were set). Value and margin
    # are stored without the float noise of a subtraction (_snap); the verdict
    # is taken before.
    return GateResult(name=name, passed=margin >= -TOLERANCE, value=_snap(value), threshold=threshold,
                      direction=direction, margin=_snap(margin), enforced=True, note="")


def _snap(x: float) -> float:
    """``x`` without float noise: the 12-significant-digit number it is
    within 1e-14 of (0.1 for 0.09999999999999998, 0.005678 for
    0.005678000000000001), 0.0 under 1e-12 in size; else ``x`` unchanged, so
    a measured figure (0.03471069242934802) is stored as measured."""
    if abs(x) < 1e-12:
        return 0.0
    short = float(f"{x:.12g}")
    return short if abs(short - x) <= max(1e-14, 1e-15 * abs(x)) else x


def check_min(name: str, value: float, threshold: float) -> GateResult:
    """Passes when ``value`` >= ``threshold`` (within TOLERANCE)."""
    return _result(name, value, threshold, "min", value - threshold)


def check_max(name: str, value: float, threshold: float) -> GateResult:
    """Passes when ``value`` <= ``threshold`` (within TOLERANCE)."""
    return _result(name, value, threshold, "max", threshold - value)


def accuracy_drop_value(candidate: Any, teacher: Any, gates: Gates) -> float:
    """What max_accuracy_drop is checked against (``gates.accuracy_drop_basis``).

    point: the paired point estimate, teacher minus candidate accuracy on the
    same texts. upper_bound: the upper end of its confidence interval
    (``accuracy_drop_ci_high``, computed by stats.paired_accuracy_drop).
    Raises KeyError under upper_bound when the candidate has no interval.
    """
    candidate, teacher = figures(candidate), figures(teacher)
    if gates.accuracy_drop_basis == "upper_bound":
        if candidate.accuracy_drop_ci_high is None:
            raise KeyError("accuracy_drop_basis is upper_bound but the candidate has no accuracy_drop_ci_high")
        return candidate.accuracy_drop_ci_high
    return teacher.accuracy - candidate.accuracy


def macro_f1_gates(candidate: Any, teacher: Any, gates: Gates) -> tuple[GateResult, ...]:
    """``max_macro_f1_drop``: teacher macro-F1 minus candidate macro-F1 on
    the same texts (the point estimate; its bootstrap interval is reported
    beside it). Not set (None): no gate, the drop is only reported."""
    if gates.max_macro_f1_drop is None:
        return ()
    candidate, teacher = figures(candidate), figures(teacher)
    return (check_max("max_macro_f1_drop", teacher.macro_f1 - candidate.macro_f1, gates.max_macro_f1_drop),)


def accuracy_gates(candidate: Any, teacher: Any, gates: Gates) -> tuple[GateResult, ...]:
    """The gates that depend on the evaluation split (re-checked on test):
    min_accuracy, max_accuracy_drop and, when set, max_macro_f1_drop."""
    return (check_min("min_accuracy", figures(candidate).accuracy, gates.min_accuracy),
            check_max("max_accuracy_drop", accuracy_drop_value(candidate, teacher, gates), gates.max_accuracy_drop),
            ) + macro_f1_gates(candidate, teacher, gates)


def evaluate_gates(candidate_name: str, candidate: Any, teacher: Any, gates: Gates,
                   production: "ProductionBaseline | None" = None) -> GateReport:
    """Check one candidate's figures (a ``CandidateMeasurements`` on val, or
    a mapping of the same names) against the gates; ``teacher`` (a
    ``TeacherMeasurements``) is the baseline.

    The speedup is the candidate's round-by-round ``speedup_p95_b1`` when
    validate timed it interleaved with the teacher, else the ratio of the two
    pooled p95 latencies. ``production``: on a re-compression, the
    production model's window agreement (``window_gates``). The latency
    gates' notes say when other processes took the machine while the
    candidate was timed (``busy_timing_note``).
    """
    c, t = figures(candidate), figures(teacher)
    speedup = c.speedup_p95_b1 or t.latency_ms_p95_b1 / c.latency_ms_p95_b1
    timed = busy_timing_note(c)   # the latency gates say when the machine was busy
    return GateReport(candidate_name, accuracy_gates(c, t, gates) + (
        timed(check_max("max_latency_ms_p95_b1", c.latency_ms_p95_b1, gates.max_latency_ms_p95_b1)),
        check_max("max_size_mb", c.size_mb, gates.max_size_mb),
        timed(check_min("min_speedup", speedup, gates.min_speedup)),
    ) + window_gates(c, gates, production)
        + tuple(map(timed, production_latency_gates(c, speedup, gates, production))) + timing_gates(c, gates)
        + production_accuracy_gates(c, gates, production) + batch_gates(c, gates))


def timing_gates(candidate: Any, gates: Gates) -> tuple[GateResult, ...]:
    """How disturbed the timing kept was (all models are timed together, so
    one refused means all are):

    - ``max_timing_other_cpu_share``: the share of the CPUs the measuring
      process may run on that other processes took while the candidate was
      timed (``timing_other_cores`` / ``timing_cpus``). Above it no latency
      figure holds, in either direction (a model 1.9x slower than
      production measured 1.01x: bench/results/retime_busy.md);
    - ``max_timing_throttled_share``: in a cgroup with a CPU quota, the
      share of the quota's enforcement periods that throttled the models
      (``timing_throttled_share``): each throttled period stalls a call
      for the rest of the period (bench/results/cpu_quota.md);
    - ``max_timing_cpu_wait_share``: the share of the time the timed
      threads were ready to run but waiting for a CPU
      (``timing_cpu_wait_share``, the scheduler's run-queue delay): it sees
      contention others' share under-counts (beside one process at 25%
      duty, 10% of the CPUs, 2 threads waited 8.9-9.3% of the time, against
      1.9-2.5% quiet, and read a copy of production up to 14% slower:
      bench/results/load_levels.md).

    A refusal's note says how to time again. A gate not set (None), or its
    figure not measured: no such gate."""
    c = figures(candidate)
    out = []
    if gates.max_timing_other_cpu_share is not None and c.timing_other_cores is not None and c.timing_cpus:
        res = check_max("max_timing_other_cpu_share", c.timing_other_cores / c.timing_cpus,
                        gates.max_timing_other_cpu_share)
        note = (f"other processes took {c.timing_other_cores:.2f} of {c.timing_cpus} cores while the models were "
                f"timed" + _quietest_of(c))
        if not res.passed:
            note += ": no latency figure holds; time them again on a quiet machine (shrinkflow run --revalidate)"
        out.append(res.model_copy(update={"note": note}))
    share = c.timing_throttled_share
    if gates.max_timing_throttled_share is not None and share is not None:
        res = check_max("max_timing_throttled_share", share, gates.max_timing_throttled_share)
        quota = c.timing_cpu_quota
        note = (f"the cgroup's CPU quota{'' if quota is None else f' ({quota:g} cores)'} throttled the models in "
                f"{share:.1%} of its periods while they were timed" + _quietest_of(c))
        if not res.passed:
            note += (": no latency figure holds; time them with validate.latency.threads within the quota, or "
                     "with nothing else running in the cgroup (shrinkflow run --revalidate)")
        out.append(res.model_copy(update={"note": note}))
    wait = c.timing_cpu_wait_share
    if gates.max_timing_cpu_wait_share is not None and wait is not None:
        res = check_max("max_timing_cpu_wait_share", wait, gates.max_timing_cpu_wait_share)
        note = f"the timed threads waited for a CPU {wait:.1%} of the time while the models were timed" \
            + _quietest_of(c)
        # A quota's stalls count as run-queue wait (bench/results/cpu_quota.md:
        # 92% of periods throttled): above the throttle gate's own threshold
        # (cpuload.THROTTLED_SHARE with that gate unset), the quota is named.
        throttling = gates.max_timing_throttled_share
        if not res.passed and share is not None and (
                share > throttling if throttling is not None else is_disturbed(None, share)):
            note += (": no latency figure holds; the cgroup's CPU quota throttled the models in "
                     f"{share:.1%} of its periods, which counts as waiting: time them with "
                     "validate.latency.threads within the quota (shrinkflow run --revalidate)")
        elif not res.passed:
            note += (": no latency figure holds; time them again with nothing else running beside validate "
                     "(shrinkflow run --revalidate)")
        out.append(res.model_copy(update={"note": note}))
    return tuple(out)


def _quietest_of(c: Any) -> str:
    """" (the quietest of N timings)" when the models were timed N > 1 times, else ""."""
    attempts = c.timing_attempts or 1
    return f" (the quietest of {attempts} timings)" if attempts > 1 else ""


def busy_timing_note(candidate: Any):
    """A function that adds to a latency gate's result a note on the
    machine's load, when the candidate's timing was disturbed
    (``cpuload.is_disturbed``: other processes took more than
    ``cpuload.BUSY_CORES`` cores on average, ``timing_other_cores``, a
    cgroup CPU quota throttled the models, ``timing_throttled_share``, or
    the timed threads waited for a CPU more than ``cpuload.CPU_WAIT_SHARE``
    of the time, ``timing_cpu_wait_share``;
    after ``timing_attempts`` timings, the least disturbed kept): its figure
    may be off, and so may a refusal. The verdict is unchanged: a figure
    measured on a busy machine still gates (a refusal keeps production
    serving). Not disturbed, or not measured: the result as it is."""
    c = figures(candidate)
    share, wait = c.timing_throttled_share, c.timing_cpu_wait_share
    if not is_disturbed(c.timing_other_cores, share, wait):
        return lambda result: result
    what = [f"other processes took {c.timing_other_cores:.2f} cores on average"] if is_busy(c.timing_other_cores) \
        else []
    if share is not None and is_disturbed(None, share):
        what.append(f"the cgroup's CPU quota throttled {share:.1%} of its periods")
    if wait is not None and is_disturbed(None, None, wait):
        what.append(f"the timed threads waited for a CPU {wait:.1%} of the time")
    load = ("timed while " + " and ".join(what) + _quietest_of(c)
            + ": the figure may be off (shrinkflow run --revalidate times them again)")

    def add(result: GateResult) -> GateResult:
        return result.model_copy(update={"note": f"{result.note}; {load}" if result.note else load})
    return add


def production_accuracy_gates(candidate: Any, gates: Gates, production: "ProductionBaseline | None",
                              split: Literal["val", "test"] = "val") -> tuple[GateResult, ...]:
    """Re-compression and retrain: production's accuracy on ``split`` (val:
    ``production.accuracy``; test, the confirmation: ``production.test_accuracy``)
    minus the candidate's, on the same texts (fractions; positive = the
    candidate is worse), at most ``max_accuracy_drop_vs_production``. No
    production baseline, production's own report, no production accuracy on
    that split, or the gate not set (None): no gate."""
    base = None if production is None else (production.accuracy if split == "val" else production.test_accuracy)
    if (production is None or production.is_candidate or base is None
            or gates.max_accuracy_drop_vs_production is None):
        return ()
    acc = figures(candidate).accuracy
    res = check_max("max_accuracy_drop_vs_production", base - acc, gates.max_accuracy_drop_vs_production)
    return (res.model_copy(update={"note": f"{split} accuracy {acc:.4g} against production {production.version}'s "
                                           f"{base:.4g}"}),)


def production_latency_gates(candidate: Any, speedup: float, gates: Gates,
                             production: "ProductionBaseline | None") -> tuple[GateResult, ...]:
    """Re-compression only: the candidate's batch-1 p95 latency may exceed the
    production model's by at most ``max_p95_b1_slowdown_vs_production`` (a
    fraction: 0.10 = 10% slower), so a drift event never makes production
    slower (the int8 teacher replacing a student).

    The slowdown is the candidate's ``p95_b1_ratio_vs_production`` minus 1:
    candidate p95 over production p95 within each interleaved round, the
    median over rounds. Without it (a candidate not timed in production's
    rounds; the built candidate with production's very files,
    ``production_as``, gated against itself: 0), production's round-by-round
    speedup over the teacher divided by the candidate's (``speedup``), minus
    1: a ratio of two medians that carries the teacher's timing noise twice.
    On a byte-for-byte copy of production it spread 3.7x as wide between
    repeats (bench/results/slowdown_spread.md; 4.6x in an earlier run, where
    it refused the copy once in 15; with a busy core 3.9x, refusing it twice
    in 10). No production baseline, production's own report, or neither
    figure: no gate."""
    if production is None or production.is_candidate:
        return ()
    ratio = figures(candidate).p95_b1_ratio_vs_production
    if ratio is not None:
        slowdown = ratio - 1.0
        note = (f"p95 batch 1 {ratio:.3g}x production {production.version}'s (round by round, the median "
                f"over the interleaved rounds)")
    elif production.speedup_p95_b1 is not None:
        slowdown = production.speedup_p95_b1 / speedup - 1.0
        note = (f"p95 batch 1 {1 + slowdown:.3g}x production {production.version}'s (speedups over the teacher, "
                f"same rounds: {speedup:.3g} against {production.speedup_p95_b1:.3g})")
    else:
        return ()
    res = check_max("max_p95_b1_slowdown_vs_production", slowdown, gates.max_p95_b1_slowdown_vs_production)
    return (res.model_copy(update={"note": note}),)


def batch_gates(candidate: Any, gates: Gates) -> tuple[GateResult, ...]:
    """Batch invariance: the largest change of a class probability between a
    val text predicted alone and in a mixed batch of 32
    (``candidate.batch_invariance``, from ``predictors.batch_invariance``).
    A changed label fails it whatever the probabilities. Under
    ``batch_variant_action: serve_per_row`` a failure does not block: the
    candidate is deployed to be served one text per call. No measurement: no
    gate."""
    inv = figures(candidate).batch_invariance
    if inv is None:
        return ()
    inv = figures(inv)
    res = check_max("max_batch_prob_diff", inv.max_prob_diff, gates.max_batch_prob_diff)
    if inv.label_flips and res.passed:
        res = res.model_copy(update={"passed": False})
    if res.passed:
        return (res,)
    what = f"{inv.label_flips} of {inv.rows} labels changed in batches of {inv.batch_size}"
    if gates.batch_variant_action == "serve_per_row":
        return (res.model_copy(update={"enforced": False,
                                       "note": f"not batch-invariant ({what}): served one text per call"}),)
    return (res.model_copy(update={"note": f"not batch-invariant ({what}): refused (batch_variant_action: refuse)"}),)


def serves_per_row(report: GateReport) -> bool:
    """Whether a deployed candidate must be served one text per call: its
    batch-invariance gate was not met (and not enforced)."""
    return any(r.name == "max_batch_prob_diff" and not r.passed for r in report.results)


def window_gates(candidate: Any, gates: Gates, production: "ProductionBaseline | None" = None
                 ) -> tuple[GateResult, ...]:
    """Re-compression only: agreement with the teacher on the held-out part of
    the production window (a fraction). No held-out text (the default run): no
    gate.

    Without ``production`` (no production model was measured): the floor
    ``min_window_agreement`` alone, on label agreement. With it, a candidate
    passes when it reaches the floor OR beats production on the same
    held-out texts by at least ``min_window_agreement_gain``: both results
    are reported (``min_window_agreement``: the candidate's label agreement
    against the floor; ``min_window_agreement_gain``: candidate minus
    production, against the min gain), and the one not needed is not
    enforced, its note saying how the other route was met. Both missed: both
    fail, each with its margin. The production model itself
    (``production.is_candidate``) has no gain over itself: it passes through
    the floor only.

    The gain is measured as ``gates.window_agreement_gain_on`` says:
    "probabilities" (the default), the gain in soft agreement
    (``stats.soft_agreement``: the overlap of the class probabilities with
    the teacher's), when both the candidate and production have it, else on
    labels, the note saying why; "labels", the gain in label agreement. The
    note gives both gains when both were measured.
    """
    window = (figures(candidate).agreement or {}).get("window_heldout")
    if window is None:
        return ()
    floor = check_min("min_window_agreement", window, gates.min_window_agreement)
    if production is None or production.agreement is None:
        return (floor,)
    prod = f"production {production.version}'s"
    if production.is_candidate:
        return (floor.model_copy(update={"note": f"the production model itself ({production.version}): "
                                                 "kept only through the floor; it has no gain over itself"}),)
    soft = (figures(candidate).soft_agreement or {}).get("window_heldout")
    labels_note = f"labels {window:.4g} against {prod} {production.agreement:.4g}"
    if gates.window_agreement_gain_on == "probabilities" and soft is not None \
            and production.soft_agreement is not None:
        gain_value = soft - production.soft_agreement
        note = (f"soft agreement {soft:.4g} against {prod} {production.soft_agreement:.4g}; "
                f"{labels_note} ({window - production.agreement:+.4g})")
    else:
        gain_value = window - production.agreement
        note = labels_note + ("" if gates.window_agreement_gain_on == "labels" else
                              "; on labels: the probabilities were not measured")
    gain = check_min("min_window_agreement_gain", gain_value, gates.min_window_agreement_gain)
    gain = gain.model_copy(update={"note": note})
    if floor.passed and not gain.passed:
        gain = gain.model_copy(update={"enforced": False, "note": gain.note + "; not needed: the floor was met"})
    elif gain.passed and not floor.passed:
        floor = floor.model_copy(update={"enforced": False, "note": f"not needed: {gain_value:+.4g} "
                                         f"over production {production.version} meets min_window_agreement_gain "
                                         f"{gates.min_window_agreement_gain:g}"})
    return floor, gain


def confirm_gates(candidate_name: str, candidate_test: Any, teacher_test: Any, gates: Gates,
                  production: "ProductionBaseline | None" = None) -> GateReport:
    """The accuracy gates again, on the confirmation (test) split
    (``ConfirmationMetrics`` against the teacher's ``Quality``), and, when
    ``production`` has a test accuracy (``ProductionBaseline.test_accuracy``),
    max_accuracy_drop_vs_production on test too: a candidate that loses
    against production on val within the gate but more on test is not
    confirmed."""
    return GateReport(candidate_name, accuracy_gates(candidate_test, teacher_test, gates)
                      + production_accuracy_gates(candidate_test, gates, production, split="test"))


@dataclass(frozen=True)
class ProductionBaseline:
    """What the window gate compares a re-compression's candidates with: the
    model in production (``version``, e.g. "v0003") and its agreement with
    the teacher on the held-out window (a fraction; None: not measured),
    batch-1 p95 speedup over the teacher (``production_latency_gates``, when
    a candidate has no ``p95_b1_ratio_vs_production``) and
    val accuracy (``production_accuracy_gates``; a fraction, None: not
    measured). ``is_candidate``: the report being gated is production's own."""

    version: str
    agreement: float | None
    is_candidate: bool = False
    # its soft agreement with the teacher on the held-out window
    # (stats.soft_agreement; None: probabilities not measured)
    soft_agreement: float | None = None
    # production's round-by-round p95 speedup over the teacher at batch 1, in
    # the same rounds as the candidates' (None: not timed interleaved)
    speedup_p95_b1: float | None = None
    # production's accuracy on val, on the candidates' texts
    accuracy: float | None = None
    # and on test (the confirmation split; None: not measured, or measured
    # on another test split)
    test_accuracy: float | None = None


@dataclass(frozen=True)
class Selection:
    chosen: str | None          # a candidate that passed every gate, or None
    best_effort: str            # the best candidate regardless of gates
    reason: str


def select_candidate(metrics: Mapping[str, Any], reports: dict[str, GateReport],
                     objective: str = LATENCY_P95_B1, fallback: str | None = None) -> Selection:
    """Lowest ``objective`` (a figure's name) among candidates passing every gate; ties go to the
    higher accuracy, then to the name (so the choice is deterministic).

    ``fallback``: on a re-compression, the production model's candidate name.
    It is chosen only when no other candidate passes: a new candidate that
    passed every gate, those against production included (window agreement,
    latency), replaces it, and two models of the same shape never coin-flip
    on latency noise; when nothing new passes, production is kept.

    When none passes, ``best_effort`` is the candidate that failed the fewest
    gates (then by objective), kept for the report but never deployed.
    """
    def key(name):
        m = figures(metrics[name])
        return (getattr(m, objective), -m.accuracy, name)

    passing = sorted((n for n in metrics if reports[n].passed), key=key)
    new = [n for n in passing if n != fallback]
    if fallback is not None and fallback in passing:
        if new:
            return Selection(new[0], new[0], f"{new[0]!r}: lowest {objective} of {len(new)} passing new "
                                             f"candidate(s); production ({fallback!r}) passed too, and is kept "
                                             "only when nothing new passes")
        return Selection(fallback, fallback, f"{fallback!r}: no new candidate passed every gate; production "
                                             "passed them all and is kept")
    if passing:
        return Selection(passing[0], passing[0],
                         f"{passing[0]!r}: lowest {objective} of {len(passing)} passing candidate(s)")
    best = min(metrics, key=lambda n: (len(reports[n].failures), *key(n)))
    return Selection(None, best, f"no candidate passed every gate; best effort {best!r}: "
                     + reports[best].summary())


TEACHER = "teacher"


def teacher_gates(previous: Any, val_accuracy: float, feedback_heldout_accuracy: float | None,
                  gates: Gates) -> GateReport:
    """A retrained teacher against the teacher it replaces (``previous``: a
    ``PreviousTeacher`` or a mapping of its names), both measured on the same
    val split and the same held-out production labels (accuracies, fractions).

    max_teacher_val_drop: previous minus new val accuracy, at most the
    threshold (it must not lose what it knew). min_teacher_feedback_gain: new
    minus previous accuracy on the held-out production labels, at least the
    threshold. With no held-out label on either side the gain cannot be
    measured: that gate fails (value 0) and its note says so, since a retrain
    that cannot show it learned anything from production must not deploy."""
    p = figures(previous)
    drop = check_max("max_teacher_val_drop", p.val_accuracy - val_accuracy, gates.max_teacher_val_drop)
    if feedback_heldout_accuracy is None or p.feedback_heldout_accuracy is None:
        gain = _result("min_teacher_feedback_gain", 0.0, gates.min_teacher_feedback_gain, "min",
                       -gates.min_teacher_feedback_gain).model_copy(
            update={"passed": False, "note": "no held-out production labels to measure the gain on "
                                             "(data.feedback_heldout_fraction)"})
    else:
        gain = check_min("min_teacher_feedback_gain", feedback_heldout_accuracy - p.feedback_heldout_accuracy,
                         gates.min_teacher_feedback_gain)
    return GateReport(TEACHER, (drop, gain))
