"""Human-readable reports (markdown) built from metrics and gate reports."""

from __future__ import annotations

from shrinkflow.gates import GateReport

METRIC_ROWS = [
    ("accuracy", "accuracy", "{:.4f}"), ("f1", "F1", "{:.4f}"),
    ("accuracy_shifted", "accuracy, shifted domain", "{:.4f}"),
    ("latency_ms_p50_b1", "latency p50 b1 (ms)", "{:.2f}"),
    ("latency_ms_p95_b1", "latency p95 b1 (ms)", "{:.2f}"),
    ("latency_ms_p50_b32", "latency p50 b32 (ms)", "{:.1f}"),
    ("latency_ms_p95_b32", "latency p95 b32 (ms)", "{:.1f}"),
    ("throughput_eps_b32", "throughput b32 (ex/s)", "{:.0f}"),
    ("size_mb", "size on disk (MB)", "{:.1f}"), ("peak_rss_mb", "peak RSS (MB)", "{:.0f}"),
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
    return "\n".join(lines)


def gates_table(reports: dict[str, GateReport]) -> str:
    lines = ["| candidate | gate | value | threshold | margin | result |", "|---|---|---|---|---|---|"]
    for name, rep in reports.items():
        for r in rep.results:
            rel = ">=" if r.direction == "min" else "<="
            lines.append(f"| {name} | {r.name} | {r.value:.4g} | {rel} {r.threshold:.4g} | "
                         f"{r.margin:+.4g} | {'pass' if r.passed else '**FAIL**'} |")
    return "\n".join(lines)


def lifecycle_markdown(teacher: dict, candidates: dict[str, dict], reports: dict[str, GateReport],
                       selection_reason: str, deployed: str | None) -> str:
    verdict = (f"**Deployed {deployed}.**" if deployed
               else "**Nothing deployed**: no candidate passed every gate.")
    return "\n\n".join([
        "# shrinkflow lifecycle", verdict, f"Selection: {selection_reason}",
        "## Metrics (test split)", metrics_table(teacher, candidates),
        "## Gates", gates_table(reports)]) + "\n"
