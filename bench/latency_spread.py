"""How far does the teacher/candidate p95 latency ratio move between runs?

Measures the same two models (the fp32 teacher in torch eager and a
candidate, by default the one production serves) REPEATS times in a row,
twice per repeat:
  - interleaved: both models alive, timed in alternating rounds
    (``measure_interleaved``, what validate does);
  - sequential: the teacher timed alone, then the candidate alone (what
    validate did before: each model in its own process, one after the other).
For each method it reports the p95 batch-1 ratio of every repeat, its median
and the largest deviation from the median (goal: within +-10% interleaved).
Uses validate.latency from params.yaml; writes bench/results/latency_spread.{md,json}.

    .venv/bin/python bench/latency_spread.py [--candidate DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from _common import RESULTS, ROOT, stamp



def spread(ratios: list[float]) -> dict:
    med = statistics.median(ratios)
    dev = [100.0 * (r / med - 1.0) for r in ratios]
    return {"ratios": [round(r, 3) for r in ratios], "median": round(med, 3),
            "max_abs_deviation_pct": round(max(abs(d) for d in dev), 1),
            "deviations_pct": [round(d, 1) for d in dev]}


def main() -> None:
    from shrinkflow.splits import read_parquet

    from shrinkflow.config import load_params
    from shrinkflow.evaluate import measure_interleaved
    from shrinkflow.stats import round_ratio_p95
    from shrinkflow.paths import TEACHER, split_path
    from shrinkflow.registry import Registry

    ap = argparse.ArgumentParser()
    ap.add_argument("--candidate", type=Path, default=None, help="default: the production version")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iters-b1", type=int, default=None, help="override validate.latency.iters_b1")
    ap.add_argument("--out", default="latency_spread", help="results file stem")
    ap.add_argument("--interleaved-only", action="store_true", help="skip the sequential measurements")
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    lat = params.validate_.latency
    if args.iters_b1:
        lat = lat.model_copy(update={"iters_b1": args.iters_b1})
    registry = Registry(ROOT / params.deploy.registry_dir)
    cand = args.candidate or registry.path(registry.alias()) / "model"
    texts = read_parquet(ROOT / split_path("val"))["text"].tolist()
    models = {"teacher": ROOT / TEACHER, "candidate": Path(cand)}
    runs: dict[str, list] = {"interleaved": [], "sequential": []}
    quiet = lambda m: None  # noqa: E731
    for i in range(args.repeats):
        inter = measure_interleaved(models, {}, texts, lat, log=quiet)
        seq = None if args.interleaved_only else {n: measure_interleaved({n: p}, {}, texts, lat, log=quiet)[n]
                                                  for n, p in models.items()}
        for method, r in (("interleaved", inter), ("sequential", seq)):
            if r is None:
                continue
            t, c = r["teacher"]["performance"], r["candidate"]["performance"]
            rec = {k: (t[k], c[k]) for k in ("latency_ms_p50_b1", "latency_ms_p95_b1", "cpu_ms_per_prediction_b1")}
            # the ratio round by round, then its median (what validate's
            # min_speedup gate checks); sequentially, "round" k of the teacher
            # and of the candidate ran a minute apart
            rec["round_median_p95_ratio"] = (round_ratio_p95(r["teacher"]["rounds_b1"], r["candidate"]["rounds_b1"]),
                                             1.0)
            runs[method].append(rec)
            print(f"repeat {i + 1} {method}: p95 b1 teacher {t['latency_ms_p95_b1']:.2f} ms, candidate "
                  f"{c['latency_ms_p95_b1']:.2f} ms, ratio {t['latency_ms_p95_b1'] / c['latency_ms_p95_b1']:.2f}",
                  flush=True)
    doc = {**stamp(), "candidate": str(cand), "latency": lat.model_dump(), "repeats": args.repeats, "runs": runs,
           "spread": {m: {k: spread([t / c for t, c in (rep[k] for rep in reps)])
                          for k in ("latency_ms_p95_b1", "latency_ms_p50_b1", "round_median_p95_ratio")
                          if k in reps[0]} for m, reps in runs.items() if reps}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Latency ratio spread: the same two models, measured repeatedly", "",
             f"Measured {doc['measured_at']} ({doc['machine']}, {lat.threads} threads). Teacher: fp32 torch eager; "
             f"candidate: `{Path(cand).name}` ({cand}). {lat.iters_b1} batch-1 calls per model per measurement "
             f"after {lat.warmup_iters} warm-up calls; interleaved in {lat.rounds} rounds.", "",
             "| method | ratio | " + " | ".join(f"run {i + 1}" for i in range(args.repeats))
             + " | median | max deviation |", "|---|---|" + "---|" * args.repeats + "---|---|"]
    for m, s in doc["spread"].items():
        for k, v in s.items():
            lines.append(f"| {m} | teacher/candidate {k} | " + " | ".join(f"{r:.2f}" for r in v["ratios"])
                         + f" | {v['median']:.2f} | ±{v['max_abs_deviation_pct']:.1f}% |")
    inter = doc["spread"]["interleaved"]["round_median_p95_ratio"]["max_abs_deviation_pct"]
    pooled = doc["spread"]["interleaved"]["latency_ms_p95_b1"]["max_abs_deviation_pct"]
    lines += ["", "`round_median_p95_ratio`: teacher p95 / candidate p95 within each round, then the median over "
                  "rounds (what validate's `min_speedup` gate checks). `latency_ms_p95_b1`: the ratio of the p95s "
                  "of all calls pooled.", "",
              f"Goal: the teacher/candidate p95 ratio within ±10% of its median over {args.repeats} repeats: "
              f"{'MET' if inter <= 10 else 'MISSED'} by the round-by-round ratio (±{inter:.1f}%); the pooled p95 "
              f"ratio, even interleaved, moves ±{pooled:.1f}%."]
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
