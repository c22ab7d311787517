"""Human-readable reports (markdown) built from metrics and gate reports.

Each report says what actually happened at the point it is written: the
validate stage knows what was selected, not whether it was deployed, so
``validation_markdown`` never claims a deployment; the lifecycle artifact,
written after deploy, does.
"""

from __future__ import annotations

from shrinkflow.gates import GateReport

METRIC_ROWS = [
    ("accuracy", "accuracy (val)", "{:.4f}"), ("f1", "F1 (val)", "{:.4f}"),
    ("accuracy_drop", "accuracy drop vs teacher (val, paired)", "{:+.4f}"),
    ("accuracy_shifted", "accuracy, shifted domain", "{:.4f}"),
    ("latency_ms_p50_b1", "latency p50 b1 (ms)", "{:.2f}"),
    ("latency_ms_p95_b1", "latency p95 b1 (ms)", "{:.2f}"),
    ("latency_ms_p50_b32", "latency p50 b32 (ms)", "{:.1f}"),
    ("latency_ms_p95_b32", "latency p95 b32 (ms)", "{:.1f}"),
    ("throughput_eps_b32", "throughput b32 (ex/s)", "{:.0f}"),
    ("size_mb", "size on disk (MB)", "{:.1f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
    ("cpu_ms_per_prediction_b1", "CPU ms per prediction, b1", "{:.2f}"),
    ("cpu_ms_per_prediction_b32", "CPU ms per prediction, b32", "{:.2f}"),
]


def metrics_table(teacher: dict, candidates: dict[str, dict]) -> str:
    names = list(candidates)
    head = "| metric | teacher (fp32, torch) | " + " | ".join(names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for key, label, fmt in METRIC_ROWS:
        def cell(m):
            return "n/a" if m.get(key) is None else fmt.format(m[key])

        cells = [cell(teacher)] + [cell(candidates[n]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ci = [f"[{m['accuracy_drop_ci_low']:+.4f}, {m['accuracy_drop_ci_high']:+.4f}] (McNemar p={m['mcnemar_p']:.3g})"
          for m in candidates.values()]
    conf = next(iter(candidates.values()), {}).get("confidence", 0.95)
    lines.append(f"| drop {conf:.0%} interval (val) | — | " + " | ".join(ci) + " |")
    splits = sorted({s for m in candidates.values() for s in m.get("agreement", {})})
    for s in splits:
        vals = [candidates[n]["agreement"].get(s) for n in names]
        lines.append(f"| teacher agreement, {s} | 1 | "
                     + " | ".join("n/a (no texts)" if v is None else f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


def gates_table(reports: dict[str, GateReport]) -> str:
    lines = ["| candidate | gate | value | threshold | margin | result |", "|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        for r in rep.results:
            rel = ">=" if r.direction == "min" else "<="
            result = "pass" if r.passed else ("**FAIL**" if r.enforced else "not met (does not block)")
            lines.append(f"| {name} | {r.name} | {r.value:.4g} | {rel} {r.threshold:.4g} | "
                         f"{r.margin:+.4g} | {result}{': ' + r.note if r.note else ''} |")
    return "\n".join(lines)


def confirmation_section(conf: dict | None) -> list[str]:
    if conf is None:
        return ["## Confirmation on test", "", "No candidate passed every gate on val, so none was scored on test."]
    m, t = conf["metrics"], conf["teacher"]
    rep = GateReport.from_dict(conf["gates"])
    state = ("confirmed" if conf["passed"] else
             ("**NOT confirmed**: not deployed" if conf["enforced"] else "**NOT confirmed** (reported only)"))
    return ["## Confirmation on test", "",
            f"Only the chosen candidate, {conf['candidate']!r}, is scored on the test split ({m['n']} sentences): "
            f"{state}.", "",
            "| | teacher | candidate |", "|---|---|---|",
            f"| accuracy | {t['accuracy']:.4f} | {m['accuracy']:.4f} |",
            f"| F1 | {t['f1']:.4f} | {m['f1']:.4f} |",
            f"| accuracy drop (paired) | | {m['accuracy_drop']:+.4f}, {m['confidence']:.0%} interval "
            f"[{m['accuracy_drop_ci_low']:+.4f}, {m['accuracy_drop_ci_high']:+.4f}], McNemar p={m['mcnemar_p']:.3g} |",
            f"| teacher agreement | | {m['agreement']:.4f} |", "", gates_table({conf["candidate"]: rep})]


def outcome_line(gates: dict, deployed: str | None = None, deploy_ran: bool = False) -> str:
    if gates["selected"] is None:
        return f"**Nothing deployed**: {gates['reason']}"
    if deployed:
        return f"**Deployed {gates['selected']!r} as {deployed}.**"
    if deploy_ran:
        return f"**Selected {gates['selected']!r}, but the registry does not serve it.**"
    return (f"**Selected {gates['selected']!r} for deployment** (passed every gate on val and its test "
            "confirmation); the deploy stage promotes it: see `shrinkflow status`.")


def validation_markdown(metrics: dict, gates: dict, deployed: str | None = None, deploy_ran: bool = False) -> str:
    reports = {n: GateReport.from_dict(d) for n, d in gates["candidates"].items()}
    return "\n\n".join([
        "# shrinkflow lifecycle", outcome_line(gates, deployed, deploy_ran), f"Selection: {gates['reason']}",
        f"## Metrics on {metrics['selection_split']} (gating and selection)", metrics_table(
            metrics["teacher"], metrics["candidates"]),
        "## Gates (val)", gates_table(reports), "\n".join(confirmation_section(metrics["confirmation"]))]) + "\n"


def roi_markdown(roi: dict | None) -> str:
    """The deployed version's cost and return (shrinkflow.cost.roi)."""
    if not roi:
        return ""
    from shrinkflow.cost import roi_lines

    rows = ["| batch | CPU ms / prediction (teacher → deployed) | USD / million (teacher → deployed) | "
            "kWh / million (teacher → deployed) | break-even |", "|---|---|---|---|---|"]
    for b, s in roi["serving"].items():
        kwh = (f"{s['teacher_energy_kwh_per_million']:.3g} → {s['deployed_energy_kwh_per_million']:.3g}"
               if s["teacher_energy_kwh_per_million"] is not None else "n/a")
        be = (f"{s['break_even_predictions']:,} predictions" if s["pays_back"] else "never pays back")
        rows.append(f"| {b} | {s['teacher_cpu_ms_per_prediction']:.3g} → {s['deployed_cpu_ms_per_prediction']:.3g} | "
                    f"{s['teacher_cost_per_million']:.4g} → {s['deployed_cost_per_million']:.4g} | {kwh} | {be} |")
    notes = [f"- {line}" for line in roi_lines(roi)[:1]]
    if roi.get("energy_source"):
        notes.append(f"- energy and CO2: {roi['energy_source']}")
    if roi.get("build_cpu_unknown"):
        notes.append(f"- builds with no CPU record (cached before metering): {', '.join(roi['build_cpu_unknown'])}")
    return "\n".join(["## Cost and return of compressing", "", *notes, "", *rows]) + "\n"
