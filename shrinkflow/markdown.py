"""Human-readable reports (markdown) built from metrics and gate reports.

Each report says what actually happened at the point it is written: the
validate stage knows what was selected, not whether it was deployed, so
``validation_markdown`` never claims a deployment; the lifecycle artifact,
written after deploy, does.

Every function renders the typed documents (``shrinkflow.artifacts``) and
reads a figure by its field name.
"""

from __future__ import annotations

from collections.abc import Sequence

from shrinkflow.artifacts import (PRODUCTION_CANDIDATE, CandidateMeasurements, Confirmation, CostReturn, GateReport,
                                  GatesReport, Quality, TeacherMeasurements, ValidationReport)
from shrinkflow.config import LATENCY_P95_B1

# One row per figure of the metrics table: (field name, row label, format).
METRIC_ROWS = [
    ("accuracy", "accuracy (val)", "{:.4f}"), ("macro_f1", "macro-F1 (val)", "{:.4f}"),
    ("f1", "F1 of class 1 (val)", "{:.4f}"),
    ("accuracy_drop", "accuracy drop vs teacher (val, paired)", "{:+.4f}"),
    ("macro_f1_drop", "macro-F1 drop vs teacher (val, paired)", "{:+.4f}"),
    ("accuracy_shifted", "accuracy, shifted domain", "{:.4f}"),
    ("latency_ms_p50_b1", "latency p50 b1 (ms)", "{:.2f}"),
    (LATENCY_P95_B1, "latency p95 b1 (ms)", "{:.2f}"),
    ("latency_ms_p50_b32", "latency p50 b32 (ms)", "{:.1f}"),
    ("latency_ms_p95_b32", "latency p95 b32 (ms)", "{:.1f}"),
    ("throughput_eps_b32", "throughput b32 (ex/s)", "{:.0f}"),
    ("size_mb", "size on disk (MB)", "{:.1f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ("cpu_ms_per_prediction_b1", "CPU ms per prediction, b1", "{:.2f}"),
    ("cpu_ms_per_prediction_b32", "CPU ms per prediction, b32", "{:.2f}"),
]


def _row_label(key: str, label: str, labels: list[str] | None) -> str:
    """The F1 row names its class (the built-in task: "positive")."""
    if key == "f1" and labels and len(labels) == 2:
        return f"F1 of {labels[1]!r} (val)"
    return label


def metrics_table(teacher: TeacherMeasurements, candidates: dict[str, CandidateMeasurements],
                  labels: Sequence[str] | None = None) -> str:
    """Every val figure of the teacher and each candidate, one row per figure
    (a figure a model does not have reads n/a). The class-1 F1 row appears
    only for two classes (where it is computed)."""
    names = list(candidates)
    head = "| metric | teacher (fp32, torch) | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    everyone = [teacher, *candidates.values()]
    for key, label, fmt in METRIC_ROWS:
        if key == "f1" and all(m.f1 is None for m in everyone):
            continue  # more than two classes: no single "positive" class

        def cell(m):
            value = getattr(m, key, None)  # the teacher has no drop
            return "n/a" if value is None else fmt.format(value)

        cells = [cell(teacher)] + [cell(candidates[n]) for n in names]
        lines.append(f"| {_row_label(key, label, labels)} | " + " | ".join(cells) + " |")
    ci = [f"[{m.accuracy_drop_ci_low:+.4f}, {m.accuracy_drop_ci_high:+.4f}] (McNemar p={m.mcnemar_p:.3g})"
          for m in candidates.values()]
    conf = next(iter(candidates.values())).confidence if candidates else 0.95
    lines.append(f"| accuracy drop {conf:.0%} interval (val) | — | " + " | ".join(ci) + " |")
    if all(m.macro_f1_drop_ci_low is not None for m in candidates.values()):
        lines.append(f"| macro-F1 drop {conf:.0%} interval (val, bootstrap) | — | " + " | ".join(
            f"[{m.macro_f1_drop_ci_low:+.4f}, {m.macro_f1_drop_ci_high:+.4f}]" for m in candidates.values())
            + " |")
    splits = sorted({s for m in candidates.values() for s in m.agreement})
    for s in splits:
        vals = [candidates[n].agreement.get(s) for n in names]
        # the teacher agrees with itself, on a split that has texts
        teacher = "n/a (no texts)" if all(v is None for v in vals) else "1"
        lines.append(f"| teacher agreement, {s} | {teacher} | "
                     + " | ".join("n/a (no texts)" if v is None else f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


def gates_table(reports: dict[str, GateReport]) -> str:
    """Every gate of every candidate: value, threshold, margin and verdict."""
    lines = ["| candidate | gate | value | threshold | margin | result |", "|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        for r in rep.results:
            rel = ">=" if r.direction == "min" else "<="
            result = "pass" if r.passed else ("**FAIL**" if r.enforced else "not met (does not block)")
            lines.append(f"| {name} | {r.name} | {r.value:.4g} | {rel} {r.threshold:.4g} | "
                         f"{r.margin:+.4g} | {result}{': ' + r.note if r.note else ''} |")
    return "\n".join(lines)


def _fmt(v, fmt: str = "{:.4f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def per_class_recall_table(rows: list[tuple[str, Quality]]) -> list[str]:
    """Per-class recall, one row per class, one column per (heading, figures)
    pair; each figures object has ``per_class_recall`` and ``per_class_n``
    (a ``Quality``). The class's number of labelled texts is given per split."""
    classes = list(rows[0][1].per_class_recall)
    head = "| class | " + " | ".join(h for h, _ in rows) + " |"
    lines = [head, "|---" * (len(rows) + 1) + "|"]
    for c in classes:
        lines.append(f"| {c} | " + " | ".join(
            f"{_fmt(m.per_class_recall.get(c))} (n={m.per_class_n.get(c, 0)})" for _, m in rows) + " |")
    return lines


def confirmation_section(conf: Confirmation | None, labels: Sequence[str] | None = None) -> list[str]:
    """The chosen candidate against the teacher on test, and its gates there.
    ``labels``: the class names in id order; with two, the F1 row names its
    class as the val table does."""
    if conf is None:
        return ["## Confirmation on test", "", "No candidate passed every gate on val, so none was scored on test."]
    m, t = conf.metrics, conf.teacher
    state = ("confirmed" if conf.passed else
             ("**NOT confirmed**: not deployed" if conf.enforced else "**NOT confirmed** (reported only)"))
    f1_name = _row_label("f1", "F1 of class 1 (val)", list(labels) if labels else None).replace(" (val)", "")
    f1 = [f"| {f1_name} | {t.f1:.4f} | {m.f1:.4f} |"] if m.f1 is not None else []
    mf1 = [f"| macro-F1 | {t.macro_f1:.4f} | {m.macro_f1:.4f} |"] if m.macro_f1 is not None else []
    mf1_drop = ([f"| macro-F1 drop (paired) | | {m.macro_f1_drop:+.4f}, {m.confidence:.0%} bootstrap "
                 f"interval [{m.macro_f1_drop_ci_low:+.4f}, {m.macro_f1_drop_ci_high:+.4f}] |"]
                if m.macro_f1_drop is not None else [])
    return ["## Confirmation on test", "",
            f"Only the chosen candidate, {conf.candidate!r}, is scored on the test split ({m.n} texts): "
            f"{state}.", "",
            "| | teacher | candidate |", "|---|---|---|",
            f"| accuracy | {t.accuracy:.4f} | {m.accuracy:.4f} |", *mf1, *f1,
            f"| accuracy drop (paired) | | {m.accuracy_drop:+.4f}, {m.confidence:.0%} interval "
            f"[{m.accuracy_drop_ci_low:+.4f}, {m.accuracy_drop_ci_high:+.4f}], McNemar p={m.mcnemar_p:.3g} |",
            *mf1_drop, f"| teacher agreement | | {m.agreement:.4f} |", "",
            gates_table({conf.candidate: conf.gates.to_report()})]


def unconfirmed_section(selection: GatesReport, shown: Confirmation | None) -> list[str]:
    """The candidates chosen on val before the last choice whose test
    confirmation failed (``GatesReport.unconfirmed``; ``shown``, already in
    the confirmation section, is not repeated): their gates on test."""
    rest = [c for c in selection.unconfirmed or [] if shown is None or c.candidate != shown.candidate]
    if not rest:
        return []
    return ["## Set aside on test", "",
            "Chosen on val before the candidate above, in this order, and not confirmed on test: each was set "
            "aside and the next choice on val scored instead (a candidate is scored on test only when it is "
            "the one chosen).", "",
            gates_table({c.candidate: c.gates.to_report() for c in rest})]


def recall_section(report: ValidationReport, selection: GatesReport) -> list[str]:
    """Per-class recall of the chosen candidate (or, when none was chosen,
    the best effort) and of the teacher, on val and, once confirmed, test."""
    name = selection.selected or selection.best_effort
    cand = report.candidates.get(name) if name else None
    if not cand or cand.per_class_recall is None or report.teacher.per_class_recall is None:
        return []
    rows = [("teacher, val", report.teacher), (f"{name}, val", cand)]
    conf = report.confirmation
    if conf and conf.candidate == name and conf.metrics.per_class_recall is not None:
        rows += [("teacher, test", conf.teacher), (f"{name}, test", conf.metrics)]
    who = "the chosen candidate" if selection.selected else "the best-effort candidate (not deployed)"
    return [f"## Per-class recall: {who}, {name!r}", "",
            "The share of each class's texts the model labels correctly (n: that class's labelled texts); "
            "macro-F1 averages the classes alike, so a class given up shows here first.", "",
            *per_class_recall_table(rows)]


def outcome_line(selection: GatesReport, deployed: str | None = None, deploy_ran: bool = False,
                 kept: str | None = None) -> str:
    """What happened, in one bold line: nothing deployed (why), deployed as
    ``deployed``, production ``kept`` (a re-compression selected it), the
    production model selected (deploy keeps it), selected but not served
    although deploy ran, or selected."""
    if selection.selected is None:
        return (f"**Nothing deployed**: {selection.reason}"
                + (f" Production {selection.production} keeps serving." if selection.production else ""))
    if kept:
        return f"**Kept production {kept}**: it passed every gate and won the selection; nothing was promoted."
    if selection.production_selected:
        rebuilt = (f" (rebuilt as {selection.selected!r} with its very files)"
                   if selection.selected != PRODUCTION_CANDIDATE else "")
        return (f"**Production {selection.production} selected**{rebuilt}: it passed every gate and won the "
                "selection, so the deploy stage promotes nothing and it keeps serving.")
    if deployed:
        return f"**Deployed {selection.selected!r} as {deployed}.**"
    if deploy_ran:
        return f"**Selected {selection.selected!r}, but the registry does not serve it.**"
    return (f"**Selected {selection.selected!r} for deployment** (passed every gate on val and its test "
            "confirmation); the deploy stage promotes it: see `shrinkflow status`.")


def validation_markdown(report: ValidationReport, selection: GatesReport, deployed: str | None = None,
                        deploy_ran: bool = False, kept: str | None = None) -> str:
    """reports/gates.md (and the lifecycle's Prefect artifact, which knows
    whether deploy ran and the version it deployed, or ``kept``: the
    production version a re-compression kept): outcome, selection, the val
    metrics, every gate, the confirmation on test, per-class recall."""
    reports = {n: c.to_report() for n, c in selection.candidates.items()}
    return "\n\n".join([
        "# shrinkflow lifecycle", outcome_line(selection, deployed, deploy_ran, kept),
        *([f"Re-compression: production {selection.production} was measured as the candidate "
           + (f"{selection.production_as!r}, which has its very files (measured once)" if selection.production_as
              else "'production'") + "; "
           "a candidate passes the window gate at min_window_agreement or at min_window_agreement_gain over "
           "production's agreement on the same held-out texts, and is gated against production's p95 latency "
           "(max_p95_b1_slowdown_vs_production: the two timed in the same rounds, the ratio round by round) "
           "and val accuracy (max_accuracy_drop_vs_production)."]
          if selection.production else []),
        *([f"Retrain: production {selection.production_baseline} was measured beside the candidates as a "
           "baseline, not a candidate: a candidate passes the window gate at min_window_agreement or at "
           "min_window_agreement_gain over production's agreement with the retrained teacher on the same held-out "
           "texts. Not gated against production's latency: the teacher changed."]
          if selection.production_baseline else []),
        f"Selection: {selection.reason}", *timing_lines(report.teacher),
        *([f"Classes ({len(report.labels)}): " + ", ".join(report.labels)] if report.labels else []),
        f"## Metrics on {report.selection_split} (gating and selection)", metrics_table(
            report.teacher, report.candidates, report.labels),
        "## Gates (val)", gates_table(reports), *teacher_gates_section(selection),
        "\n".join(confirmation_section(report.confirmation, report.labels)),
        *(["\n".join(aside)] if (aside := unconfirmed_section(selection, report.confirmation)) else []),
        *(["\n".join(recall)] if (recall := recall_section(report, selection)) else [])]) + "\n"


def timing_lines(teacher) -> list[str]:
    """One line on how the models' timing went, when it is worth saying:
    timed more than once (the first timing was disturbed:
    ``retimes_when_busy``), or
    the timing kept was disturbed (``cpuload.is_disturbed``: others took
    more than ``cpuload.BUSY_CORES`` cores, a cgroup CPU quota throttled
    the models, or their threads waited for a CPU more than
    ``cpuload.CPU_WAIT_SHARE`` of the time). ``teacher``: the teacher's
    measurements (timed with every candidate, so its figures are the
    timing's). [] otherwise."""
    from shrinkflow.cpuload import is_disturbed

    attempts, other = teacher.timing_attempts or 1, teacher.timing_other_cores
    throttled, wait = teacher.timing_throttled_share, teacher.timing_cpu_wait_share
    disturbed = is_disturbed(other, throttled, wait)
    if attempts <= 1 and not disturbed:
        return []
    head = (f"the first timing was disturbed, so the models were timed {attempts} times and the least disturbed "
            "timing counts" if attempts > 1 else "the models were timed once")
    load = "" if other is None else f"; other processes took {other:.2f} cores on average during it"
    if throttled:
        quota = "" if teacher.timing_cpu_quota is None else f" ({teacher.timing_cpu_quota:g} cores)"
        load += f"; the cgroup's CPU quota{quota} throttled {throttled:.1%} of its periods"
    if wait is not None and is_disturbed(None, None, wait):
        load += f"; the timed threads waited for a CPU {wait:.1%} of the time"
    tail = ": the latency figures may be off (`shrinkflow run --revalidate` times them again)" if disturbed else ""
    return [f"Timing: {head}{load}{tail}."]


def roi_markdown(roi: CostReturn | None) -> str:
    """The deployed version's cost and return (shrinkflow.cost.roi): serving
    cost by batch size, break-even, and what compute was spent; "" without one."""
    if roi is None:
        return ""
    from shrinkflow.cost import roi_lines

    rows = ["| batch | CPU ms / prediction (teacher → deployed) | USD / million (teacher → deployed) | "
            "kWh / million (teacher → deployed) | break-even |", "|---|---|---|---|---|"]
    for b, s in roi.serving.items():
        kwh = (f"{s.teacher_energy_kwh_per_million:.3g} → {s.deployed_energy_kwh_per_million:.3g}"
               if s.teacher_energy_kwh_per_million is not None else "n/a")
        be = (f"{s.break_even_predictions:,} predictions" if s.pays_back else "never pays back")
        rows.append(f"| {b} | {s.teacher_cpu_ms_per_prediction:.3g} → {s.deployed_cpu_ms_per_prediction:.3g} | "
                    f"{s.teacher_cost_per_million:.4g} → {s.deployed_cost_per_million:.4g} | {kwh} | {be} |")
    notes = [f"- {line}" for line in roi_lines(roi.to_json_dict())[:1]]
    if roi.energy_source:
        notes.append(f"- energy and CO2: {roi.energy_source}")
    if roi.build_cpu_unknown:
        notes.append(f"- builds with no CPU record (cached before metering): {', '.join(roi.build_cpu_unknown)}")
    return "\n".join(["## Cost and return of compressing", "", *notes, "", *rows]) + "\n"


def teacher_gates_section(selection: GatesReport) -> list[str]:
    """A retrained teacher's gates against the teacher it replaced (none: no section)."""
    tg = selection.teacher_gates
    if tg is None:
        return []
    return ["## Retrained teacher (against the teacher it replaces)",
            "\n".join(f"- {r.describe()}" for r in tg.gates.values())
            + ("" if tg.passed else "\n\n**A failed teacher gate deploys nothing.**")]
