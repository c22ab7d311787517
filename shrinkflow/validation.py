"""Validation as pure functions: predictions and timings in; selection
figures, gate reports, the choice and its confirmation out.

Choose on one split, report on another. Every candidate is gated and
compared on ``val``; only the chosen one is then scored on ``test``, so the
test figure of the deployed model is not the best of several tries on the
same sentences. Agreement with the teacher needs no labels, so it is reported
on every split, unlabelled text included.

Any number of classes: ``label_names`` is the task's label tuple (class id =
index, ``shrinkflow.labels``); quality is reported as accuracy, macro-F1 and
per-class recall by name, next to the paired accuracy drop with McNemar's
test and the paired macro-F1 drop.

What comes out is typed (``shrinkflow.artifacts``): a TeacherMeasurements,
a CandidateMeasurements per candidate, the Confirmation, and the two stage
documents, ValidationReport and GatesReport. Each holds exactly the keys the
documents have always had, so they are written byte for byte as before
(tests/test_typed_documents.py); a re-compression's new candidates add
``p95_b1_ratio_vs_production`` (since 2026-12-04).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from shrinkflow.artifacts import (PERFORMANCE_KEYS, PRODUCTION_CANDIDATE, CandidateGates, CandidateMeasurements,  # noqa: F401
                                  Confirmation, ConfirmationMetrics, GatesReport, Quality, RecordedProduction,
                                  TeacherMeasurements, ValidationReport)
from shrinkflow.config import ValidateParams
from shrinkflow.errors import DataError
from shrinkflow.stats import (agreement, paired_accuracy_drop, paired_macro_f1_drop, quality, round_ratio_p95,
                             soft_agreement)
from shrinkflow.artifacts import GateReport
from shrinkflow.gates import (ProductionBaseline, Selection, confirm_gates, evaluate_gates, select_candidate,
                             teacher_gates)

SELECTION_SPLIT = "val"
CONFIRMATION_SPLIT = "test"


def check_model_labels(expected: Sequence[str], models: dict[str, Sequence[str] | None]) -> None:
    """Every model must output the task's classes in the task's order.

    ``expected`` is the data stage's label tuple (labels.json); ``models``
    maps a model (its directory) to the ``labels`` of its manifest. Raises
    DataError naming each model whose labels differ, with both lists: its
    class ids would mean other classes than the splits' ids.
    """
    expected = list(expected)
    bad = {name: (list(got) if got is not None else None) for name, got in models.items()
           if got is None or list(got) != expected}
    if bad:
        lines = "; ".join(f"{name}: {got if got is not None else 'no labels in its manifest'}"
                          for name, got in bad.items())
        raise DataError(f"models whose labels differ from the data's {expected} (data/prepared/labels.json): "
                        f"{lines}. Re-train and re-compress on these data (dvc repro), so every model "
                        "outputs one logit per class in this order")


def _classes(label_names: Sequence[str] | None, labels: dict) -> tuple[str, ...]:
    """The label tuple, or (when not given) the class ids seen, as names."""
    if label_names is not None:
        return tuple(label_names)
    seen = [int(y) for ys in labels.values() for y in ys]
    return tuple(str(i) for i in range(max(2, max(seen) + 1) if seen else 2))


def _shifted_accuracy(run: dict, labels: dict, classes: Sequence[str]) -> float | None:
    y = labels.get("shifted")
    return quality(y, run["predictions"]["shifted"], classes)["accuracy"] if y is not None and len(y) else None


def teacher_figures(run: dict, labels: dict, classes: Sequence[str] | None = None) -> TeacherMeasurements:
    """The teacher on the selection split: the baseline every gate compares to.
    ``run`` is one model's measured run (``evaluate.measure_interleaved``)."""
    classes = _classes(classes, labels)
    return TeacherMeasurements(**{
        "split": SELECTION_SPLIT, **quality(labels[SELECTION_SPLIT], run["predictions"][SELECTION_SPLIT], classes),
        "accuracy_shifted": _shifted_accuracy(run, labels, classes), **run["performance"]})


def paired_drops(y, teacher_pred, candidate_pred, classes: Sequence[str], confidence: float) -> dict:
    """The paired accuracy drop (Wald interval, McNemar) and the paired
    macro-F1 drop (bootstrap interval) of a candidate against the teacher:
    the fields of ``shrinkflow.artifacts.PairedDrop``, by name."""
    return {**paired_accuracy_drop(y, teacher_pred, candidate_pred, confidence),
            **paired_macro_f1_drop(y, teacher_pred, candidate_pred, len(classes), confidence)}


