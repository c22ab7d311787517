"""Batch-1 latency on 2 cores: 1 or 2 intra-op threads, for int8 and the student.

Validate times every model with validate.latency.threads (2). Does a second
thread pay at batch 1, where each operator is small? Times int8 and the
default student with 1 and 2 threads, all four processes interleaved in one
run (shrinkflow.evaluate.ModelProcess + time_interleaved), and reports p50,
p95 and CPU per prediction. Padding needs no tuning: the tokenizer pads each
batch to its longest sentence, so a batch of one is never padded.
Writes bench/results/threads.{md,json}.

    .venv/bin/python bench/threads.py
"""

from __future__ import annotations

import json
from _common import RESULTS, ROOT, default_student, stamp



def main() -> None:
    from shrinkflow.splits import read_parquet

    from shrinkflow.config import LatencyParams
    from shrinkflow.evaluate import ModelProcess, latency_inputs, percentiles_ms, time_interleaved
    from shrinkflow.paths import CANDIDATES, split_path
    from shrinkflow.stats import round_ratio_p95

    texts = read_parquet(ROOT / split_path("val"))["text"].tolist()
    lat = LatencyParams(threads=2, warmup_iters=20, iters_b1=400, iters_b32=3, rounds=20)
    warm, rounds, _, _ = latency_inputs(texts, lat)
    procs = {}
    try:
        for name in ("int8", default_student()):
            for threads in (1, 2):
                procs[f"{name}, {threads} thread{'s' if threads > 1 else ''}"] = ModelProcess(ROOT / CANDIDATES / name,
                                                                                           threads)
        timed = time_interleaved(procs, warm, rounds, pause_s=0.05)
    finally:
        for p in procs.values():
            p.close()
    rows = {}
    for n, t in timed.items():
        p50, p95 = percentiles_ms(t["seconds"])
        rows[n] = {"latency_ms_p50_b1": round(p50, 3), "latency_ms_p95_b1": round(p95, 3),
                   "cpu_ms_per_prediction_b1": round(1000 * t["cpu_seconds"] / len(t["seconds"]), 3)}
    names = list(timed)
    for one, two in ((names[0], names[1]), (names[2], names[3])):
        rows[two]["speedup_p95_vs_1_thread_round_by_round"] = round(
            round_ratio_p95(timed[one]["round_seconds"], timed[two]["round_seconds"]), 3)
    doc = {**stamp(), "latency": lat.model_dump(), "models": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "threads.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Intra-op threads at batch 1 (2-core machine)", "",
             f"Measured {doc['measured_at']} ({doc['machine']}); {lat.iters_b1} single sentences per model after "
             f"{lat.warmup_iters} warm-up calls, all four processes interleaved in {lat.rounds} rounds.", "",
             "| model | p50 b1 ms | p95 b1 ms | CPU ms / prediction | 2 threads vs 1, p95 (round by round) |",
             "|---|---|---|---|---|"]
    for n, r in rows.items():
        sp = r.get("speedup_p95_vs_1_thread_round_by_round")
        lines.append(f"| {n} | {r['latency_ms_p50_b1']:.2f} | {r['latency_ms_p95_b1']:.2f} | "
                     f"{r['cpu_ms_per_prediction_b1']:.2f} | {'' if sp is None else f'{sp:.2f}x'} |")
    (RESULTS / "threads.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()   # --help, and no stray arguments
    main()
