"""Statistics over predictions: pure functions of labels and labels.

Accuracy and F1, agreement between two models (needs no labels), and the
paired accuracy difference against the teacher with its confidence interval
and McNemar's exact test.
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np


def accuracy_f1(y_true, y_pred) -> tuple[float, float]:
    """Accuracy and F1 of the positive class (label 1)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    acc = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    tp = int(((y_pred == 1) & (y_true == 1)).sum())
    fp = int(((y_pred == 1) & (y_true == 0)).sum())
    fn = int(((y_pred == 0) & (y_true == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return acc, f1


def quality(labels, predictions) -> dict:
    """Accuracy and positive-class F1 of predictions against labels."""
    acc, f1 = accuracy_f1(np.asarray(labels), np.asarray(predictions))
    return {"accuracy": round(acc, 6), "f1": round(f1, 6), "n": len(labels)}


def agreement(a, b) -> float | None:
    """Share of texts on which two models give the same label (no labels needed)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        raise ValueError(f"cannot compare {len(a)} predictions with {len(b)}")
    return round(float((a == b).mean()), 6) if len(a) else None


def mcnemar_exact_p(b: int, c: int) -> float:
    """Two-sided exact McNemar test: under H0 the b + c discordant pairs split
    50/50 between the two models (a binomial test)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, float(Fraction(2 * tail, 2 ** n)))


def paired_accuracy_drop(labels, teacher_pred, candidate_pred, confidence: float = 0.95) -> dict:
    """Teacher accuracy minus candidate accuracy on the same texts, with a
    confidence interval and McNemar's test.

    Paired, because both models saw the same sentences: only the discordant
    texts (one right, the other wrong) carry information, so the interval is
    far narrower than two independent accuracies' would suggest. Wald
    interval for a paired difference of proportions:
    se = sqrt(b + c - (b - c)^2 / n) / n.
    """
    y, t, c_ = (np.asarray(x) for x in (labels, teacher_pred, candidate_pred))
    n = len(y)
    if n == 0:
        raise ValueError("no texts to compare on")
    t_ok, c_ok = t == y, c_ == y
    b = int((t_ok & ~c_ok).sum())   # teacher right, candidate wrong
    c = int((~t_ok & c_ok).sum())   # candidate right, teacher wrong
    drop = (b - c) / n
    se = math.sqrt(max(0.0, b + c - (b - c) ** 2 / n)) / n
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return {"accuracy_drop": round(drop, 6), "accuracy_drop_se": round(se, 6),
            "accuracy_drop_ci_low": round(drop - z * se, 6), "accuracy_drop_ci_high": round(drop + z * se, 6),
            "confidence": confidence, "teacher_only_correct": b, "candidate_only_correct": c,
            "mcnemar_p": round(mcnemar_exact_p(b, c), 6), "n": n}


def round_ratio_p95(reference_rounds: list[list[float]], candidate_rounds: list[list[float]]) -> float:
    """reference p95 / candidate p95, round by round, then the median.

    Both models ran each round within the same second or so, on the same
    sentences, so a burst of machine noise lands inside one or two rounds and
    the median ignores it; the p95 of all calls pooled does not (measured: the
    pooled ratio moved +-19% over five repeats, this one +-3.5%,
    bench/results/latency_spread.md).
    """
    if not reference_rounds or len(reference_rounds) != len(candidate_rounds):
        raise ValueError("need the same, non-zero number of rounds for both models")
    return float(np.median([np.percentile(r, 95) / np.percentile(c, 95)
                            for r, c in zip(reference_rounds, candidate_rounds)]))