def candidate_figures(run: dict, teacher_run: dict, labels: dict, confidence: float,
                      classes: Sequence[str] | None = None, files: dict | None = None) -> CandidateMeasurements:
    """A candidate on the selection split, paired against the teacher, plus
    its agreement with the teacher on every split it was run on; ``files``:
    its ``files`` and ``content_hash`` as validated (None: not recorded)."""
    classes = _classes(classes, labels)
    p, tp = run["predictions"], teacher_run["predictions"]
    # The speedup the min_speedup gate checks: round by round, when the two
    # were timed interleaved (shrinkflow.stats.round_ratio_p95).
    speedup = ({"speedup_p95_b1": round(round_ratio_p95(teacher_run["rounds_b1"], run["rounds_b1"]), 4)}
               if run.get("rounds_b1") and teacher_run.get("rounds_b1") else {})
    y = labels[SELECTION_SPLIT]
    # Merged as a dict first: quality and the paired drop both count ``n``
    # (the same texts), and the later one stands, as it always has.
    return CandidateMeasurements(**{
        "split": SELECTION_SPLIT, **quality(y, p[SELECTION_SPLIT], classes), **speedup,
        **paired_drops(y, tp[SELECTION_SPLIT], p[SELECTION_SPLIT], classes, confidence),
        "accuracy_shifted": _shifted_accuracy(run, labels, classes),
        "agreement": {s: agreement(p[s], tp[s]) for s in p}, **_soft_agreement(run, teacher_run),
        **_invariance(run), **run["performance"], **(files or {})})


def production_ratios(candidate_runs: dict[str, dict], production: str) -> dict[str, float]:
    """{candidate: its batch-1 p95 over the production model's}, within each
    interleaved round, the median over rounds (``stats.round_ratio_p95``;
    1.10: 10% slower), for every candidate but ``production`` itself, on a
    re-compression where all were timed in the same rounds (a run without
    ``rounds_b1``, or production without: none). What
    ``max_p95_b1_slowdown_vs_production`` checks: measured directly, the
    teacher's timing does not enter it (bench/results/slowdown_spread.md).

    Raises ValueError when a candidate and production were timed in a
    different number of rounds (not timed together)."""
    prod = candidate_runs[production].get("rounds_b1")
    if not prod:
        return {}
    return {n: round(round_ratio_p95(r["rounds_b1"], prod), 4) for n, r in candidate_runs.items()
            if n != production and r.get("rounds_b1")}


def _soft_agreement(run: dict, teacher_run: dict) -> dict:
    """``soft_agreement`` by split, on the splits both runs have
    probabilities for (none: no key)."""
    p, tp = run.get("probabilities") or {}, teacher_run.get("probabilities") or {}
    both = [s for s in p if s in tp]
    return {"soft_agreement": {s: soft_agreement(p[s], tp[s]) for s in both}} if both else {}


def _invariance(run: dict) -> dict:
    """The batch-invariance figures (without the per-text labels)."""
    inv = run.get("batch_invariance")
    return {"batch_invariance": {k: v for k, v in inv.items() if k != "labels_alone"}} if inv else {}


def confirmation(name: str, run: dict, teacher_run: dict, labels: dict, params: ValidateParams,
                 classes: Sequence[str] | None = None,
                 production: ProductionBaseline | None = None) -> Confirmation:
    """The chosen candidate alone, on the test split: its accuracy gates again
    (and max_macro_f1_drop when set), and max_accuracy_drop_vs_production
    against ``production``'s test accuracy when it has one (a re-compression:
    measured beside it; a retrain: as production's manifest records it, on
    the same test split)."""
    classes = _classes(classes, labels)
    y = labels[CONFIRMATION_SPLIT]
    p, tp = run["predictions"][CONFIRMATION_SPLIT], teacher_run["predictions"][CONFIRMATION_SPLIT]
    teacher = Quality(**quality(y, tp, classes))
    cand = ConfirmationMetrics(**{**quality(y, p, classes),
                                  **paired_drops(y, tp, p, classes, params.gates.accuracy_drop_confidence),
                                  "agreement": agreement(p, tp)})
    report = confirm_gates(name, cand, teacher, params.gates, production)
    return Confirmation(candidate=name, split=CONFIRMATION_SPLIT, teacher=teacher, metrics=cand,
                        gates=CandidateGates.from_report(report), passed=report.passed,
                        enforced=params.confirm_on_test == "gate")


