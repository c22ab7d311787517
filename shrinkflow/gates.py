"""Deployment gates and candidate selection: pure functions, no I/O.

A gate passes when its value is on the right side of the threshold or
exactly on it. Values within 1e-9 of a threshold count as on it, so that an
accuracy drop of 0.85 - 0.84 (= 0.010000000000000009 in floating point)
passes a 0.01 gate as a person would expect.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from shrinkflow.config import Gates

TOLERANCE = 1e-9


@dataclass(frozen=True)
class GateResult:
    name: str
    passed: bool
    value: float
    threshold: float
    direction: Literal["min", "max"]
    # How far past the threshold, in the gate's units: >= 0 passes, < 0 fails
    # and |margin| says by how much.
    margin: float
    # False for a gate whose failure does not block deployment but changes
    # how the candidate is served (batch invariance under serve_per_row);
    # ``note`` then says what happens instead.
    enforced: bool = True
    note: str = ""

    def describe(self) -> str:
        verb = "passed" if self.passed else ("FAILED" if self.enforced else "not met")
        rel = ">=" if self.direction == "min" else "<="
        return (f"{self.name} {verb}: {self.value:.4g} (needs {rel} {self.threshold:.4g}; "
                f"margin {self.margin:+.4g})" + (f": {self.note}" if self.note else ""))


@dataclass(frozen=True)
class GateReport:
    candidate: str
    results: tuple[GateResult, ...]

    @property
    def passed(self) -> bool:
        """Every enforced gate passed (a gate that is not enforced never blocks)."""
        return all(r.passed or not r.enforced for r in self.results)

    @property
    def failures(self) -> tuple[GateResult, ...]:
        """Enforced gates that failed: what blocks deployment."""
        return tuple(r for r in self.results if not r.passed and r.enforced)

    @property
    def advisories(self) -> tuple[GateResult, ...]:
        """Gates not met that do not block, each with its ``note``."""
        return tuple(r for r in self.results if not r.passed and not r.enforced)

    def summary(self) -> str:
        if self.passed:
            return f"candidate {self.candidate!r} passed all {len(self.results)} gates"
        return f"candidate {self.candidate!r} failed: " + "; ".join(r.describe() for r in self.failures)

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "passed": self.passed,
                "gates": {r.name: asdict(r) for r in self.results}}

    @classmethod
    def from_dict(cls, d: dict) -> "GateReport":
        return cls(d["candidate"], tuple(GateResult(**g) for g in d["gates"].values()))


def check_min(name: str, value: float, threshold: float) -> GateResult:
    margin = value - threshold
    return GateResult(name, margin >= -TOLERANCE, value, threshold, "min", margin)


def check_max(name: str, value: float, threshold: float) -> GateResult:
    margin = threshold - value
    return GateResult(name, margin >= -TOLERANCE, value, threshold, "max", margin)


def accuracy_drop_value(candidate: dict, teacher: dict, gates: Gates) -> float:
    """What max_accuracy_drop is checked against (``gates.accuracy_drop_basis``).

    point: the paired point estimate, teacher minus candidate accuracy on the
    same texts. upper_bound: the upper end of its confidence interval
    (``accuracy_drop_ci_high``, computed by evaluate.paired_accuracy_drop).
    """
    if gates.accuracy_drop_basis == "upper_bound":
        if "accuracy_drop_ci_high" not in candidate:
            raise KeyError("accuracy_drop_basis is upper_bound but the candidate has no accuracy_drop_ci_high")
        return candidate["accuracy_drop_ci_high"]
    return teacher["accuracy"] - candidate["accuracy"]


def macro_f1_gates(candidate: dict, teacher: dict, gates: Gates) -> tuple[GateResult, ...]:
    """``max_macro_f1_drop``: teacher macro-F1 minus candidate macro-F1 on
    the same texts (the point estimate; its bootstrap interval is reported
    beside it). Not set (None): no gate, the drop is only reported."""
    if gates.max_macro_f1_drop is None:
        return ()
    return (check_max("max_macro_f1_drop", teacher["macro_f1"] - candidate["macro_f1"], gates.max_macro_f1_drop),)


def accuracy_gates(candidate: dict, teacher: dict, gates: Gates) -> tuple[GateResult, ...]:
    """The gates that depend on the evaluation split (re-checked on test):
    min_accuracy, max_accuracy_drop and, when set, max_macro_f1_drop."""
    return (check_min("min_accuracy", candidate["accuracy"], gates.min_accuracy),
            check_max("max_accuracy_drop", accuracy_drop_value(candidate, teacher, gates), gates.max_accuracy_drop),
            ) + macro_f1_gates(candidate, teacher, gates)


def evaluate_gates(candidate_name: str, candidate: dict, teacher: dict, gates: Gates) -> GateReport:
    """Check one candidate's metrics against the gates; teacher is the baseline.

    The speedup is the candidate's round-by-round ``speedup_p95_b1`` when
    validate timed it interleaved with the teacher, else the ratio of the two
    pooled p95 latencies.
    """
    speedup = candidate.get("speedup_p95_b1") or teacher["latency_ms_p95_b1"] / candidate["latency_ms_p95_b1"]
    return GateReport(candidate_name, accuracy_gates(candidate, teacher, gates) + (
        check_max("max_latency_ms_p95_b1", candidate["latency_ms_p95_b1"], gates.max_latency_ms_p95_b1),
        check_max("max_size_mb", candidate["size_mb"], gates.max_size_mb),
        check_min("min_speedup", speedup, gates.min_speedup),
    ) + window_gates(candidate, gates) + batch_gates(candidate, gates))


def batch_gates(candidate: dict, gates: Gates) -> tuple[GateResult, ...]:
    """Batch invariance: the largest change of a class probability between a
    val text predicted alone and in a mixed batch of 32
    (``candidate["batch_invariance"]``, from ``runtime.batch_invariance``).
    A changed label fails it whatever the probabilities. Under
    ``batch_variant_action: serve_per_row`` a failure does not block: the
    candidate is deployed to be served one text per call. No measurement: no
    gate."""
    inv = candidate.get("batch_invariance")
    if inv is None:
        return ()
    res = check_max("max_batch_prob_diff", inv["max_prob_diff"], gates.max_batch_prob_diff)
    if inv["label_flips"] and res.passed:
        res = replace(res, passed=False)
    if res.passed:
        return (res,)
    what = f"{inv['label_flips']} of {inv['rows']} labels changed in batches of {inv['batch_size']}"
    if gates.batch_variant_action == "serve_per_row":
        return (replace(res, enforced=False, note=f"not batch-invariant ({what}): served one text per call"),)
    return (replace(res, note=f"not batch-invariant ({what}): refused (batch_variant_action: refuse)"),)


def serves_per_row(report: GateReport) -> bool:
    """Whether a deployed candidate must be served one text per call: its
    batch-invariance gate was not met (and not enforced)."""
    return any(r.name == "max_batch_prob_diff" and not r.passed for r in report.results)


def window_gates(candidate: dict, gates: Gates) -> tuple[GateResult, ...]:
    """Re-compression only: agreement with the teacher on the held-out part of
    the production window. No held-out text (the default run): no gate."""
    window = (candidate.get("agreement") or {}).get("window_heldout")
    if window is None:
        return ()
    return (check_min("min_window_agreement", window, gates.min_window_agreement),)


def confirm_gates(candidate_name: str, candidate_test: dict, teacher_test: dict, gates: Gates) -> GateReport:
    """The accuracy gates again, on the confirmation (test) split."""
    return GateReport(candidate_name, accuracy_gates(candidate_test, teacher_test, gates))


@dataclass(frozen=True)
class Selection:
    chosen: str | None          # a candidate that passed every gate, or None
    best_effort: str            # the best candidate regardless of gates
    reason: str


def select_candidate(metrics: dict[str, dict], reports: dict[str, GateReport],
                     objective: str = "latency_ms_p95_b1") -> Selection:
    """Lowest ``objective`` among candidates passing every gate; ties go to the
    higher accuracy, then to the name (so the choice is deterministic).

    When none passes, ``best_effort`` is the candidate that failed the fewest
    gates (then by objective), kept for the report but never deployed.
    """
    def key(name):
        return (metrics[name][objective], -metrics[name]["accuracy"], name)

    passing = sorted((n for n in metrics if reports[n].passed), key=key)
    if passing:
        return Selection(passing[0], passing[0],
                         f"{passing[0]!r}: lowest {objective} of {len(passing)} passing candidate(s)")
    best = min(metrics, key=lambda n: (len(reports[n].failures), *key(n)))
    return Selection(None, best, f"no candidate passed every gate; best effort {best!r}: "
                     + reports[best].summary())
