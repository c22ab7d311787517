"""How far does a candidate's measured slowdown against production move
between runs, and which way of computing it holds still?

The re-compression's ``max_p95_b1_slowdown_vs_production`` gate (10% by
default) refused, at 20:45 on 2026-12-04, the same re-distilled student it
had passed at 17:21 (0.132 against 1.00x): same architecture, same int8
graph as production, so its true slowdown is near 0. This script times, in
one ``measure_interleaved`` call per repeat (what validate does on a
re-compression: the teacher, production and the candidates alive together,
timed in alternating rounds), the monitoring benchmark's models:

- ``teacher``: the kept fp32 teacher (torch), the speedups' reference;
- ``production``: the production student before the re-compression (v0001,
  int8);
- ``production-copy``: a byte-for-byte copy of it (the null case: any
  slowdown measured is noise);
- ``redistilled``: the re-compression's re-distilled student (same
  architecture);
- ``int8-teacher``: the retrain's deployed int8 teacher (v0002 at 20:45,
  v0003 once the re-compression deploys), about twice as slow (the case the
  gate exists for).

For each candidate and repeat it computes the slowdown against production
three ways:

- ``via_teacher``: production's round-by-round speedup over the teacher
  divided by the candidate's, minus 1 (the gate before this benchmark);
- ``direct``: candidate p95 / production p95 within each round, the median
  over rounds, minus 1 (``shrinkflow.stats.round_ratio_p95`` on the two);
- ``pooled``: the p95s of all calls pooled, candidate over production, minus 1.

``--busy N``: N other processes spin a core each while it measures (a
shared server; the machine-load warning of validate fires), results in
bench/results/slowdown_spread_busy.{md,json} (N = 1) or
slowdown_spread_busyN.{md,json}; otherwise
bench/results/slowdown_spread.{md,json}. Needs bench/monitoring.py's work
folder (bench/work/monitoring).

    PYTHONPATH=bench:. .venv/bin/python bench/slowdown_spread.py [--repeats 10] [--busy 1]
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import statistics
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from _common import RESULTS, ROOT, stamp

WORK = ROOT / "bench" / "work" / "monitoring"
GATE = 0.10
CANDIDATES = ("production-copy", "redistilled", "int8-teacher")
METHODS = ("via_teacher", "direct", "pooled")


def _spin() -> None:
    while True:
        pass


def slowdowns(run: dict, name: str) -> dict[str, float]:
    """The candidate ``name``'s slowdown against production in one measured
    run (``measure_interleaved``'s result), three ways (fractions)."""
    from shrinkflow.stats import round_ratio_p95

    t, p, c = run["teacher"], run["production"], run[name]
    via = round_ratio_p95(t["rounds_b1"], p["rounds_b1"]) / round_ratio_p95(t["rounds_b1"], c["rounds_b1"]) - 1
    direct = round_ratio_p95(c["rounds_b1"], p["rounds_b1"]) - 1
    pooled = c["performance"]["latency_ms_p95_b1"] / p["performance"]["latency_ms_p95_b1"] - 1
    return {"via_teacher": round(via, 4), "direct": round(direct, 4), "pooled": round(pooled, 4)}


@contextmanager
def validate_models():
    """The monitoring benchmark's models as validate times them on a
    re-compression, for the length of the block: yields (latency params,
    val texts, production's version, the retrain's version, {name: model
    folder}), the copy of production in a temporary folder. Exits when the
    monitoring run's retrain did not deploy the int8 teacher."""
    from shrinkflow.config import load_params
    from shrinkflow.splits import read_parquet

    project = WORK / "project"
    lat = load_params(project / "params.yaml").validate_.latency
    texts = read_parquet(project / "data" / "prepared" / "val.parquet")["text"].tolist()
    versions = project / "registry" / "versions"
    # the versions as the benchmark's run recorded them: production before the re-compression, and what the
    # retrain deployed (the retrained teacher's int8, in every run so far; checked below)
    run_doc = json.loads((RESULTS / "monitoring.json").read_text())
    first, retrained = run_doc["recompress"]["deployed_before"], run_doc["retrain"]["deployed_after"]
    if run_doc["retrain"]["gates"].get("selected") != "int8":
        sys.exit(f"the monitoring run's retrain deployed {run_doc['retrain']['gates'].get('selected')!r}, "
                 "not the int8 teacher this benchmark needs")
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "production-copy"
        shutil.copytree(versions / first / "model", copy)
        # in validate's order (stages/validate.py: the teacher, the candidates as compress.candidates lists
        # them, production last; interleaved_plan rotates each round but keeps every model's neighbours), the
        # copy among the candidates
        yield lat, texts, first, retrained, {
            "teacher": WORK / "teacher_before", "int8-teacher": versions / retrained / "model",
            "production-copy": copy, "redistilled": WORK / "redistilled", "production": versions / first / "model"}


def main() -> None:
    from shrinkflow.evaluate import measure_interleaved

    repeats = int(sys.argv[sys.argv.index("--repeats") + 1]) if "--repeats" in sys.argv else 10
    busy = int(sys.argv[sys.argv.index("--busy") + 1]) if "--busy" in sys.argv else 0
    out = "slowdown_spread" + ("_busy" if busy else "") + (str(busy) if busy > 1 else "")
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
    for p in spinners:
        p.start()
    with validate_models() as (lat, texts, first, retrained, models):
        runs = []
        for i in range(repeats):
            run = measure_interleaved(models, {}, texts, lat, log=lambda m: None)
            rec = {n: slowdowns(run, n) for n in CANDIDATES}
            rec["latency_ms_p95_b1"] = {n: r["performance"]["latency_ms_p95_b1"] for n, r in run.items()}
            runs.append(rec)
            print(f"repeat {i + 1}: " + "; ".join(f"{n} " + " ".join(f"{m} {rec[n][m]:+.3f}" for m in METHODS)
                                                  for n in CANDIDATES), flush=True)
    for p in spinners:
        p.terminate()
    summary = {n: {m: _summary([r[n][m] for r in runs]) for m in METHODS} for n in CANDIDATES}
    doc = {**stamp(), "models": {k: str(Path(v).relative_to(ROOT)) if str(v).startswith(str(ROOT)) else k
                                 for k, v in models.items()},
           "latency": lat.model_dump(), "repeats": repeats, "busy_processes": busy, "gate": GATE, "runs": runs,
           "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Slowdown against production: the same models, measured repeatedly", "",
             f"Measured {doc['measured_at']} ({doc['machine']}, {lat.threads} threads). Each repeat is one "
             f"`measure_interleaved` call with the five models alive, in validate's order (the teacher, the "
             f"candidates, production last; what validate does on a re-compression): "
             f"{lat.iters_b1} batch-1 calls per model after {lat.warmup_iters} warm-up calls, in {lat.rounds} "
             f"alternating rounds. Models from `bench/work/monitoring` (`bench/monitoring.py`): the kept fp32 teacher, "
             f"production {first} (the int8 student), a byte-for-byte copy of it, the re-compression's re-distilled "
             f"student (same architecture) and the retrain's int8 teacher ({retrained})."
             + (f" **{busy} other process(es) spun a core each throughout** (a shared machine)." if busy else ""), "",
             "Slowdown = candidate over production, minus 1 (0.10: 10% slower). `via_teacher`: production's "
             "round-by-round speedup over the teacher divided by the candidate's (the gate's figure before this "
             "benchmark); `direct`: candidate p95 / production p95 within each round, median over rounds; "
             "`pooled`: the p95s of all calls pooled.", "",
             f"| candidate | method | median | min | max | spread (max - min) | refused at {GATE:.2f} |",
             "|---|---|---|---|---|---|---|"]
    for n in CANDIDATES:
        for m in METHODS:
            s = summary[n][m]
            lines.append(f"| {n} | {m} | {s['median']:+.3f} | {s['min']:+.3f} | {s['max']:+.3f} | {s['spread']:.3f} "
                         f"| {s['refused']}/{repeats} |")
    lines += ["", "Per repeat (slowdowns; p95 b1 ms of production):", "",
              "| repeat | production p95 ms | " + " | ".join(f"{n} {m}" for n in CANDIDATES for m in METHODS) + " |",
              "|---|---|" + "---|" * (len(CANDIDATES) * len(METHODS))]
    for i, r in enumerate(runs):
        lines.append(f"| {i + 1} | {r['latency_ms_p95_b1']['production']:.2f} | "
                     + " | ".join(f"{r[n][m]:+.3f}" for n in CANDIDATES for m in METHODS) + " |")
    (RESULTS / f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _summary(values: list[float]) -> dict:
    return {"values": values, "median": round(statistics.median(values), 4), "min": min(values),
            "max": max(values), "spread": round(max(values) - min(values), 4),
            "refused": sum(v > GATE for v in values)}


if __name__ == "__main__":
    main()