def validate_runs(teacher_run: dict, candidate_runs: dict[str, dict], labels: dict[str, list[int]],
                  params: ValidateParams, files: dict[str, dict],
                  label_names: Sequence[str] | None = None,
                  production_version: str | None = None,
                  production_as: str | None = None,
                  recorded_production: RecordedProduction | None = None,
                  production_baseline_only: bool = False) -> tuple[ValidationReport, GatesReport]:
    """(metrics/validate.json, reports/gates.json) from the measured runs.

    ``teacher_run`` and each of ``candidate_runs`` is a measured run
    (``evaluate.measure_interleaved``: predictions by split, performance,
    timing rounds, batch invariance). ``labels`` holds each split's class
    ids; ``label_names`` the task's label tuple (default: the ids seen, as
    names), recorded in both documents as ``labels``. ``files`` holds each
    candidate's per-file sha256 and content hash as validated (``files``,
    ``content_hash``); deploy refuses a candidate whose files differ from them.
    ``production_version``: on a re-compression, the version in production,
    whose run is ``candidate_runs[PRODUCTION_CANDIDATE]``: its held-out window
    agreement is the baseline of every candidate's window gate
    (``gates.window_gates``), and it is gated and selected like the others.
    ``production_as``: instead, the built candidate with production's very
    files, measured once under its own name; its agreement is the baseline.
    ``recorded_production``: on a retrain (no production candidate), the
    production model's val accuracy as its manifest records it, on these
    very val texts (``retrain_production``): the baseline of
    max_accuracy_drop_vs_production alone.
    ``production_baseline_only`` (a retrain that measured the production
    model, ``production_version``, beside its candidates): production's run
    is the baseline of the candidates' window gain (``gates.window_gates``)
    and, without ``recorded_production``, of max_accuracy_drop_vs_production;
    it is not gated, not selected and not in the report's candidates, and no
    candidate is gated on its latency against production (the teacher
    changed; ``gates.production_latency_gates`` is re-compression only).
    """
    classes = _classes(label_names, labels)
    conf = params.gates.accuracy_drop_confidence
    teacher = teacher_figures(teacher_run, labels, classes)
    candidates = {n: candidate_figures(r, teacher_run, labels, conf, classes, files[n])
                  for n, r in candidate_runs.items()}
    baseline = None
    if production_version is not None:
        prod_name = PRODUCTION_CANDIDATE if production_baseline_only else (production_as or PRODUCTION_CANDIDATE)
        prod_run = candidate_runs[prod_name]
        if production_baseline_only:   # measured beside the candidates, not one of them
            prod = candidates.pop(prod_name)
            candidate_runs = {n: r for n, r in candidate_runs.items() if n != prod_name}
        else:
            ratios = production_ratios(candidate_runs, prod_name)
            candidates = {n: m.model_copy(update={"p95_b1_ratio_vs_production": ratios[n]}) if n in ratios else m
                          for n, m in candidates.items()}
            prod = candidates[prod_name]
        rec = recorded_production if production_baseline_only else None
        test = labels[CONFIRMATION_SPLIT]
        baseline = ProductionBaseline(
            production_version, prod.agreement.get("window_heldout"),
            soft_agreement=(prod.soft_agreement or {}).get("window_heldout"),
            speedup_p95_b1=None if production_baseline_only else prod.speedup_p95_b1,
            accuracy=rec.val_accuracy if rec else prod.accuracy,
            test_accuracy=rec.test_accuracy if rec else (
                quality(test, prod_run["predictions"][CONFIRMATION_SPLIT], classes)["accuracy"] if len(test) else None))
    elif recorded_production is not None:
        baseline = ProductionBaseline(recorded_production.version, None, accuracy=recorded_production.val_accuracy,
                                      test_accuracy=recorded_production.test_accuracy)
    selectable = production_version is not None and not production_baseline_only
    own = (ProductionBaseline(production_version, baseline.agreement, is_candidate=True,
                              soft_agreement=baseline.soft_agreement) if selectable else None)
    baselines = {n: own if n == PRODUCTION_CANDIDATE else baseline for n in candidates}
    reports = {n: evaluate_gates(n, m, teacher, params.gates, baselines[n]) for n, m in candidates.items()}
    fallback = (production_as or PRODUCTION_CANDIDATE) if selectable else None
    sel, confirm, unconfirmed = _select_confirmed(candidates, reports, candidate_runs, teacher_run, labels, params,
                                                  classes, fallback, baselines)
    selected, reason = sel.chosen, sel.reason
    if confirm is not None and not confirm.passed:  # reported only (confirm_on_test: report)
        reason += f" (not confirmed on {CONFIRMATION_SPLIT}, reported only: {_misses(confirm)})"
    if unconfirmed:
        tried = "; ".join(f"{c.candidate!r} passed every gate on {SELECTION_SPLIT} but was not confirmed on "
                          f"{CONFIRMATION_SPLIT}: {_misses(c)}" for c in unconfirmed)
        if selected is None and sel.best_effort in {c.candidate for c in unconfirmed}:
            reason = f"no candidate deployed: {tried}"
            # the last one tried is the confirmation the documents show; the
            # ones before it are listed as set aside
            confirm, unconfirmed = unconfirmed[-1], unconfirmed[:-1]
        else:
            reason = f"{reason}. Set aside before it: {tried}"
    report = ValidationReport(selection_split=SELECTION_SPLIT, confirmation_split=CONFIRMATION_SPLIT,
                              labels=list(classes), teacher=teacher, candidates=candidates, confirmation=confirm)
    selection = GatesReport(selected=selected, best_effort=sel.best_effort, reason=reason, labels=list(classes),
                            candidates={n: CandidateGates.from_report(r) for n, r in reports.items()},
                            confirmation=confirm,
                            **({"production": production_version} if selectable else {}),
                            **({"production_as": production_as} if selectable and production_as else {}),
                            **({"production_baseline": production_version}
                               if production_version is not None and production_baseline_only else {}),
                            **({"unconfirmed": unconfirmed} if unconfirmed else {}))
    return report, selection


