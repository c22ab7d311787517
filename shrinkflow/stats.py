"""Statistics over predictions: pure functions of labels and labels.

Accuracy, macro-F1 and per-class recall for any number of classes (class ids
are indices into the task's sorted label tuple, ``shrinkflow.labels``);
agreement between two models (needs no labels); the paired accuracy
difference against the teacher with its confidence interval and McNemar's
exact test, which only ask whether each model was right on each text and so
hold for any number of classes; and the paired macro-F1 difference with a
bootstrap interval.
"""

from __future__ import annotations

import math
from fractions import Fraction
from statistics import NormalDist

import numpy as np


def accuracy_f1(y_true, y_pred) -> tuple[float, float]:
    """Accuracy, and the F1 of class id 1 (the built-in task's positive class):
    meaningful for two classes (ids 0 and 1) only, where ``quality`` reports it."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    acc = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    tp = int(((y_pred == 1) & (y_true == 1)).sum())
    fp = int(((y_pred == 1) & (y_true == 0)).sum())
    fn = int(((y_pred == 0) & (y_true == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return acc, f1


def _class_names(classes, y_true, y_pred) -> tuple[str, ...]:
    """Names of the classes, in class-id order: ``classes`` is the label
    tuple, a class count, or None (then ids 0 .. max id seen, at least 2)."""
    if classes is None:
        seen = [int(x) for x in (*y_true, *y_pred)]
        classes = max(2, max(seen) + 1) if seen else 2
    if isinstance(classes, (int, np.integer)):
        return tuple(str(i) for i in range(int(classes)))
    return tuple(str(c) for c in classes)


def confusion(y_true, y_pred, n_classes: int) -> np.ndarray:
    """Confusion counts, shape (n_classes, n_classes): rows true class id,
    columns predicted class id. Raises ValueError on an id outside the classes."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) != len(y_pred):
        raise ValueError(f"cannot score {len(y_pred)} predictions against {len(y_true)} labels")
    bad = sorted({int(x) for x in (*y_true, *y_pred) if not 0 <= x < n_classes})
    if bad:
        raise ValueError(f"class ids {bad} are outside the {n_classes} classes (ids 0..{n_classes - 1})")
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes ** 2).reshape(n_classes, n_classes)


def _macro_f1(cm: np.ndarray) -> float:
    """Mean per-class F1 over the classes that occur among the labels or the
    predictions (scikit-learn's ``f1_score(average="macro")``): a class
    neither present nor predicted has no F1 and does not count."""
    tp = np.diag(cm).astype(float)
    denom = cm.sum(axis=0) + cm.sum(axis=1)     # 2tp + fp + fn
    present = denom > 0
    return float((2 * tp[present] / denom[present]).mean()) if present.any() else 0.0


def quality(labels, predictions, classes=None) -> dict:
    """Accuracy, macro-F1 and per-class recall of predictions against labels.

    ``labels`` and ``predictions`` are class ids; ``classes`` is the task's
    label tuple (names in class-id order), a class count, or None (ids up to
    the largest seen). Returns ``accuracy``; ``macro_f1`` (the unweighted mean
    of the per-class F1 over the classes present among labels or
    predictions); ``per_class_recall`` and ``per_class_n`` keyed by class
    name (recall is None for a class with no labelled text); ``f1``, the F1
    of class id 1 (the built-in task's "positive"), for two classes only and
    None otherwise; and ``n``. Fractions rounded to 6 places.
    """
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    names = _class_names(classes, y, p)
    cm = confusion(y, p, len(names))
    support = cm.sum(axis=1)
    recall = {name: (round(float(cm[i, i] / support[i]), 6) if support[i] else None)
              for i, name in enumerate(names)}
    acc, f1 = accuracy_f1(y, p)
    return {"accuracy": round(acc, 6), "macro_f1": round(_macro_f1(cm), 6),
            "f1": round(f1, 6) if len(names) == 2 else None,
            "per_class_recall": recall, "per_class_n": {name: int(support[i]) for i, name in enumerate(names)},
            "n": len(y)}


