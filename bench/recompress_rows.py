"""How many window texts a re-compression needs: the measurement behind
``monitor.min_recompress_rows``.

Run after ``bench/monitoring.py``, on a copy of its project as it was before
the re-compression (the teacher before the retrain, production rolled back to
the version the re-compression started from): for each number of distinct
tweets to distil from (the traffic pool's first ones, as the re-compression
saw them), the production student is staged for the warm start, the window
snapshot written (``monitor.heldout_fraction`` of it held out, as in a real
re-compression) and ``dvc repro --single-item compress`` re-distils it with the
default params. Each re-distilled student is then scored on the recovery
tweets (never traffic) and the movie-review test and val splits (val: what
the accuracy-drop gate reads), side by side in one process, against the
teacher and the production model it started from.

Writes bench/results/recompress_rows.{md,json}.

    .venv/bin/python bench/monitoring.py && .venv/bin/python bench/recompress_rows.py
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, ROOT, stamp

SOURCE = ROOT / "bench" / "work" / "monitoring"
WORK = ROOT / "bench" / "work" / "recompress_rows"
PROJECT = WORK / "project"
# (distinct tweets to distil from, distill-step overrides): the default
# params at three sizes, then variants at 1,000: twice the training rows per
# window text (the in-domain anchor) in one epoch, and the re-distilled
# weights interpolated with production's (warm_start_interpolation).
RUNS = ((100, {}), (300, {}), (1000, {}),
        (1000, {"warm_start_train_rows_per_window_text": 8.0, "warm_start_epochs": 1}),
        (1000, {"warm_start_interpolation": 0.3}),
        (1000, {"warm_start_interpolation": 0.5}))


def set_distill(params_path, overrides: dict) -> dict:
    """Write ``overrides`` into every warm-starting distill step of the
    project's params.yaml; returns the step as written."""
    import yaml

    doc = yaml.safe_load(params_path.read_text())
    step = None
    for cand in doc["compress"]["candidates"]:
        for s in cand.get("recipe") or []:
            if s.get("method") == "distill" and s.get("warm_start"):
                s.update(overrides)
                step = s
    params_path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return step


def tweets(part: str) -> tuple[list[str], np.ndarray]:
    """As bench/monitoring.py: one side of the shifted domain, shuffled with seed 0."""
    from shrinkflow.traffic import shifted_split

    df = shifted_split(PROJECT / "data/raw/source.tar.gz")[part]  # the copy's fetched archive
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    return df["text"].tolist(), df["label"].to_numpy()


def runs_and_name() -> tuple[tuple, str, bool, Path, str | None, bool]:
    """RUNS and the results' name, or ``--runs JSON --name NAME`` from the
    command line: a list of [texts, overrides] or [texts, overrides, offset]
    (the pool's first tweet to distil from; 0 by default) or [texts,
    overrides, offset, heldout_fraction] (offset "window": the texts of the
    source project's own re-compression window, as archived; the window's share held out, as
    ``monitor.heldout_fraction``; the params' by default), written to
    bench/results/NAME.{md,json}; ``--rescore``, ``--source``,
    ``--production`` and ``--source-params`` as their help says."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=json.loads, default=None)
    ap.add_argument("--name", default="recompress_rows")
    ap.add_argument("--rescore", action="store_true",
                    help="score again the students the last run kept (bench/work/recompress_rows), with their "
                         "standard errors, into bench/results/NAME.{md,json}; nothing is re-distilled")
    ap.add_argument("--source", type=Path, default=SOURCE,
                    help="the folder holding the project to copy (project/) and the teacher before any retrain "
                         "(teacher_before/); default: bench/work/monitoring, as bench/monitoring.py leaves it")
    ap.add_argument("--production", default=None,
                    help="the registry version to re-distil from (default: the version bench/monitoring.py's "
                         "re-compression started from, bench/results/monitoring.json); it must be a student "
                         "with its warm-start sidecar")
    ap.add_argument("--source-params", action="store_true",
                    help="re-distil with the source project's params where they differ from this checkout's "
                         "(by default that is refused: the runs would stand for another recipe)")
    args = ap.parse_args()
    return ((tuple(tuple(r) for r in args.runs) if args.runs else RUNS), args.name, args.rescore,
            args.source, args.production, args.source_params)


def params_differences(a, b, prefix: str = "") -> list[str]:
    """The dotted paths where two params documents (``Params.model_dump()``
    dicts, lists and values) differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in params_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in params_differences(x, y, f"{prefix}{i}.")]
    return [] if a == b else [f"{prefix.rstrip('.')}: {a!r} here, {b!r} in the source"]