def _misses(conf: Confirmation) -> str:
    return "; ".join(f"{g} FAILED on {conf.split}: {d.value:.4g} (margin {d.margin:+.4g})"
                     for g, d in conf.gates.gates.items() if not d.passed)


def _select_confirmed(candidates, reports, candidate_runs, teacher_run, labels, params, classes, fallback,
                      baselines=None):
    """``select_candidate`` on val, then the choice alone confirmed on test;
    when an enforced confirmation fails, that candidate is set aside and the
    next choice on val (the next lowest objective among those passing every
    gate; on a re-compression production last) is confirmed, until one is
    confirmed or none is left. Each candidate is scored on test only when it
    is the one chosen, so what is deployed is the first in val's order that
    test confirms, never the best of several on test. Returns (the last
    Selection, the confirmation of its choice or None, the confirmations
    that failed, in order). ``baselines``: each candidate's production
    baseline (None: no production to compare with)."""
    unconfirmed: list[Confirmation] = []
    left = dict(candidates)
    sel = select_candidate(left, reports, params.objective, fallback=fallback)
    while sel.chosen is not None:
        confirm = confirmation(sel.chosen, candidate_runs[sel.chosen], teacher_run, labels, params, classes,
                               (baselines or {}).get(sel.chosen))
        if confirm.passed or not confirm.enforced:
            return sel, confirm, unconfirmed
        unconfirmed.append(confirm)
        del left[sel.chosen]
        if not left:
            break
        sel = select_candidate(left, reports, params.objective, fallback=fallback)
    if unconfirmed:  # the best effort among every candidate, not only those left (validate_runs says why)
        sel = Selection(None, unconfirmed[0].candidate, "")
    return sel, None, unconfirmed


class DeployedFigures(NamedTuple):
    """What a deployed version reports (its manifest's keys of the same
    names): the chosen candidate's test figures with its val agreement and
    performance, the teacher's on the same test texts, and, kept apart, the
    val figures it was selected on (without the file hashes)."""

    metrics: CandidateMeasurements
    teacher_metrics: TeacherMeasurements
    selection_metrics: CandidateMeasurements

    def to_json_dict(self) -> dict:
        """The three documents by name, as a version manifest stores them."""
        return {k: v.to_json_dict() for k, v in self._asdict().items()}


def deployed_figures(report: ValidationReport, name: str) -> DeployedFigures:
    """What a deployed version reports: test figures of the chosen candidate
    (and of the teacher on the same texts), its performance, and, kept
    apart, the val figures it was selected on. Raises ValueError when
    ``name`` is not the confirmed candidate."""
    conf = report.confirmation
    if conf is None or conf.candidate != name:
        raise ValueError(f"{name!r} was not the confirmed candidate")
    cand = report.candidates[name]
    return DeployedFigures(
        metrics=CandidateMeasurements(**{
            "split": CONFIRMATION_SPLIT, **conf.metrics.model_dump(exclude_unset=True),
            "accuracy_shifted": cand.accuracy_shifted, "agreement": cand.agreement, **_performance(cand)}),
        teacher_metrics=TeacherMeasurements(**{
            "split": CONFIRMATION_SPLIT, **conf.teacher.model_dump(exclude_unset=True),
            "accuracy_shifted": report.teacher.accuracy_shifted, **_performance(report.teacher)}),
        selection_metrics=CandidateMeasurements.model_validate(
            cand.model_dump(exclude_unset=True, exclude={"files", "content_hash"})),
    )


