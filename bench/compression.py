"""Benchmark compressed candidates against the issue's targets.

Copies this project's workspace (code, DVC cache and outputs, so the kept
teacher is reused, not retrained) to bench/work/compression, runs
`shrinkflow run --params ...` there, and writes bench/results/compression.{md,json}.
Every model in the table was measured by the same validate stage, timed in
interleaved rounds, in one run.

    .venv/bin/python bench/compression.py             # the default params.yaml, plus the teacher in ORT fp32
    .venv/bin/python bench/compression.py --sweep     # params/sweep.yaml -> compression_sweep.{md,json}

The default mode adds one candidate to params.yaml's, `fp32-ort` (an empty
recipe: the teacher exported to ONNX Runtime fp32, the strongest uncompressed
baseline), so the deployed model's speedup over it is measured in the same
run; the others come from the per-candidate build cache, copied along.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "compression"
RESULTS = ROOT / "bench" / "results"
SKIP = {".venv", "registry", ".prefect", ".dvc-remote", ".git", ".shrinkflow", "work", "__pycache__",
        ".pytest_cache"}


def copy_workspace() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    shutil.copytree(ROOT, WORK, ignore=lambda d, names: [n for n in names if n in SKIP])
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=WORK, check=True)
    subprocess.run(git + ["add", "-A"], cwd=WORK, check=True)
    subprocess.run(git + ["commit", "-qm", "bench copy"], cwd=WORK, check=True)


def defaults_with_ort_baseline() -> str:
    """params.yaml with the fp32 ONNX Runtime teacher as one more candidate."""
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["compress"]["candidates"].insert(0, {"name": "fp32-ort", "recipe": []})
    out = WORK / "params" / "bench-defaults.yaml"
    out.write_text(yaml.safe_dump(params, sort_keys=False))
    return str(out.relative_to(WORK))


def main() -> None:
    sweep = "--sweep" in sys.argv[1:]
    copy_workspace()
    cache = ROOT / ".shrinkflow" / "cache" / "candidates"
    if cache.is_dir():  # the default candidates are not rebuilt: their keys match
        shutil.copytree(cache, WORK / ".shrinkflow" / "cache" / "candidates")
    params_file = "params/sweep.yaml" if sweep else defaults_with_ort_baseline()
    stem = "compression_sweep" if sweep else "compression"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--params", params_file],
                          cwd=WORK, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (WORK / "run.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode not in (0, 1):
        sys.exit(f"sweep failed (exit {proc.returncode}); see {WORK / 'run.log'}\n{proc.stderr[-3000:]}")
    v = json.loads((WORK / "metrics/validate.json").read_text())
    gates = json.loads((WORK / "reports/gates.json").read_text())
    comp = json.loads((WORK / "metrics/compress.json").read_text())["candidates"]
    t, cands = v["teacher"], v["candidates"]
    ort = cands.get("fp32-ort")
    rows = ["| model | acc | acc drop (pts) | shifted acc | p50 b1 ms | p95 b1 ms | b32 ex/s | MB | RSS MB "
            "| smaller | faster p95 b1 (pooled) | faster p95 b1 (round ratio) | faster than ORT fp32 (pooled) | gates |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def row(name, m, gate_text):
        drop = 100 * (t["accuracy"] - m["accuracy"])  # val: every candidate is compared on val only
        vs_ort = f"{ort['latency_ms_p95_b1'] / m['latency_ms_p95_b1']:.2f}x" if ort else "n/a"
        rounds = f"{m['speedup_p95_b1']:.2f}x" if "speedup_p95_b1" in m else "1x"  # the teacher itself
        return (f"| {name} | {m['accuracy']:.4f} | {drop:+.2f} | {m['accuracy_shifted']:.4f} | "
                f"{m['latency_ms_p50_b1']:.2f} | {m['latency_ms_p95_b1']:.2f} | {m['throughput_eps_b32']:.0f} | "
                f"{m['size_mb']:.1f} | {m['peak_rss_mb']:.0f} | {t['size_mb'] / m['size_mb']:.2f}x | "
                f"{t['latency_ms_p95_b1'] / m['latency_ms_p95_b1']:.2f}x | "
                f"{rounds} | {vs_ort} | {gate_text} |")

    rows.append(row("teacher fp32, torch eager", t, "baseline"))
    for name, m in cands.items():
        rep = gates["candidates"][name]
        failed = [g for g in rep["gates"].values() if not g["passed"]]
        gate_text = "pass" if not failed else ", ".join(f"{g['name']} ({g['margin']:+.3g})" for g in failed)
        rows.append(row(name, m, gate_text))
    chosen = gates["selected"]
    lines = [f"# Compressed candidates ({'params/sweep.yaml' if sweep else 'default params.yaml + fp32-ort'})", "",
             f"Measured {datetime.now(timezone.utc).isoformat(timespec='seconds')} on this project's 2-core "
             f"CPU machine ({__import__('shrinkflow.lineage', fromlist=['x']).cpu_model()}), 2 threads. "
             f"Accuracy is on the val split (n={t['n']}), where candidates are gated and selected; only the "
             "selected one is scored on test (below). Shifted domain = product reviews. "
             f"Run wall time {wall:.0f}s (teacher reused through DVC).", "",
             *rows, "",
             f"Selected and deployed: **{chosen}** ({gates['reason']}).", "",
             "Build time per candidate (s, CPU-s): " + ", ".join(
                 f"{n} {r['build_seconds']:.0f} ({r.get('build_cpu_seconds') or 0:.0f})" for n, r in comp.items()), ""]
    if chosen:
        m = cands[chosen]
        conf = v["confirmation"]
        lines += [f"Test confirmation of {chosen} (n={conf['metrics']['n']}): accuracy "
                  f"{conf['metrics']['accuracy']:.4f} vs teacher {conf['teacher']['accuracy']:.4f}, drop "
                  f"{100 * conf['metrics']['accuracy_drop']:+.2f} points, {conf['metrics']['confidence']:.0%} interval "
                  f"[{100 * conf['metrics']['accuracy_drop_ci_low']:+.2f}, "
                  f"{100 * conf['metrics']['accuracy_drop_ci_high']:+.2f}].", ""]
        checks = [("accuracy drop <= 1.0 point (test)", 100 * conf["metrics"]["accuracy_drop"] <= 1.0),
                  (">= 8x smaller on disk", t["size_mb"] / m["size_mb"] >= 8),
                  (">= 8x lower p95 b1 latency than the torch teacher", t["latency_ms_p95_b1"] / m["latency_ms_p95_b1"] >= 8),
                  (">= 2.5x lower p95 b1 latency than the teacher in ONNX Runtime fp32 (fusions: see fusion.md)",
                   bool(ort) and ort["latency_ms_p95_b1"] / m["latency_ms_p95_b1"] >= 2.5)]
        lines += ["## Targets for the deployed candidate", ""] + [f"- {'MET' if ok else 'MISSED'}: {what}"
                                                                  for what, ok in checks]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stem}.json").write_text(json.dumps({"wall_s": wall, "validate": v, "gates": gates,
                                                           "compress": comp}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