def before_retrain(project: Path) -> None:
    """Empty the production-label splits the copy's retrain left (the data
    stage writes them with no rows until a retrain): compress distils from
    their texts too (shrinkflow.splits.read_unlabelled), so a copy taken
    after bench/monitoring.py's retrain would re-distil from its 354
    labelled tweets as well as the window, which the re-compression it
    stands for never saw. Results before 2026-12-06 from a copy with a
    retrain (recompress_heldout, _swa, _soup) did."""
    from shrinkflow.files import atomic_write_bytes
    from shrinkflow.paths import FEEDBACK_SPLITS, split_path
    from shrinkflow.splits import read_parquet

    for name in FEEDBACK_SPLITS:
        path = project / split_path(name)
        if path.is_file():
            frame = read_parquet(path)
            atomic_write_bytes(path, frame.iloc[:0].to_parquet(index=False))


def paired_se(a: np.ndarray, b: np.ndarray) -> float:
    """Standard error of mean(a) - mean(b), for two 0/1 correctness vectors
    over the same texts (a paired difference: texts both get right or both
    get wrong add nothing)."""
    d = a.astype(float) - b.astype(float)
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def score(models: dict, rec_x, rec_y, test, val) -> tuple[dict, dict]:
    """Accuracy of every model on the recovery tweets and the movie-review
    test and val splits, and the per-text correctness on the first two (for
    the paired standard errors). Each model as served: one text per call
    for a batch-dependent (dynamic-int8) one, as bench/monitoring.py's
    ``labels_as_served`` (results before 2026-12-02 14:45 were batched)."""
    from functools import partial

    from shrinkflow.predictors import load_predictor
    from shrinkflow.predictors import predict_labels as batched

    acc, right = {}, {}
    for name, d in models.items():
        pred = load_predictor(d, threads=2)
        predict_labels = partial(batched, batch_size=1 if getattr(pred, "batch_dependent", False) else 32)
        right[name] = {"tweets": predict_labels(pred, rec_x) == rec_y,
                       "movie_test": predict_labels(pred, test["text"].tolist()) == test["label"].to_numpy()}
        acc[name] = {"tweets": round(float(right[name]["tweets"].mean()), 4),
                     "movie_test": round(float(right[name]["movie_test"].mean()), 4),
                     "movie_val": round(float((predict_labels(pred, val["text"].tolist())
                                               == val["label"].to_numpy()).mean()), 4)}
    return acc, right


def standard_errors(doc: dict, right: dict) -> dict:
    """Per run: the paired standard error of its gain over production on
    the tweets, as a share of the teacher's gap (``recovered_se``), and of its
    in-domain change in points (``in_domain_se_points``); and the gap's own."""
    p, t = f"production {doc['production']}", "teacher"
    gap = float(right[t]["tweets"].mean() - right[p]["tweets"].mean())
    out = {"gap": round(gap, 4), "gap_se": round(paired_se(right[t]["tweets"], right[p]["tweets"]), 4)}
    for r in doc["runs"]:
        a = right[r["name"]]
        out[r["name"]] = {"recovered_se": round(paired_se(a["tweets"], right[p]["tweets"]) / gap, 3)
                          if gap > 0 else None,
                          "in_domain_se_points": round(paired_se(a["movie_test"], right[p]["movie_test"]) * 100, 2)}
    if len(doc["runs"]) > 1 and gap > 0:
        # The runs' mean, per text (a run's share of right answers on it),
        # paired against production on the same texts: what the runs say
        # together, e.g. one setting on several windows.
        mean = {k: np.mean([right[r["name"]][k].astype(float) for r in doc["runs"]], axis=0)
                for k in ("tweets", "movie_test")}
        out["mean_of_runs"] = {
            "recovered": round(float(mean["tweets"].mean() - right[p]["tweets"].mean()) / gap, 3),
            "recovered_se": round(paired_se(mean["tweets"], right[p]["tweets"]) / gap, 3),
            "in_domain_points": round(float(mean["movie_test"].mean() - right[p]["movie_test"].mean()) * 100, 2),
            "in_domain_se_points": round(paired_se(mean["movie_test"], right[p]["movie_test"]) * 100, 2)}
    return out