def _performance(measured) -> dict:
    """The PERFORMANCE_KEYS figures of a measurement, as set (a figure absent
    from an older document stays absent)."""
    return {k: getattr(measured, k) for k in PERFORMANCE_KEYS if k in measured.model_fields_set}


def gate_teacher(selection: GatesReport, report: GateReport | None) -> GatesReport:
    """``selection`` with a retrained teacher's gates (``gates.teacher_gates``;
    None: the teacher is not a retrain's, ``selection`` as it is) recorded as
    ``teacher_gates``. A failed teacher gate deploys nothing, whichever
    candidates passed: every candidate is built from that teacher. The reason
    says which teacher gate failed and by how much."""
    if report is None:
        return selection
    update = {"teacher_gates": CandidateGates.from_report(report)}
    if not report.passed:
        update |= {"selected": None,
                   "reason": "no candidate deployed: the retrained teacher failed "
                             + "; ".join(r.describe() for r in report.failures)
                             + f" (candidates: {selection.reason})"}
    return selection.model_copy(update=update)


def heldout_accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float | None:
    """Accuracy on the held-out production labels (None: none held out)."""
    if not len(labels):
        return None
    return round(sum(int(y) == int(p) for y, p in zip(labels, predictions)) / len(labels), 6)


def retrain_production(record, teacher_hash: str, val_md5: str,
                       test_md5: str | None = None) -> tuple[RecordedProduction | None, str | None]:
    """For the candidates of a retrained teacher (the teacher whose files
    hash to ``teacher_hash`` is not the one ``record``, a RetrainRecord,
    measured before the retrain), the production model the retrain replaced,
    with its recorded val accuracy to gate them against
    (max_accuracy_drop_vs_production), when it was measured on the val split
    whose md5 is ``val_md5`` (today's): (the RecordedProduction, None). Its
    test accuracy is kept only when ``test_md5`` (today's test split) is the
    one it was measured on; else it is None, and the note says so.
    Otherwise (None, why not, or None when the teacher was not retrained).

    The record is bound to the retrained teacher, not to the version in
    production now: every validate of that teacher's candidates (the
    retrain's own, a later plain run) holds them to the production the
    retrain replaced, so a chain of runs cannot each lose a point against
    the one before. A re-compression measures production beside its
    candidates instead (its baseline wins)."""
    prev, prod = record.previous_teacher, record.production
    if prev is None or prev.content_hash == teacher_hash:
        return None, None
    if prod is None:
        return None, ("nothing was in production when the retrain started, or its manifest lacks its val "
                      "accuracy: max_accuracy_drop_vs_production is not applied")
    if prod.val_md5 != val_md5:
        return None, (f"production {prod.version}'s val accuracy was measured on another val split (md5 "
                      f"{prod.val_md5}, today's {val_md5}): max_accuracy_drop_vs_production is not applied")
    if prod.test_accuracy is None:
        return prod, (f"production {prod.version}'s manifest records no test accuracy: the choice is not "
                      "confirmed against it on test")
    if prod.test_md5 != test_md5:
        return prod.model_copy(update={"test_accuracy": None, "test_md5": None}), (
            f"production {prod.version}'s test accuracy was measured on another test split (md5 {prod.test_md5}, "
            f"today's {test_md5}): the choice is not confirmed against it on test")
    return prod, None


def is_retrained(record, teacher_hash: str) -> bool:
    """Whether the teacher whose files hash to ``teacher_hash`` is a retrain's:
    ``record`` (a RetrainRecord) measured another teacher before a retrain.
    False with no retrain recorded, or when the teacher is still the old one
    (a rejected retrain was undone; a re-compression after a retrain that
    did not change it)."""
    prev = record.previous_teacher
    return prev is not None and prev.content_hash != teacher_hash


def retrained_teacher_gates(record, teacher_hash: str, val_accuracy: float, heldout_labels: Sequence[int],
                            heldout_predictions: Sequence[int], gates):
    """The teacher gates (shrinkflow.gates.teacher_gates) when the teacher
    whose files hash to ``teacher_hash`` is not the one ``record`` (a
    RetrainRecord) measured before the retrain, else None: no retrain
    recorded, or the teacher is still the old one (a re-compression after a
    retrain that did not change it is not re-gated)."""
    if not is_retrained(record, teacher_hash):
        return None
    return teacher_gates(record.previous_teacher, val_accuracy,
                         heldout_accuracy(heldout_labels, heldout_predictions), gates)

