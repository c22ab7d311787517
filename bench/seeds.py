"""A candidate's accuracy over distillation seeds.

One standard error on the 1,056 test sentences is about a point, so one
seed says little about a recipe. This builds a candidate of params.yaml (by
default the first one with a distill step) from the kept teacher with
SEEDS distillation seeds (the seed of every distill step is replaced),
scores each on val and test against the teacher's predictions on the same
sentences, and reports the mean, the worst seed and the paired standard
error of each drop. Writes bench/results/seeds.{md,json}.

    .venv/bin/python bench/seeds.py [--candidate NAME] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from _common import RESULTS, ROOT, default_candidate, splits, stamp



def main() -> None:

    from shrinkflow.compress import apply_recipe
    from shrinkflow.config import load_params
    from shrinkflow.paths import TEACHER
    from shrinkflow.predictors import load_predictor, predict_labels
    from shrinkflow.stats import paired_accuracy_drop

    ap = argparse.ArgumentParser()
    ap.add_argument("--candidate", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    cand = (next(c for c in params.compress.candidates if c.name == args.candidate) if args.candidate
            else default_candidate(params))
    frames = splits("train", "val", "test", "shifted")
    teacher = load_predictor(ROOT / TEACHER, threads=params.train.threads)
    t_pred = {s: predict_labels(teacher, frames[s]["text"].tolist()) for s in ("val", "test", "shifted")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="shrinkflow-seeds-") as tmp:
        for seed in args.seeds:
            recipe = tuple(s.model_copy(update={"seed": seed}) if s.method == "distill" else s for s in cand.recipe)
            c = cand.model_copy(update={"recipe": recipe})
            t0 = time.perf_counter()
            out = apply_recipe(ROOT / TEACHER, c, Path(tmp) / f"seed{seed}",
                               train_texts=frames["train"]["text"].tolist(),
                               train_labels=frames["train"]["label"].to_numpy(), threads=params.train.threads,
                               progress=False, unlabelled_texts=[],
                               fuse=params.compress.fuse_transformer_ops)
            build_s = time.perf_counter() - t0
            pred = load_predictor(out, threads=params.train.threads)
            row = {"seed": seed, "build_seconds": round(build_s, 1)}
            for s in ("val", "test", "shifted"):
                y = frames[s]["label"].to_numpy()
                p = predict_labels(pred, frames[s]["text"].tolist())
                d = paired_accuracy_drop(y, t_pred[s], p)
                row[s] = {"accuracy": round(float((p == y).mean()), 6),
                          "teacher_accuracy": round(float((t_pred[s] == y).mean()), 6),
                          "drop_points": round(100 * d["accuracy_drop"], 3),
                          "drop_se_points": round(100 * d["accuracy_drop_se"], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for s in ("val", "test", "shifted"):
        drops = [r[s]["drop_points"] for r in rows]
        summary[s] = {"mean_accuracy": round(statistics.mean(r[s]["accuracy"] for r in rows), 6),
                      "teacher_accuracy": rows[0][s]["teacher_accuracy"],
                      "mean_drop_points": round(statistics.mean(drops), 3), "worst_drop_points": max(drops),
                      "seed_sd_points": round(statistics.stdev(drops), 3) if len(drops) > 1 else None}
    doc = {**stamp(), "candidate": cand.model_dump(mode="json"), "seeds": rows, "summary": summary}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "seeds.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# `{cand.name}` over {len(rows)} distillation seeds", "",
             f"Measured {doc['measured_at']} ({doc['machine']}). Recipe: `{json.dumps(doc['candidate']['recipe'])}`. "
             "Each seed built from the same kept teacher; drops are paired against the teacher on the same "
             "sentences (points; ± one paired standard error).", "",
             "| seed | build s | val acc | val drop | test acc | test drop | shifted acc | shifted drop |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['build_seconds']:.0f} | " + " | ".join(
            f"{r[s]['accuracy']:.4f} | {r[s]['drop_points']:+.2f} ± {r[s]['drop_se_points']:.2f}"
            for s in ("val", "test", "shifted")) + " |")
    for s, v in summary.items():
        lines.append(f"| **{s}: mean / worst** | | {v['mean_accuracy']:.4f} (teacher {v['teacher_accuracy']:.4f}) | "
                     f"mean {v['mean_drop_points']:+.2f}, worst {v['worst_drop_points']:+.2f}, seed sd "
                     f"{v['seed_sd_points']} | | | | |")
    t = summary["test"]
    lines += ["", f"Targets (test): mean drop <= 1.0 point: {'MET' if t['mean_drop_points'] <= 1.0 else 'MISSED'} "
                  f"({t['mean_drop_points']:+.2f}); worst seed <= 1.5 points: "
                  f"{'MET' if t['worst_drop_points'] <= 1.5 else 'MISSED'} ({t['worst_drop_points']:+.2f})."]
    (RESULTS / "seeds.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
