"""The retrain verdict: the kept teacher's own feedback accuracy deciding
``retrain`` over ``recompress``, on its boundaries, with the same holds
(window floor, dedup, cooldown) as a re-compression."""

from __future__ import annotations

from datetime import timedelta

import pytest

from monitoring.policy import PastDecision, decide
from monitoring.summary import Quality
from shrinkflow.config import MonitorParams
from tests.test_policy import NOW, P, summary

EPS = 1e-6
RP = P.model_copy(update={"max_teacher_feedback_drop": 0.05})


def with_teacher(labels: int = 50, teacher_accuracy: float = 0.9, teacher_validated: float | None = 0.9,
                 feedback_accuracy: float = 0.85, **kw):
    """A summary whose feedback labels the teacher answered too."""
    s = summary(labels=labels, feedback_accuracy=feedback_accuracy, **kw)
    q = Quality(**{**s.quality.model_dump(), "teacher_labels": labels, "teacher_accuracy": teacher_accuracy,
                   "teacher_validated_accuracy": teacher_validated,
                   "teacher_accuracy_drop": None if teacher_validated is None
                   else round(teacher_validated - teacher_accuracy, 9)})
    return s.model_copy(update={"quality": q})


@pytest.mark.parametrize("teacher_accuracy, verdict", [(0.85, "ok"),           # drop exactly 0.05: passes
                                                       (0.85 - EPS, "retrain"),  # just over
                                                       (0.85 + EPS, "ok")])    # just under
def test_teacher_feedback_drop_boundary(teacher_accuracy, verdict):
    d = decide(with_teacher(teacher_accuracy=teacher_accuracy), RP, [], NOW)
    assert d.action == verdict
    f = next(f for f in d.findings if f.rule == "teacher_feedback")
    assert f.fired is (verdict == "retrain")
    assert f.threshold == 0.05 and f.value == pytest.approx(0.9 - teacher_accuracy)
    assert f"teacher feedback accuracy {teacher_accuracy:.3f} on 50 labels" in f.detail and "max 0.050" in f.detail


def test_retrain_wins_over_recompress_when_the_teacher_is_wrong_too():
    # The student lost 10 points on feedback (feedback_accuracy fires: recompress
    # alone), and the teacher lost 6: re-compression would copy a wrong teacher.
    d = decide(with_teacher(teacher_accuracy=0.84, feedback_accuracy=0.75), RP, [], NOW)
    assert d.action == "retrain"
    assert set(d.triggers) == {"feedback_accuracy", "teacher_feedback"}
    assert d.reasons[0].startswith("retrain the teacher")
    # The teacher holding its accuracy: the student's loss is the compression gap.
    d = decide(with_teacher(teacher_accuracy=0.9, feedback_accuracy=0.75), RP, [], NOW)
    assert d.action == "recompress" and "teacher_feedback" not in d.triggers


@pytest.mark.parametrize("labels, judged", [(50, True), (49, False)])
def test_teacher_feedback_needs_min_feedback_labels(labels, judged):
    d = decide(with_teacher(labels=labels, teacher_accuracy=0.5), RP, [], NOW)
    f = next(f for f in d.findings if f.rule == "teacher_feedback")
    assert f.fired is judged and (f.value is not None) is judged
    assert d.action == ("retrain" if judged else "ok")
    if not judged:
        assert f.detail == "teacher feedback accuracy not judged: 49 labels (needs 50)"


def test_no_validated_teacher_accuracy_is_not_computed_and_does_not_fire():
    d = decide(with_teacher(teacher_accuracy=0.5, teacher_validated=None), RP, [], NOW)
    f = next(f for f in d.findings if f.rule == "teacher_feedback")
    assert not f.fired and not f.computed and "no validated teacher accuracy" in f.detail
    assert d.action == "ok"


def test_summaries_without_teacher_fields_never_retrain():
    d = decide(summary(labels=60, feedback_accuracy=0.1), RP, [], NOW)
    assert d.action == "recompress"
    assert not next(f for f in d.findings if f.rule == "teacher_feedback").fired


def test_retrain_is_held_like_a_recompression():
    s = with_teacher(teacher_accuracy=0.5)
    small = with_teacher(teacher_accuracy=0.5, rows=199)
    assert decide(small, RP, [], NOW).action == "warn"
    assert "below min_window_rows" in decide(small, RP, [], NOW).reasons[0]
    # dedup: this window already triggered a retrain
    past = [PastDecision(ts=(NOW - timedelta(hours=48)).isoformat(), action="retrain",
                         window_sha256=s.window.sha256)]
    d = decide(s, RP, past, NOW)
    assert d.action == "warn" and "already triggered" in d.reasons[0]
    # cooldown: a retrain 1 h ago holds a re-compression, and the other way round
    recent = [PastDecision(ts=(NOW - timedelta(hours=1)).isoformat(), action="retrain", window_sha256="b" * 64)]
    d = decide(summary(agreement=0.5), RP, recent, NOW)
    assert d.action == "warn" and d.reasons[0].startswith("cooldown")
    recent = [PastDecision(ts=(NOW - timedelta(hours=1)).isoformat(), action="recompress", window_sha256="b" * 64)]
    assert decide(s, RP, recent, NOW).action == "warn"
    # a retrain verdict not acted on (--report-only) starts no cooldown
    idle = [PastDecision(ts=(NOW - timedelta(hours=1)).isoformat(), action="retrain", window_sha256="b" * 64,
                         acted=False)]
    assert decide(s, RP, idle, NOW).action == "retrain"


def test_max_teacher_feedback_drop_is_a_fraction():
    with pytest.raises(ValueError):
        MonitorParams(max_teacher_feedback_drop=1.5)


def test_teacher_quality_against_its_validated_accuracy():
    import numpy as np

    from monitoring.evidently_reports import teacher_quality

    y = np.array([0.0, 1.0, 2.0, 1.0])
    assert teacher_quality(y, np.array([0, 1, 1, 1]), 0.9) == {
        "teacher_labels": 4, "teacher_accuracy": 0.75, "teacher_validated_accuracy": 0.9,
        "teacher_accuracy_drop": 0.15}
    assert teacher_quality(y, None, 0.9) == {}                         # no teacher ran
    assert teacher_quality(y, np.array([0, 1, 2, 1]), None)["teacher_accuracy_drop"] is None