def write_results(out_name: str, doc: dict) -> None:
    """bench/results/<out_name>.{json,md}, and the table on stdout."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / f"{out_name}.md").write_text(markdown(doc) + "\n")
    print(markdown(doc))


def rescore(out_name: str) -> None:
    """Score again what the last run kept in WORK, with standard errors."""
    sys.path.insert(0, str(ROOT))
    import yaml

    from shrinkflow.registry import Registry
    from shrinkflow.splits import read_parquet

    doc = json.loads((RESULTS / f"{out_name}.json").read_text())
    models = {"teacher": PROJECT / "models/teacher",
              f"production {doc['production']}": Registry(PROJECT / "registry").load(doc["production"]).path,
              **{r["name"]: WORK / f"distilled_{r['name'].split()[-1]}" for r in doc["runs"]}}
    rec_x, rec_y = tweets("recovery")
    acc, right = score(models, rec_x, rec_y, read_parquet(PROJECT / "data/prepared/test.parquet"),
                       read_parquet(PROJECT / "data/prepared/val.parquet"))
    if acc != doc["accuracy"]:
        sys.exit(f"the kept students do not score what {out_name}.json records: {acc} != {doc['accuracy']}")
    doc["standard_errors"] = standard_errors(doc, right)
    doc["max_accuracy_drop"] = doc.get("max_accuracy_drop") or yaml.safe_load(
        (PROJECT / "params.yaml").read_text())["validate"]["gates"]["max_accuracy_drop"]
    write_results(out_name, doc)


def main() -> None:
    runs, out_name, again, source, before, source_params = runs_and_name()
    if again:
        return rescore(out_name)
    sys.path.insert(0, str(ROOT))
    from shrinkflow.config import load_params
    from shrinkflow.dvcrun import offline_env
    from shrinkflow.registry import Registry
    from shrinkflow.splits import read_parquet, read_unlabelled
    from shrinkflow.warmstart import stage_warm_start
    from shrinkflow.window import write_snapshot

    before = before or json.loads((RESULTS / "monitoring.json").read_text())["recompress"]["deployed_before"]
    # The copy keeps the source's params.yaml: a source benchmarked with other
    # compress params (bench/monitoring.py run on a trial default) would
    # re-distil with that recipe, not this checkout's. (Its monitor section
    # differs by design: bench/monitoring.py sets the windows and cooldown.)
    differ = params_differences(load_params(ROOT / "params.yaml").compress.model_dump(),
                                load_params(source / "project" / "params.yaml").compress.model_dump(), "compress.")
    if differ and not source_params:
        sys.exit(f"{source / 'project'} ran with other compress params than this checkout's "
                 f"({'; '.join(differ[:8])}); "
                 "re-run bench/monitoring.py on this checkout, or pass --source-params to re-distil with the "
                 "source's")
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    subprocess.run(["cp", "-a", str(source / "project"), str(PROJECT)], check=True)
    # This checkout's code (the copy holds the code bench/monitoring.py ran).
    for pkg in ("shrinkflow", "stages", "monitoring", "flows", "tasks"):
        shutil.rmtree(PROJECT / pkg)
        shutil.copytree(ROOT / pkg, PROJECT / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.rmtree(PROJECT / "models/teacher")
    shutil.copytree(source / "teacher_before", PROJECT / "models/teacher")
    before_retrain(PROJECT)
    params = load_params(PROJECT / "params.yaml")
    reg = Registry(PROJECT / params.deploy.registry_dir)
    if reg.alias() != before:
        reg.rollback(to=before)
    production_dir = reg.load(before).path

    pool, _ = tweets("pool")
    rec_x, rec_y = tweets("recovery")
    test = read_parquet(PROJECT / "data/prepared/test.parquet")
    env = offline_env(project_dir=PROJECT)  # this venv's python first on PATH, telemetry off
    doc = {**stamp(), "production": before, "heldout_fraction": params.monitor.heldout_fraction, "runs": [],
           "source": str(source.resolve().relative_to(ROOT)) if source.resolve().is_relative_to(ROOT)
           else str(source)}
    models = {"teacher": PROJECT / "models/teacher", f"production {before}": production_dir}
    import yaml

    default_params = (PROJECT / "params.yaml").read_text()
    # The source's own re-compression window, as its re-compression read it
    # (distilled texts, then held out), read before any run writes the
    # copy's window.json (runs before 2026-12-06 04:30 read that file at each
    # "window" run, so one after another run re-split that run's texts).
    source_window = None
    if any(len(r) > 2 and r[2] == "window" for r in runs):
        meta = json.loads((PROJECT / "data/unlabelled/window.json").read_text())
        source_window = [t for k in ("distill", "heldout")
                         for t in (PROJECT / meta["archive"][k]).read_text(encoding="utf-8").splitlines() if t]
    val = read_parquet(PROJECT / "data/prepared/val.parquet")
    for i, (n, overrides, *rest) in enumerate(runs):
        offset = rest[0] if rest else 0
        # a run's own monitor.heldout_fraction (4th element), else the params'
        heldout = rest[1] if len(rest) > 1 else params.monitor.heldout_fraction
        (PROJECT / "params.yaml").write_text(default_params)
        step = set_distill(PROJECT / "params.yaml", overrides)
        if offset == "window":  # the source's own re-compression window (its archived texts), n ignored
            texts = list(source_window)
        else:
            texts = pool[offset:offset + math.ceil(n / (1 - heldout))]
        staged = stage_warm_start(PROJECT, params.deploy.registry_dir)
        window = write_snapshot(PROJECT, texts, heldout,
                                {"bench": "recompress_rows", "warm_start": staged})
        unlabelled = read_unlabelled(PROJECT)
        if len(unlabelled) != window["rows_distill"]:  # the window's texts only, as it was
            sys.exit(f"compress would distil from {len(unlabelled)} texts besides the training "
                     f"split, not the window's {window['rows_distill']}")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", "compress"], cwd=PROJECT,
                              env=env, capture_output=True, text=True)
        secs = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            sys.exit(f"dvc repro compress failed at {n} texts:\n{(proc.stdout + proc.stderr)[-4000:]}")
        built = json.loads((PROJECT / "metrics/compress.json").read_text())["candidates"]
        warm = [k for k, b in built.items() if b.get("warm_start_from") == before]
        if not warm:
            sys.exit(f"no candidate warm-started from {before} at {n} texts: {sorted(built)}")
        run = f"run {i + 1}"
        keep = WORK / f"distilled_{i + 1}"
        shutil.copytree(PROJECT / "models/candidates" / warm[0], keep)
        # for bench/recompress_int8.py: the run's fp32 student (the share kept) and the texts compress read
        shutil.copytree(PROJECT / "models/students" / warm[0], WORK / f"student_{i + 1}")
        (WORK / f"window_{i + 1}.txt").write_text("\n".join(unlabelled) + "\n", encoding="utf-8")
        if not (WORK / "production_student").exists():
            shutil.copytree(PROJECT / "data/unlabelled/warm_start" / warm[0], WORK / "production_student")
        models[run] = keep
        doc["runs"].append({"name": run, "texts": len(texts), "pool_offset": offset, "heldout_fraction": heldout,
                            "interpolation_choice": built[warm[0]].get("warm_start_interpolation_choice"), "rows_distill": window["rows_distill"],
                            "rows_heldout": window["rows_heldout"], "candidate": warm[0], "compress_s": secs,
                            "distill_rows": built[warm[0]].get("distill_rows"), "overrides": overrides,
                            "warm_start_epochs": step["warm_start_epochs"],
                            "train_rows_per_window_text": step["warm_start_train_rows_per_window_text"],
                            "interpolation": built[warm[0]].get("warm_start_interpolation",
                                                                step.get("warm_start_interpolation", 0.0))})
        print(doc["runs"][-1], flush=True)

    acc, right = score(models, rec_x, rec_y, test, val)
    doc["standard_errors"] = standard_errors({**doc, "accuracy": acc}, right)
    (PROJECT / "params.yaml").write_text(default_params)
    doc["accuracy"], doc["recovery_tweets_n"], doc["movie_test_n"] = acc, len(rec_x), len(test)
    doc["max_accuracy_drop"] = yaml.safe_load(default_params)["validate"]["gates"]["max_accuracy_drop"]
    write_results(out_name, doc)


def markdown(doc: dict) -> str:
    """bench/results/recompress_rows.md from the results document."""
    acc, p = doc["accuracy"], f"production {doc['production']}"
    gap = acc["teacher"]["tweets"] - acc[p]["tweets"]
    shares = {r.get('heldout_fraction', doc['heldout_fraction']) for r in doc['runs']}
    lines = ["# How many window texts a re-compression needs", "",
             f"Measured {doc['measured_at']} on {doc['machine']}, by `bench/recompress_rows.py` on a copy of "
             + ("`bench/monitoring.py`'s project before its re-compression"
                if doc.get("source", "bench/work/monitoring") == "bench/work/monitoring"
                else f"the project in `{doc['source']}`") + f": production {doc['production']}'s "
             "student warm-started and re-distilled (`dvc repro --single-item compress`, the default params but "
             "for each run's own, in its columns) on tweets of the traffic pool from the one named (\"window\": "
             "the source's own re-compression window), "
             + (f"{shares.pop():.0%} of them held out as a re-compression does. "
                if len(shares) == 1
                else "each run's share of them held out as a re-compression does (its column). ")
             + "Scored on "
             f"{doc['recovery_tweets_n']} recovery tweets (never traffic) and the {doc['movie_test_n']} "
             "movie-review test sentences.", "",
             f"Teacher: {acc['teacher']['tweets']:.4f} on the tweets, {acc['teacher']['movie_test']:.4f} in domain; "
             f"production: {acc[p]['tweets']:.4f} and {acc[p]['movie_test']:.4f}.", "",
             "| pool tweets from | texts distilled | held out | train rows per text | window repeats | epochs "
             "| interpolation | weights averaged (last share) | soup | warm learning rate | warm alpha_kl "
             "| compress (s) "
             "| tweets accuracy | gap recovered | in domain, test (points) | val drop vs teacher (points) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ses = doc.get("standard_errors") or {}
    for r in doc["runs"]:
        a, se = acc[r["name"]], ses.get(r["name"])
        rec = (a["tweets"] - acc[p]["tweets"]) / gap if gap > 0 else float("nan")
        rec_se = f" ± {se['recovered_se']:.0%}" if se and se["recovered_se"] is not None else ""
        dom_se = f" ± {se['in_domain_se_points']:.2f}" if se else ""
        lines.append(f"| {r.get('pool_offset', 0)} | {r['rows_distill']} | {r['rows_heldout']} | "
                     f"{r['train_rows_per_window_text']:g} | {r.get('overrides', {}).get('warm_start_window_repeats', 1)} | "
                     f"{r['warm_start_epochs']} | {r.get('interpolation', 0.0):g} | "
                     f"{r.get('overrides', {}).get('warm_start_average_last', 0.0):g} | "
                     f"{r.get('overrides', {}).get('warm_start_soup', 1)} | "
                     f"{r.get('overrides', {}).get('warm_start_learning_rate') or 'step'} | "
                     f"{r.get('overrides', {}).get('warm_start_alpha_kl', 'step')} | {r['compress_s']} | "
                     f"{a['tweets']:.4f} | {rec:.0%}{rec_se} | "
                     f"{(a['movie_test'] - acc[p]['movie_test']) * 100:+.2f}{dom_se} | "
                     f"{(acc['teacher']['movie_val'] - a['movie_val']) * 100:.2f} |")
    notes = [f"{r['name']} ({r.get('pool_offset')}): {r['note']}." for r in doc["runs"] if r.get("note")]
    if notes:
        lines += [""] + notes
    if doc.get("also_distilled"):
        lines += ["", f"**Not a re-compression's setting:** {doc['also_distilled']}"]
    if ses.get("mean_of_runs"):
        m = ses["mean_of_runs"]
        lines += ["", f"The runs' mean (each text scored by the share of runs right on it, paired against "
                      f"production): **{m['recovered']:.0%} ± {m['recovered_se']:.0%} of the gap recovered, "
                      f"{m['in_domain_points']:+.2f} ± {m['in_domain_se_points']:.2f} points in domain**."]
    if ses:
        lines += ["", f"± is one standard error of the paired difference against production on the same texts "
                      f"(the run's own noise; the teacher's gap itself, {ses['gap'] * 100:.2f} points, is known "
                      f"to ± {ses['gap_se'] * 100:.2f}). A difference of 2 standard errors is what the "
                      f"texts can resolve."]
    lines += ["", f"The val drop is what `validate.gates.max_accuracy_drop` ({doc['max_accuracy_drop'] * 100:g} points) "
              f"gates; production's own: {(acc['teacher']['movie_val'] - acc[p]['movie_val']) * 100:.2f}."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
