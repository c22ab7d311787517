"""The degradation policy: ``decide(summary, params, history, now) ->
Decision(action, reasons)``. Pure: no I/O, no clock of its own.

Rules (thresholds in params.yaml ``monitor:``), each a *trigger* when it fires:
- text drift: the share of drifted text descriptors is above
  ``max_drifted_descriptor_share``;
- embedding drift: Evidently's embedding-drift ROC AUC is above
  ``embedding_drift_auc``;
- feedback accuracy: with at least ``min_feedback_labels`` labels, the
  accuracy on them is more than ``max_feedback_accuracy_drop`` below the
  version's validated accuracy;
- compression gap: agreement with the teacher in shadow is more than
  ``max_teacher_agreement_drop`` below the version's validated agreement
  with ``teacher_agreement_confidence`` (both figures are samples: a bare
  floor fired on windows of the sentences the version was validated on),
  or, for a version with no validated agreement, below
  ``min_teacher_agreement`` with that confidence (``agreement_floor``;
  needs no labels);
- teacher feedback: with at least ``min_feedback_labels`` labels, the kept
  teacher's own accuracy on them (in shadow) is more than
  ``max_teacher_feedback_drop`` below its validated accuracy.

Then: no trigger -> ``ok`` (``warn`` if the served model's predictions
drifted, which alone says nothing about its errors, or if the teacher rules
could not run: ``DriftSummary.teacher_unavailable``, no kept teacher or not
the one production was validated against). A trigger with the teacher
unavailable is ``warn`` too: re-compression and retrain need it. A trigger -> ``recompress``,
except that it is ``warn`` when the window is smaller than
``min_window_rows``, when its distinct texts would leave the distillation or
the held-out part of a re-compression empty (a window of one text repeated),
when fewer than ``min_recompress_rows`` distinct texts are left to distil
from (re-compression only), when this very window already triggered
(dedup), or within ``cooldown_hours`` of the last re-compression. When the
teacher feedback rule fired, the verdict is ``retrain`` instead of
``recompress``: a re-compression copies the teacher, and the teacher is what
is wrong. The same holds apply to it (but the two on distinct texts to
distil from, which a retrain does not read), and a retrain counts as a
re-compression for the dedup and the cooldown. Every rule reports its
figure and threshold, fired or not.

A rule whose input could not be computed on the window (the summary's
``not_computed``) does not fire, and its detail says why. Only a
re-compression actually started counts for the dedup and the cooldown: a
``recompress`` verdict of a ``--report-only`` run is recorded with
``acted=False`` (history lines written before ``acted`` existed count as
acted, the conservative reading).
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict

from monitoring.summary import DriftSummary

Action = Literal["ok", "warn", "recompress", "retrain"]
# The verdicts that act (re-build and possibly deploy): dedup and cooldown count both.
ACTING = ("recompress", "retrain")
# Same as the deploy gates: a figure exactly at its threshold passes.
TOLERANCE = 1e-9


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PastDecision(_Frozen):
    """One line of the decision history (.shrinkflow/monitor/decisions.jsonl)."""

    ts: str
    action: Action
    window_sha256: str
    # Whether the verdict was acted on (a re-compression started). Missing on
    # lines written before the field: True, so an old history never lets a
    # window trigger twice or skips a cooldown.
    acted: bool = True

    @property
    def recompressed(self) -> bool:
        return self.action in ACTING and self.acted


class Finding(_Frozen):
    rule: str
    fired: bool
    value: float | None
    threshold: float
    detail: str
    computed: bool = True   # False: its input could not be computed on this window (detail says why)


class Decision(_Frozen):
    action: Action
    reasons: tuple[str, ...]
    findings: tuple[Finding, ...]
    window_sha256: str

    @property
    def triggers(self) -> tuple[str, ...]:
        return tuple(f.rule for f in self.findings if f.fired)


def _not_computed(rule: str, threshold: float, what: str, reason: str) -> Finding:
    return Finding(rule=rule, fired=False, value=None, threshold=threshold, computed=False,
                   detail=f"{what} not computed: {reason}")


def _findings(s: DriftSummary, p) -> list[Finding]:
    out = []
    if s.drifted_descriptor_share is not None:
        skipped = [n.metric.split(":", 1)[1] for n in s.not_computed if n.metric.startswith("descriptor:")]
        out.append(Finding(
            rule="text_drift", fired=s.drifted_descriptor_share > p.max_drifted_descriptor_share + TOLERANCE,
            value=s.drifted_descriptor_share, threshold=p.max_drifted_descriptor_share,
            detail=f"{sum(d.drifted for d in s.descriptors)} of {len(s.descriptors)} text descriptors drifted "
                   f"(share {s.drifted_descriptor_share:.3f}, max {p.max_drifted_descriptor_share:.3f})"
                   + "".join(f"{': ' if i == 0 else ', '}{d.column} p={d.value:.3g}"
                             for i, d in enumerate(x for x in s.descriptors if x.drifted))
                   + (f"; not computed: {', '.join(skipped)}" if skipped else "")))
    else:
        reasons = "; ".join(f"{n.metric}: {n.reason}" for n in s.not_computed if n.metric.startswith("descriptor"))
        out.append(_not_computed("text_drift", p.max_drifted_descriptor_share, "text drift",
                                 reasons or "no descriptor could be tested"))
    if s.embedding is not None:
        out.append(Finding(rule="embedding_drift", fired=s.embedding.roc_auc > p.embedding_drift_auc + TOLERANCE,
                           value=s.embedding.roc_auc, threshold=p.embedding_drift_auc,
                           detail=f"embedding drift ROC AUC {s.embedding.roc_auc:.3f} (max {p.embedding_drift_auc:.3f}, "
                                  f"{s.embedding.dims}-d teacher embeddings)"))
    elif (reason := s.reason_not_computed("embedding_drift")) is not None:
        out.append(_not_computed("embedding_drift", p.embedding_drift_auc, "embedding drift", reason))
    q = s.quality
    if q is not None and q.accuracy_drop is not None and q.labels >= p.min_feedback_labels:
        out.append(Finding(rule="feedback_accuracy", fired=q.accuracy_drop > p.max_feedback_accuracy_drop + TOLERANCE,
                           value=q.accuracy_drop, threshold=p.max_feedback_accuracy_drop,
                           detail=f"feedback accuracy {q.accuracy:.3f} on {q.labels} labels vs validated "
                                  f"{q.validated_accuracy:.3f}: drop {q.accuracy_drop:+.3f} "
                                  f"(max {p.max_feedback_accuracy_drop:.3f})"))
    elif q is not None and q.accuracy_drop is None and q.labels >= p.min_feedback_labels:
        out.append(_not_computed("feedback_accuracy", p.max_feedback_accuracy_drop, "feedback accuracy drop",
                                 f"the served version has no validated accuracy to compare {q.accuracy:.3f} "
                                 f"on {q.labels} labels with"))
    else:
        n = q.labels if q is not None else 0
        out.append(Finding(rule="feedback_accuracy", fired=False, value=None, threshold=p.max_feedback_accuracy_drop,
                           detail=f"feedback accuracy not judged: {n} labels (needs {p.min_feedback_labels})"))
    if s.teacher is not None:
        t = s.teacher
        floor, why = agreement_floor(t.rows, t.validated_agreement, t.validated_rows, p)
        out.append(Finding(rule="teacher_agreement", fired=t.agreement < floor - TOLERANCE,
                           value=t.agreement, threshold=floor,
                           detail=f"agreement with the teacher {t.agreement:.3f} on {t.rows} window texts "
                                  f"(min {floor:.3f}: {why})"))
    elif (reason := s.reason_not_computed("teacher_agreement")) is not None:
        out.append(_not_computed("teacher_agreement", p.min_teacher_agreement, "agreement with the teacher", reason))
    out.append(_teacher_feedback(q, p))
    return out


def agreement_floor(rows: int, validated: float | None, validated_rows: int | None, p) -> tuple[float, str]:
    """The agreement with the teacher below which a window of ``rows``
    shadow texts fires, and how it was set (for the finding's detail).

    With the version's validated agreement ``validated`` (measured on
    ``validated_rows`` test texts at deploy; None: its own error unknown,
    left out): ``validated - max_teacher_agreement_drop - z * se``, a
    one-sided test at ``teacher_agreement_confidence`` of "the agreement
    fell by more than the drop", with ``se`` the standard error of the
    difference of the two proportions under that null hypothesis (window
    agreement ``p0 = validated - drop``): ``sqrt(p0(1-p0)/rows +
    v(1-v)/validated_rows)``. Without one: ``min_teacher_agreement - z *
    sqrt(m(1-m)/rows)``. ``z`` is the standard normal quantile of the
    confidence (0 at 0.5: the bare figures). Raises ValueError for
    ``rows`` < 1."""
    from statistics import NormalDist

    if rows < 1:
        raise ValueError("the agreement floor needs at least one shadow text")
    z = NormalDist().inv_cdf(p.teacher_agreement_confidence)
    if validated is None:
        m = p.min_teacher_agreement
        se = math.sqrt(m * (1 - m) / rows)
        return m - z * se, (f"min_teacher_agreement {m:.3f} - {z:.3f} x SE {se:.4f} on {rows} texts; "
                            "the version has no validated agreement")
    p0 = min(1.0, max(0.0, validated - p.max_teacher_agreement_drop))
    var = p0 * (1 - p0) / rows
    if validated_rows:
        var += validated * (1 - validated) / validated_rows
    se = math.sqrt(var)
    on = f" on {validated_rows} texts" if validated_rows else ""
    return validated - p.max_teacher_agreement_drop - z * se, (
        f"validated {validated:.3f}{on} at deploy - max_teacher_agreement_drop "
        f"{p.max_teacher_agreement_drop:.3f} - {z:.3f} x SE {se:.4f}, "
        f"{p.teacher_agreement_confidence:g} one-sided")


def _teacher_feedback(q, p) -> Finding:
    """The retrain rule: the kept teacher's accuracy on the window's feedback
    labels against its validated (test) accuracy."""
    rule, limit = "teacher_feedback", p.max_teacher_feedback_drop
    n = q.teacher_labels if q is not None and q.teacher_labels is not None else 0
    if q is None or q.teacher_accuracy is None or n < p.min_feedback_labels:
        return Finding(rule=rule, fired=False, value=None, threshold=limit,
                       detail=f"teacher feedback accuracy not judged: {n} labels (needs {p.min_feedback_labels})")
    if q.teacher_accuracy_drop is None:
        return _not_computed(rule, limit, "teacher feedback accuracy drop",
                             f"the served version records no validated teacher accuracy to compare "
                             f"{q.teacher_accuracy:.3f} on {n} labels with")
    return Finding(rule=rule, fired=q.teacher_accuracy_drop > limit + TOLERANCE, value=q.teacher_accuracy_drop,
                   threshold=limit,
                   detail=f"teacher feedback accuracy {q.teacher_accuracy:.3f} on {n} labels vs validated "
                          f"{q.teacher_validated_accuracy:.3f}: drop {q.teacher_accuracy_drop:+.3f} "
                          f"(max {limit:.3f})")


def _fmt(f: Finding) -> str:
    return f"{f.rule}: {'FIRED' if f.fired else 'ok'}: {f.detail}"


def _counted(w) -> tuple[str, str]:
    """How a reason names the texts the re-compression floor counted, as
    (before a split, before a count): the re-compression's corpus, or the
    window in summaries written before ``corpus_rows`` existed."""
    if w.corpus_rows is None:
        return "the window's", "the window has"
    src = (f"the re-compression's texts (the newest {w.corpus_rows} logged rows up to the window's end, "
           "monitor.recompress_last_n):")
    return src, src


def decide(summary: DriftSummary, params, history: list[PastDecision], now: datetime) -> Decision:
    """ok, warn, recompress or retrain for one window; ``params`` is MonitorParams,
    ``history`` the earlier decisions (any order), ``now`` timezone-aware."""
    findings = _findings(summary, params)
    fired = [f for f in findings if f.fired]
    reasons = [_fmt(f) for f in findings]
    sha = summary.window.sha256
    if not fired:
        if summary.teacher_unavailable:
            # Not a pass: the rules that judge production against the teacher
            # did not run (a newcomer's finding: "ok" on a project whose
            # teacher a failed run had removed).
            reasons.insert(0, f"the teacher rules did not run: {summary.teacher_unavailable}")
            if not (summary.prediction_label is not None and summary.prediction_label.drifted):
                return Decision(action="warn", reasons=tuple(reasons), findings=tuple(findings), window_sha256=sha)
        if summary.prediction_label is not None and summary.prediction_label.drifted:
            m = summary.largest_share_shift
            moved = (f"{m.label!r} moved most, share {m.current:.3f} vs {m.reference:.3f} on reference"
                     if m is not None else "the class shares moved")
            return Decision(action="warn", findings=tuple(findings), window_sha256=sha, reasons=(
                f"prediction drift: {moved} (p={summary.prediction_label.value:.3g}, "
                f"{summary.prediction_label.method}); no degradation rule fired", *reasons))
        if summary.prediction_label is None:
            reasons.append("prediction drift not computed: "
                           + (summary.reason_not_computed("prediction_label") or "no served label in the window"))
        return Decision(action="ok", reasons=tuple(reasons), findings=tuple(findings), window_sha256=sha)
    held = None
    w = summary.window
    retrain = any(f.rule == "teacher_feedback" for f in fired)
    if summary.teacher_unavailable:
        # A re-compression distils from the kept teacher and a retrain
        # starts from it: without the right one, acting would train a new
        # teacher (DVC re-runs train for a missing one) or compare other
        # classes (a helper's finding).
        held = f"the teacher rules did not run, and a re-compression or retrain needs the kept teacher: " \
               f"{summary.teacher_unavailable}; not acting"
    elif w.rows < params.min_window_rows:
        held = f"window of {w.rows} rows is below min_window_rows {params.min_window_rows}: not acting"
        if params.window_last_n < params.min_window_rows:
            held += (f" (window_last_n {params.window_last_n} reads fewer rows than that: no window can act "
                     "until one of them changes)")
    elif not retrain and w.distill_texts is not None and (w.distill_texts == 0 or not w.heldout_texts):
        held = (f"{_counted(w)[0]} {w.distill_texts + (w.heldout_texts or 0)} distinct texts split into "
                f"{w.distill_texts} for distillation and {w.heldout_texts or 0} held out: a re-compression needs "
                "both; not acting")
    elif not retrain and w.distill_texts is not None and w.distill_texts < params.min_recompress_rows:
        held = (f"{_counted(w)[1]} {w.distill_texts} distinct texts for distillation, below min_recompress_rows "
                f"{params.min_recompress_rows}: too few to re-distil from; not acting")
        corpus = max(params.window_last_n, params.recompress_last_n)   # monitoring.run.read_recompress_corpus
        expected = corpus * (1 - params.heldout_fraction)   # shrinkflow.window.split_window, by text hash
        if expected < params.min_recompress_rows:
            held += (f" (a re-compression reads at most {corpus} rows, the larger of window_last_n and "
                     f"recompress_last_n, and holds out heldout_fraction {params.heldout_fraction:g} of them: about "
                     f"{expected:.0f} left to distil, so a window rarely reaches min_recompress_rows until one of "
                     "these changes)")
    elif any(h.window_sha256 == sha and h.recompressed for h in history):
        held = f"this window ({sha[:12]}) already triggered a re-compression: not triggering twice"
    else:
        when, action = max(((datetime.fromisoformat(h.ts), h.action) for h in history if h.recompressed),
                           default=(None, None))
        if when is not None and now - when < timedelta(hours=params.cooldown_hours):
            hours = (now - when).total_seconds() / 3600
            what = "retrain" if action == "retrain" else "re-compression"   # a retrain holds the cooldown too
            held = (f"cooldown: the last {what} was {hours:.1f} h ago "
                    f"(cooldown_hours {params.cooldown_hours:g})")
    if held:
        return Decision(action="warn", reasons=(held, *reasons), findings=tuple(findings), window_sha256=sha)
    if retrain:
        return Decision(action="retrain", findings=tuple(findings), window_sha256=sha,
                        reasons=("retrain the teacher on the production labels: it is wrong on the new traffic "
                                 f"({', '.join(f.rule for f in fired)} fired)", *reasons))
    return Decision(action="recompress", findings=tuple(findings), window_sha256=sha,
                    reasons=(f"re-compress from the kept teacher: {', '.join(f.rule for f in fired)} fired",
                             *reasons))