def agreement(a, b) -> float | None:
    """Share of texts on which two models give the same label (no labels needed)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        raise ValueError(f"cannot compare {len(a)} predictions with {len(b)}")
    return round(float((a == b).mean()), 6) if len(a) else None


def soft_agreement(p, q) -> float | None:
    """How much two models' class distributions overlap, averaged over texts:
    mean over rows of sum_c min(p[i, c], q[i, c]), i.e. 1 minus the mean
    total variation distance. ``p`` and ``q`` are ``[N, C]`` probabilities
    (rows summing to 1), in the same text order. A fraction in [0, 1]; for
    one-hot rows it is the label agreement (``agreement``). None for no rows.

    Why it gates a re-compression's gain over production: two students close
    to the teacher disagree with it on few texts, so a paired difference of
    label agreement on a thousand texts is mostly noise (standard error ~0.008
    against gains ~0.01 in bench/results/monitoring.md), while every text
    moves the overlap a little; on the saved models of the 2026-12-04
    benchmark run the overlap's gain had z = 4.0 on the 1,040 held-out window
    texts against 0.1 for label agreement (docs/monitoring.md). Total
    variation is the coupling form of disagreement: the overlap is the
    largest probability with which two labels drawn from p and q can agree
    (Levin, Peres & Wilmer, "Markov Chains and Mixing Times", Prop. 4.7).
    Non-finite probabilities give NaN, which fails every gate it enters.
    Raises ValueError on shapes that differ.
    """
    rows = overlap_rows(p, q)
    return round(float(rows.mean()), 6) if len(rows) else None


def overlap_rows(p, q) -> np.ndarray:
    """Per text, ``[N]``: sum_c min(p[i, c], q[i, c]) of two ``[N, C]``
    probability arrays, the terms ``soft_agreement`` averages (a paired
    difference of two models' rows gives its standard error). Raises
    ValueError on shapes that differ."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"cannot compare probabilities of shape {p.shape} with {q.shape}")
    return np.minimum(p, q).sum(axis=1) if len(p) else np.zeros(0)


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


def paired_macro_f1_drop(labels, teacher_pred, candidate_pred, n_classes: int, confidence: float = 0.95,
                         resamples: int = 1000, seed: int = 0) -> dict:
    """Teacher macro-F1 minus candidate macro-F1 on the same texts, with a
    paired percentile-bootstrap interval.

    The point estimate is the difference of the two ``quality`` figures
    (before their rounding to 6 places). Macro-F1 is not a mean over texts, so there is no closed-form
    paired interval like the accuracy drop's: each of ``resamples`` draws
    (seeded) resamples the texts with replacement and scores both models on
    the same draw, so the interval is paired like the accuracy one. Every
    class counts equally, so on a rare class a few texts move it a lot: the
    interval says how much.
    """
    y, t, c = (np.asarray(x, dtype=np.int64) for x in (labels, teacher_pred, candidate_pred))
    n = len(y)
    if n == 0:
        raise ValueError("no texts to compare on")
    drop = _macro_f1(confusion(y, t, n_classes)) - _macro_f1(confusion(y, c, n_classes))
    rng = np.random.default_rng(seed)
    k = n_classes * n_classes
    yt, yc = y * n_classes + t, y * n_classes + c   # confusion cell of each text, per model

    def macro_f1s(cells, idx):
        rows = len(idx)
        cms = np.bincount(((np.arange(rows) * k)[:, None] + cells[idx]).ravel(),
                          minlength=rows * k).reshape(rows, n_classes, n_classes)
        tp = np.diagonal(cms, axis1=1, axis2=2).astype(float)
        denom = cms.sum(axis=1) + cms.sum(axis=2)
        f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
        return np.nanmean(f1, axis=1)

    # Resamples in chunks of at most ~4M drawn indices (32 MB), whatever n.
    drops = []
    chunk = max(1, 4_000_000 // n)
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        drops.append(macro_f1s(yt, idx) - macro_f1s(yc, idx))
    drops = np.concatenate(drops)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(drops, [tail, 100 - tail])
    return {"macro_f1_drop": round(drop, 6), "macro_f1_drop_ci_low": round(float(low), 6),
            "macro_f1_drop_ci_high": round(float(high), 6), "macro_f1_drop_resamples": resamples}


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
