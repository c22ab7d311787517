"""The monitoring loop on the real models, against issue 17's targets: no
trigger in domain, a trigger on shifted traffic, a re-compression that ships
a better student, and a retrain when the teacher itself is wrong.

In a git+DVC copy of this checkout (its data, teacher, candidates and
registry), with the default params except ``monitor.window_last_n`` 1,000
and ``monitor.cooldown_hours`` 0 (so that the two acted verdicts below may
follow each other):
  1. ``shrinkflow run`` without dvc.lock or caches (the full lifecycle, every
     stage run and every candidate built; its wall time is the yardstick of
     the re-compression's cost), then ``shrinkflow serve``;
  2. five in-domain windows of 1,000 movie-review sentences (val and test
     splits, a different seeded sample each), each followed by
     ``shrinkflow monitor --report-only``: the verdicts and figures;
  3. five shifted windows of 1,000 tweets from the traffic pool of Hutto &
     Gilbert's tweet set (``shrinkflow.traffic.shifted_split``, the pool
     ``simulate-traffic --domain shifted`` sends), each followed by
     ``monitor --report-only``;
  4. a window of 1,000 further pool tweets without feedback labels, then
     ``shrinkflow monitor``: the verdict and the re-compression it runs;
  5. a window of 1,000 further pool tweets, RETRAIN_LABELS of them with
     feedback labels (the human ratings), then ``shrinkflow monitor``: the
     retrain verdict and the lifecycle it runs (train included);
  6. the teacher and the production model before and after each step, on
     the recovery set's tweets (never sent as traffic) and on the movie-review
     test split, side by side in one process.
Writes bench/results/monitoring.{md,json}.

    .venv/bin/python bench/monitoring.py   # after `shrinkflow run`
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from _common import RESULTS, ROOT, stamp

WORK = ROOT / "bench" / "work" / "monitoring"
PROJECT = WORK / "project"
WINDOW = 1000
WINDOWS = 5
RETRAIN_LABELS = 500


def copy_project() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file() and not rel.startswith("bench/"):
            (PROJECT / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, PROJECT / rel)
    # The stage outputs dvc.lock pins, and the registry: the copy starts where
    # this checkout is, so DVC skips what is up to date.
    # No dvc.lock and no .shrinkflow/cache (candidate and teacher-output
    # caches): the first `shrinkflow run` runs every stage and builds every
    # candidate, the yardstick a re-compression's cost is measured against;
    # the re-compression then finds the caches that run left, as it would in
    # any project that has run before.
    (PROJECT / "dvc.lock").unlink()
    for rel in ("data/raw", "data/prepared", "models", "registry", "deploy"):
        if (ROOT / rel).exists():
            shutil.copytree(ROOT / rel, PROJECT / rel, dirs_exist_ok=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=PROJECT, check=True)
    subprocess.run(git + ["add", "-A"], cwd=PROJECT, check=True)
    subprocess.run(git + ["commit", "-qm", "bench copy"], cwd=PROJECT, check=True)


def cli(*args: str) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=PROJECT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    with open(WORK / "cli.log", "a") as fh:
        fh.write(f"\n===== shrinkflow {' '.join(args)} (exit {proc.returncode}, {wall:.1f} s)\n{out}")
    if proc.returncode not in (0, 1):
        sys.exit(f"shrinkflow {' '.join(args)} failed (exit {proc.returncode}):\n{out[-4000:]}")
    return round(wall, 1), out, proc.returncode


def recompress_phases(out: str) -> dict:
    """From a ``shrinkflow monitor`` run's output (Prefect's log lines,
    HH:MM:SS.mmm): the re-compression subflow's own wall seconds (its
    "Beginning subflow run" line to its "Finished in state" line; the
    monitor's reports and decision come before it) and each DVC stage's
    seconds as the lifecycle's task logged them. Empty when absent."""
    import re

    def secs(line: str) -> float:
        h, m, rest = line[:12].split(":")
        return int(h) * 3600 + int(m) * 60 + float(rest)

    lines = out.splitlines()
    begin = next((ln for ln in lines if "for flow 'shrinkflow-recompress'" in ln and "Beginning subflow" in ln), None)
    if begin is None:
        return {}
    name = re.search(r"Flow run '([^']+)'", begin).group(1)
    end = next((ln for ln in lines if f"Flow run '{name}' - Finished in state" in ln), None)
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"stage (\w+): ran in ([\d.]+)s", out)}
    if end is None:
        return {"stages_s": stages}
    wall = secs(end) - secs(begin)
    return {"recompress_s": round(wall + (86400 if wall < 0 else 0), 1), "stages_s": stages}


def tweets(part: str) -> tuple[list[str], np.ndarray]:
    """The tweets of one side of the shifted domain ("pool": traffic,
    "recovery": evaluation only), shuffled with seed 0."""
    from shrinkflow.traffic import shifted_split

    df = shifted_split(PROJECT / "data/raw/source.tar.gz")[part]  # the copy's fetched archive
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    return df["text"].tolist(), df["label"].to_numpy()


def serve(port: int) -> subprocess.Popen:
    env = {**os.environ}
    env.pop("SHRINKFLOW_API_TOKEN", None)
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port)], cwd=PROJECT, env=env,
                            stdout=open(WORK / "serve.log", "w"), stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    sys.exit("the server did not start; see bench/work/monitoring/serve.log")


def send(port: int, texts: list[str], labels: np.ndarray | None = None, n_feedback: int = 0) -> None:
    """POST ``texts`` to /predict, 8 a request; the first ``n_feedback``
    answers get their true label back through /feedback."""
    answers = []
    with httpx.Client(timeout=60) as client:
        for i in range(0, len(texts), 8):
            r = client.post(f"http://127.0.0.1:{port}/predict", json={"texts": texts[i:i + 8]})
            r.raise_for_status()
            answers += r.json()["predictions"]
        for a, y in zip(answers[:n_feedback], (labels if labels is not None else [])[:n_feedback]):
            client.post(f"http://127.0.0.1:{port}/feedback",
                        json={"prediction_id": a["prediction_id"], "label": int(y)}).raise_for_status()


def last_decision() -> dict:
    """The newest monitor run's decision.json (its summary beside it)."""
    reports = PROJECT / "monitoring" / "reports"
    newest = max((d for d in reports.iterdir() if (d / "decision.json").is_file()), key=lambda d: d.name)
    doc = json.loads((newest / "decision.json").read_text())
    summary = json.loads((newest / "summary.json").read_text()) if (newest / "summary.json").is_file() else {}
    return {"decision": doc, "summary": summary}


def figures(doc: dict) -> dict:
    """The policy's inputs of one run, by rule, and its verdict."""
    d = doc["decision"]
    return {"action": d["action"], "triggers": d.get("triggers", []),
            "findings": {f["rule"]: f["value"] for f in d.get("findings", [])},
            "held": d["reasons"][0] if d["action"] == "warn" else None}


def production(reg: Path) -> tuple[str, Path]:
    if not (reg / "aliases.json").is_file():
        sys.exit("the full run deployed nothing (reports/gates.md in bench/work/monitoring/project says why); the "
                 "loop needs a model in production. On a machine where the default student misses a gate, run "
                 "with another distillation seed: bench/monitoring.py --distill-seed N")
    v = json.loads((reg / "aliases.json").read_text())["production"]
    return v, reg / "versions" / v / "model"


def distill_seed() -> int | None:
    """``--distill-seed N`` on the command line: every distill step's seed in
    the copy's params (the default run's student differs by CPU: on an AMD
    EPYC seed 0's student missed the test confirmation by 0.04 points)."""
    if "--distill-seed" in sys.argv:
        return int(sys.argv[sys.argv.index("--distill-seed") + 1])
    return None


def retrain_keep_share() -> float | None:
    """``--retrain-keep-share X`` on the command line: ``train.retrain_keep_share``
    in the copy's params (the retrained teacher averaged with the kept one)."""
    if "--retrain-keep-share" in sys.argv:
        return float(sys.argv[sys.argv.index("--retrain-keep-share") + 1])
    return None


def labels_as_served(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Each text's label as ``shrinkflow serve`` answers it and validate
    scores it: one text per call for a batch-dependent model (ONNX Runtime's
    dynamic int8 scales a batch's activations together, so a label can change
    with the texts batched beside it), else in batches of 32. Scoring a
    dynamic-int8 model in batches of 32 moved the re-distilled student's
    held-out agreement gain from 0.0038 (what validate measured, one text per
    call) to 0.0115 (2026-12-02)."""
    from shrinkflow.predictors import load_predictor, predict_labels

    predictor = load_predictor(model_dir, threads=2)
    return predict_labels(predictor, texts, batch_size=1 if getattr(predictor, "batch_dependent", False) else 32)


def evaluate(model_dirs: dict[str, Path], texts: list[str], labels: np.ndarray) -> dict:
    return {k: round(float((labels_as_served(d, texts) == labels).mean()), 4) for k, d in model_dirs.items()}


def probabilities_as_served(model_dir: Path, texts: list[str]) -> np.ndarray:
    """``[N, C]`` class probabilities as ``labels_as_served`` scores them (the
    same call pattern), through validate's own ``evaluate.predict_outputs``."""
    from shrinkflow.evaluate import predict_outputs
    from shrinkflow.predictors import load_predictor

    predictor = load_predictor(model_dir, threads=2)
    _, probs = predict_outputs(predictor, {"texts": texts}, per_row=getattr(predictor, "batch_dependent", False),
                               probability_splits=frozenset({"texts"}))
    return np.asarray(probs["texts"])


def gain_noise(teacher: Path, production_dir: Path, candidate: Path, texts: list[str]) -> dict:
    """How noisy the window gate's gain is: on ``texts`` (never in the
    window), the share ``discordant`` of texts where exactly one of
    production and the re-distilled candidate agrees with the teacher, and
    the gain (candidate minus production agreement). A paired difference of
    agreements on n held-out texts has standard error
    sqrt((discordant - gain**2) / n) (McNemar's setting). ``soft``: the same
    for soft agreement (``stats.soft_agreement``, what the gate measures by
    default): the gain and the standard error of the per-text differences'
    mean at each n."""
    t, p, c = (probabilities_as_served(d, texts) for d in (teacher, production_dir, candidate))
    agree_p, agree_c = p.argmax(1) == t.argmax(1), c.argmax(1) == t.argmax(1)
    discordant = float((agree_p != agree_c).mean())
    gain = float(agree_c.mean() - agree_p.mean())
    from shrinkflow.stats import overlap_rows

    diff = overlap_rows(c, t) - overlap_rows(p, t)
    sd = float(diff.std(ddof=1))
    return {"texts": len(texts), "discordant": round(discordant, 4), "gain": round(gain, 4),
            "se_at": {n: round(float(np.sqrt(max(discordant - gain ** 2, 0.0) / n)), 4)
                      for n in (100, 205, 300, 500, 1000)},
            "soft": {"gain": round(float(diff.mean()), 4),
                     "se_at": {n: round(sd / np.sqrt(n), 4) for n in (100, 205, 300, 500, 1000)}}}


def recovery_noise(teacher: Path, production_dir: Path, candidate: Path, texts: list[str],
                   labels: np.ndarray) -> dict:
    """How precisely ``texts`` (the recovery tweets) measure the share of the
    gap a candidate recovers: the paired accuracy difference d (candidate
    minus production) has standard error sqrt((discordant - d**2) / n),
    ``discordant`` the share of texts exactly one of the two gets right
    (McNemar's setting); the recovery d / gap (gap: teacher minus production
    accuracy, taken as known) then has standard error se / gap, and a 95%
    interval of recovery +- 1.96 se / gap."""
    t, p, c = (labels_as_served(d, texts) == labels for d in (teacher, production_dir, candidate))
    n, gap = len(texts), float(t.mean() - p.mean())
    diff, discordant = float(c.mean() - p.mean()), float((p != c).mean())
    se = float(np.sqrt(max(discordant - diff ** 2, 0.0) / n))
    out = {"texts": n, "gap": round(gap, 4), "diff": round(diff, 4), "discordant": round(discordant, 4),
           "se_diff": round(se, 4)}
    if gap > 0:
        out |= {"recovery": round(diff / gap, 3), "se_recovery": round(se / gap, 3),
                "ci95_recovery": [round((diff - 1.96 * se) / gap, 3), round((diff + 1.96 * se) / gap, 3)]}
    return out


def domain_noise(predictions: dict[str, np.ndarray], pairs: list[tuple[str, str]], labels: np.ndarray) -> dict:
    """In-domain accuracy differences of ``pairs`` of models (the first minus
    the second), paired on the same texts (``predictions``: each model's
    labels as served), with the standard error and 95% interval of
    ``shrinkflow.stats.paired_accuracy_drop``, in points: how precisely the
    in-domain targets (at most 0.5 points lost) are measured."""
    from shrinkflow.stats import paired_accuracy_drop

    out = {}
    for a, b in pairs:
        x = paired_accuracy_drop(labels, predictions[b], predictions[a])   # b minus a
        out[f"{a} vs {b}"] = {"n": x["n"], "diff_points": round(-100 * x["accuracy_drop"], 2),
                              "se_points": round(100 * x["accuracy_drop_se"], 2),
                              "ci95_points": [round(-100 * x["accuracy_drop_ci_high"], 2),
                                              round(-100 * x["accuracy_drop_ci_low"], 2)]}
    return out


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from shrinkflow.config import parse_params_yaml
    from shrinkflow.splits import read_parquet

    reuse = "--reuse-run" in sys.argv
    if not reuse:
        copy_project()
    params = parse_params_yaml((PROJECT / "params.yaml").read_bytes(), PROJECT / "params.yaml")
    params["monitor"].update({"window_last_n": WINDOW, "cooldown_hours": 0.0})
    seed = distill_seed()
    if seed is not None:
        for cand in params["compress"]["candidates"]:
            for step in cand.get("recipe") or []:
                if step.get("method") == "distill":
                    step["seed"] = seed
    share = retrain_keep_share()
    if share is not None:
        params["train"]["retrain_keep_share"] = share
    (PROJECT / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    reg = PROJECT / params["deploy"]["registry_dir"]
    doc = {**stamp(), "window_rows": WINDOW, "params_monitor": params["monitor"], "distill_seed": seed,
           "retrain_keep_share": params["train"].get("retrain_keep_share", 0.0),
           "gates": params["validate"]["gates"]}

    teacher0 = WORK / "teacher_before"
    if reuse:
        # --reuse-run: the copy's full run of an earlier invocation that
        # stopped after it (its wall time from cli.log's first entry).
        first = (WORK / "cli.log").read_text().split("=====", 2)[1]
        if not first.startswith(" shrinkflow run (exit 0, "):
            sys.exit("--reuse-run: bench/work/monitoring/cli.log does not start with a completed shrinkflow run")
        doc["run_s"] = float(first.split("exit 0, ", 1)[1].split(" s)", 1)[0])
        v0, v0_dir = production(reg)
    else:
        print("--- shrinkflow run", flush=True)
        doc["run_s"], _, _ = cli("run")
        v0, v0_dir = production(reg)
        shutil.copytree(PROJECT / "models/teacher", teacher0)

    movies = [read_parquet(PROJECT / f"data/prepared/{s}.parquet") for s in ("val", "test")]
    in_domain = [t for df in movies for t in df["text"].tolist()]
    pool, pool_y = tweets("pool")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(port)
    try:
        # Five report-only windows per domain, each its own seeded sample.
        for key, texts, seed in (("in_domain", in_domain, 100), ("shifted", pool, 200)):
            doc[key] = []
            for i in range(WINDOWS):
                rng = np.random.default_rng(seed + i)
                send(port, [texts[j] for j in rng.choice(len(texts), WINDOW, replace=False)])
                secs, _, _ = cli("monitor", "--report-only")
                doc[key].append({"seconds": secs, **figures(last_decision())})
                print(key, i, doc[key][-1]["action"], doc[key][-1]["triggers"], flush=True)

        print("--- re-compression: 1,000 pool tweets, no labels", flush=True)
        send(port, pool[:WINDOW])
        secs, out, code = cli("monitor")
        v1, v1_dir = production(reg)
        doc["recompress"] = {"seconds_with_monitor": secs, **recompress_phases(out), "exit": code,
                             **figures(last_decision()),
                             "deployed_before": v0, "deployed_after": v1,
                             "train_rerun": "Running stage 'train'" in out,
                             "compress_rerun": "Running stage 'compress'" in out,
                             "validate": json.loads((PROJECT / "metrics/validate.json").read_text()),
                             "gates": json.loads((PROJECT / "reports/gates.json").read_text())}
        v1_keep = WORK / "production_after_recompress"
        shutil.copytree(v1_dir, v1_keep)
        # The re-distilled student, deployed or not: what the window gate judged.
        doc["recompress"]["window"] = json.loads((PROJECT / "data/unlabelled/window.json").read_text())
        built = json.loads((PROJECT / "metrics/compress.json").read_text())["candidates"]
        warm = [n for n, b in built.items() if b.get("warm_start_from")]
        doc["recompress"]["redistilled"] = warm[0] if warm else None
        # the WiSE-FT share chosen on val (warm_start_interpolation as a grid), and what was tried
        doc["recompress"]["interpolation"] = {k: built[warm[0]].get(k) for k in (
            "warm_start_interpolation", "warm_start_interpolation_choice")} if warm else None
        if warm:
            shutil.copytree(PROJECT / "models/candidates" / warm[0], WORK / "redistilled")

        print("--- retrain: 1,000 further pool tweets, labelled feedback", flush=True)
        send(port, pool[WINDOW:2 * WINDOW], pool_y[WINDOW:2 * WINDOW], n_feedback=RETRAIN_LABELS)
        secs, out, code = cli("monitor")
        v2, v2_dir = production(reg)
        doc["retrain"] = {"seconds_with_monitor": secs, "exit": code, **figures(last_decision()),
                          "deployed_before": v1, "deployed_after": v2,
                          "train_rerun": "Running stage 'train'" in out,
                          "lineage": json.loads((reg / "versions" / v2 / "manifest.json").read_text()).get("lineage"),
                          "gates": json.loads((PROJECT / "reports/gates.json").read_text()),
                          **retrain_files()}
        time.sleep(3)  # the server polls the alias
        doc["served_at_end"] = httpx.get(f"http://127.0.0.1:{port}/health").json()["model_version"]
    finally:
        server.terminate()
        server.wait(timeout=60)

    score(doc)


def score(doc: dict) -> None:
    """Step 6: the teacher and each production model before and after, and
    the re-distilled student, on the recovery tweets and the movie-review
    test split, as served (``labels_as_served``); writes the results. Also
    ``--rescore``: again from monitoring.json and the models the run left in
    bench/work/monitoring (the retrained teacher is the project's)."""
    from shrinkflow.splits import read_parquet

    v0, v1, v2 = (doc["recompress"]["deployed_before"], doc["recompress"]["deployed_after"],
                  doc["retrain"]["deployed_after"])
    reg = PROJECT / "registry"
    teacher0, v0_dir = WORK / "teacher_before", reg / "versions" / v0 / "model"
    rec_x, rec_y = tweets("recovery")
    test = read_parquet(PROJECT / "data/prepared/test.parquet")
    dirs = {"teacher before": teacher0, f"production {v0} (before)": v0_dir,
            f"production {v1} (after re-compression)": WORK / "production_after_recompress",
            "teacher after retrain": PROJECT / "models/teacher",
            f"production {v2} (after retrain)": reg / "versions" / v2 / "model"}
    if (WORK / "redistilled").is_dir():
        dirs[f"re-distilled {doc['recompress']['redistilled']} (the re-compression's)"] = WORK / "redistilled"
        doc["gain_noise"] = gain_noise(teacher0, v0_dir, WORK / "redistilled", rec_x)
        doc["recovery_noise"] = recovery_noise(teacher0, v0_dir, WORK / "redistilled", rec_x, rec_y)
    # the retrain's student when it was not deployed (the last lifecycle's candidate: nothing ran after it)
    rt_students = list(doc["retrain"].get("students") or {})
    if rt_students and doc["retrain"]["gates"].get("selected") != rt_students[0] \
            and (PROJECT / "models/candidates" / rt_students[0]).is_dir():
        dirs[f"retrain's student {rt_students[0]} (not deployed)"] = PROJECT / "models/candidates" / rt_students[0]
    # In domain: the test split, and with it the monitor's drift reference (never trained on, never used to
    # choose), each model predicted once on both: test's accuracy from the first len(test) labels.
    ref = read_parquet(PROJECT / "data/prepared/reference.parquet")
    domain_y = np.concatenate([test["label"].to_numpy(), ref["label"].to_numpy()])
    domain = {m: labels_as_served(d, test["text"].tolist() + ref["text"].tolist()) for m, d in dirs.items()}
    doc["eval"] = {"recovery_tweets": evaluate(dirs, rec_x, rec_y), "recovery_tweets_n": len(rec_x),
                   "movie_test": {m: round(float((y[:len(test)] == domain_y[:len(test)]).mean()), 4)
                                  for m, y in domain.items()},
                   "movie_test_n": len(test), "scored": "as served: one text per call for a batch-dependent model"}
    # each deployed model against the one before it and against the first
    names = list(dirs)
    doc["domain_noise"] = {"texts": "movie test + reference", "n_test": len(test), "n_reference": len(ref),
                           "pairs": domain_noise(domain, [(names[4], names[1]), (names[4], names[2]),
                                                          (names[2], names[1]), (names[3], names[0])], domain_y)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitoring.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (RESULTS / "monitoring.md").write_text(markdown(doc, list(dirs)) + "\n")
    print(markdown(doc, list(dirs)))


def retrain_files() -> dict:
    """What the retrain's lifecycle left in the project (nothing runs after
    it): its candidates' validate figures, and how each distilled student
    was built (warm start, the texts it learned from, the WiSE-FT share)."""
    built = json.loads((PROJECT / "metrics/compress.json").read_text())["candidates"]
    keys = ("warm_start_from", "warm_start_train_rows", "distill_rows", "distill_epochs", "distill_learning_rate",
            "distill_alpha_kl", "distill_unlabelled_rows",
            "warm_start_window_augmented_rows", "warm_start_interpolation", "warm_start_interpolation_choice")
    return {"validate": json.loads((PROJECT / "metrics/validate.json").read_text()),
            "students": {n: {k: b.get(k) for k in keys} for n, b in built.items() if b.get("distill_rows")}}


def retrain_lines(rt: dict) -> list[str]:
    """The retrain's candidates (val accuracy against the new teacher's,
    batch-1 p95, failed gates) and how its students were built; none for a
    run before these were recorded."""
    if "validate" not in rt:
        return []
    v, g = rt["validate"], rt["gates"]["candidates"]
    out = [f"Retrained teacher on val: {v['teacher']['accuracy']:.4f}.", "",
           "| candidate | val accuracy | window agreement | p95 b1 (ms) | failed gates |", "|---|---|---|---|---|"]
    for name, m in v["candidates"].items():
        failed = ", ".join(f"{k} {x['value']:.4g} (threshold {x['threshold']:.4g})"
                           for k, x in g[name]["gates"].items() if not x["passed"] and x.get("enforced", True))
        out.append(f"| {name} | {m['accuracy']:.4f} | {(m.get('agreement') or {}).get('window_heldout')} | "
                   f"{m['latency_ms_p95_b1']:.3f} | {failed or 'none'} |")
    for name, b in rt.get("students", {}).items():
        choice = b.get("warm_start_interpolation_choice") or {}
        out += ["", f"Student {name}: " + (f"warm-started from production {b['warm_start_from']}'s student"
                                           if b.get("warm_start_from") else "distilled cold from the new teacher")
                + f", {b['distill_rows']:,} rows ({b.get('distill_unlabelled_rows') or 0:,} production texts: the "
                "window's and the production labels'), " + f"{b['distill_epochs']} epoch(s)"
                + (f"; WiSE-FT share kept {b['warm_start_interpolation']} (tried: "
                   + ", ".join(f"{t['keep']} -> val accuracy {t['val_accuracy']:.4f}" for t in choice["tried"])
                   + f"; production student {choice['production_val_accuracy']:.4f}"
                   + (f", teacher {choice['teacher_val_accuracy']:.4f}" if "teacher_val_accuracy" in choice else "")
                   + f"; within the bounds: {choice['met']})" if choice else "") + "."]
    return out


def recompress_gates(r: dict) -> list[str]:
    """Each candidate of the re-compression with its window agreement and
    batch-1 p95 (interleaved rounds; over production's, round by round: what
    max_p95_b1_slowdown_vs_production checks), and its failed gates."""
    v, g = r["validate"]["candidates"], r["gates"]["candidates"]
    out = ["| candidate | window agreement | soft agreement | p95 b1 (ms) | speedup over teacher | "
           "p95 b1 over production's | failed gates |", "|---|---|---|---|---|---|---|"]
    for name, m in v.items():
        failed = ", ".join(f"{k} {x['value']:.4g} (threshold {x['threshold']:.4g})"
                           for k, x in g[name]["gates"].items() if not x["passed"] and x.get("enforced", True))
        out.append(f"| {name} | {(m.get('agreement') or {}).get('window_heldout')} | "
                   f"{(m.get('soft_agreement') or {}).get('window_heldout')} | {m['latency_ms_p95_b1']:.3f} | "
                   f"{m.get('speedup_p95_b1')} | {m.get('p95_b1_ratio_vs_production', 'n/a')} | "
                   f"{failed or 'none'} |")
    return out


def speed_lines() -> list[str]:
    """The monitor at 1,000 and 10,000 rows, from ``bench/monitor_speed.py``'s
    results (its own run, date and deployed state: it measures one monitor
    run on a larger log than this benchmark's windows); none without them."""
    path = RESULTS / "monitor_speed.json"
    if not path.is_file():
        return []
    sp = json.loads(path.read_text())
    cells = []
    for rows, runs in sorted(sp["speed"].items(), key=lambda kv: int(kv[0])):
        cli_s = (sp.get("cli") or {}).get(rows, {})
        end_to_end = cli_s.get("ephemeral_s", []) + cli_s.get("server_s", [])
        cells.append(f"{int(rows):,} rows: {runs['cold']['run_s']:.1f} s cold, {runs['warm']['run_s']:.1f} s warm"
                     + (f" ({min(end_to_end):.1f}-{max(end_to_end):.1f} s as `shrinkflow monitor --report-only` "
                        "end to end)" if end_to_end else ""))
    return [f"- Monitor run seconds at 1,000 and 10,000 logged rows (`bench/monitor_speed.py`, its own run of "
            f"{sp['measured_at'][:16].replace('T', ' ')} UTC on {sp['machine'].split(',')[0]}, production "
            f"{sp['version']}, teacher shadow sample included; `monitor_speed.md`): " + "; ".join(cells) + "."]


def markdown(doc: dict, models: list[str]) -> str:
    """bench/results/monitoring.md from the results document."""
    tw, mv = doc["eval"]["recovery_tweets"], doc["eval"]["movie_test"]
    t0, p0, p1, t2, p2 = models[:5]
    gap = tw[t0] - tw[p0]
    recovered = (tw[p1] - tw[p0]) / gap if gap > 0 else float("nan")
    r, rt = doc["recompress"], doc["retrain"]
    w = r.get("window") or {}
    noise, extra = [], []
    if doc.get("gain_noise"):
        g = doc["gain_noise"]
        noise = [f"How noisy the gain gate is: on the {g['texts']} recovery tweets, production and the re-distilled "
                 f"student disagree on whether they match the teacher on {g['discordant']:.1%} of texts, and the "
                 f"student's agreement is {g['gain'] * 100:+.1f} points higher. The gain measured on n held-out "
                 "texts then has a standard error of sqrt((discordant - gain^2) / n): "
                 + ", ".join(f"{v:.3f} at n = {n}" for n, v in g["se_at"].items())
                 + f" (min_window_agreement_gain {doc['gates']['min_window_agreement_gain']})."]
        if g.get("soft"):
            noise[-1] += (f" On soft agreement (what the gate measures with window_agreement_gain_on: "
                          f"{doc['gates'].get('window_agreement_gain_on', 'labels')}) the student's gain there is "
                          f"{g['soft']['gain']:+.4f}, with a standard error of "
                          + ", ".join(f"{v:.4f} at n = {n}" for n, v in g["soft"]["se_at"].items()) + ".")
    if len(models) > 5 and models[5].startswith("re-distilled"):
        c = models[5]
        extra = [f"The re-distilled student ({r.get('redistilled')}), deployed or not, recovered "
                 f"{(tw[c] - tw[p0]) / gap if gap > 0 else float('nan'):.0%} of the gap "
                 f"({tw[p0]:.4f} -> {tw[c]:.4f}); in domain {(mv[c] - mv[p0]) * 100:+.2f} points."]
        rn = doc.get("recovery_noise") or {}
        if "se_recovery" in rn:
            lo, hi = rn["ci95_recovery"]
            extra.append(f"How precisely {rn['texts']} tweets measure that: the two models disagree on being "
                         f"right on {rn['discordant']:.1%} of them, so the accuracy difference "
                         f"({rn['diff'] * 100:+.2f} points) has a standard error of {rn['se_diff'] * 100:.2f} "
                         f"points, and against a gap of {rn['gap'] * 100:.2f} points the recovery "
                         f"({rn['recovery']:.0%}) one of {rn['se_recovery']:.0%}: 95% interval "
                         f"[{lo:.0%}, {hi:.0%}] (`recovery_noise`)."
                         + (f" Computed by {rn['from']}." if rn.get("from") else ""))

    def verdicts(runs: list[dict]) -> str:
        return ", ".join(f"{x['action']}" + (f" ({'+'.join(x['triggers'])})" if x["triggers"] else "") for x in runs)

    seed_note = (f" but every distill step's seed, {doc['distill_seed']}: on the AMD EPYC seed 0's student misses its "
                 "test confirmation by 0.04 points and the int8 teacher is deployed, which leaves no student to "
                 "re-distil" if doc.get("distill_seed") is not None else "")
    if doc.get("retrain_keep_share"):
        seed_note += (f"; train.retrain_keep_share {doc['retrain_keep_share']:g}: the retrained teacher's weights "
                      "averaged with the kept teacher's")
    lines = ["# Monitoring, re-compression and retrain on the real models", "",
             f"Measured {doc['measured_at']} on {doc['machine']}, by `bench/monitoring.py` in a git+DVC copy of the "
             f"checkout (default params{seed_note}; windows of {doc['window_rows']} rows, cooldown 0). Traffic went through "
             "`shrinkflow serve`.", "",
             "## Verdicts", "",
             f"- In domain, 5 windows of {doc['window_rows']} movie-review sentences: {verdicts(doc['in_domain'])}.",
             f"- Shifted, 5 windows of {doc['window_rows']} tweets: {verdicts(doc['shifted'])}.",
             f"- Monitor run seconds (report only, {doc['window_rows']} rows): "
             + ", ".join(str(x["seconds"]) for x in doc["in_domain"] + doc["shifted"]) + ".",
             *speed_lines(), "",
             "| window | " + " | ".join(sorted({k for x in doc['in_domain'] for k in x['findings']})) + " |",
             "|---|" + "---|" * len({k for x in doc['in_domain'] for k in x['findings']})]
    keys = sorted({k for x in doc["in_domain"] for k in x["findings"]})
    for name, runs in (("in domain", doc["in_domain"]), ("shifted", doc["shifted"])):
        for i, x in enumerate(runs):
            lines.append(f"| {name} {i + 1} | " + " | ".join(
                "n/a" if x["findings"].get(k) is None else f"{x['findings'][k]:.3f}" for k in keys) + " |")
    lines += ["", "## Cost", "",
              f"- Full `shrinkflow run`: {doc['run_s']} s.",
              f"- Monitor + re-compression: {r['seconds_with_monitor']} s "
              f"({r['seconds_with_monitor'] / doc['run_s']:.0%} of the full run; the report-only monitor runs "
              f"above took {np.median([x['seconds'] for x in doc['shifted']]):.1f} s median).",
              *([f"- The re-compression alone (its Prefect subflow: window snapshot, DVC stages, deploy; not the "
                 f"monitor's reports and decision before it): {r['recompress_s']} s "
                 f"({r['recompress_s'] / doc['run_s']:.0%} of the full run); stages: "
                 + ", ".join(f"{k} {v} s" for k, v in r.get("stages_s", {}).items()) + "."]
                if r.get("recompress_s") else []),
              f"- Monitor + retrain: {rt['seconds_with_monitor']} s.", "",
              "## Re-compression", "",
              f"Verdict {r['action']} ({', '.join(r['triggers'])}); production {r['deployed_before']} -> "
              f"{r['deployed_after']}; train re-run {r['train_rerun']}. Selection: {r['gates'].get('reason')}.", "",
              *([f"The re-compression's texts: the newest {w.get('corpus_rows')} logged rows up to the window "
                 f"(monitor.recompress_last_n {doc['params_monitor'].get('recompress_last_n')}): "
                 f"{w['rows_distill']} distinct texts distilled, {w['rows_heldout']} held out "
                 f"(heldout_fraction {doc['params_monitor']['heldout_fraction']}).", ""] if w else []),
              *([f"The WiSE-FT share kept of the production student, chosen on val: "
                 f"{r['interpolation']['warm_start_interpolation']} (tried: "
                 + ", ".join(f"{t['keep']} -> val accuracy {t['val_accuracy']:.4f}"
                             for t in r['interpolation']['warm_start_interpolation_choice']['tried'])
                 + f"; production student {r['interpolation']['warm_start_interpolation_choice']['production_val_accuracy']:.4f}"
                 + (f", teacher {r['interpolation']['warm_start_interpolation_choice']['teacher_val_accuracy']:.4f}"
                    if "teacher_val_accuracy" in r['interpolation']['warm_start_interpolation_choice'] else "")
                 + f"; scored {r['interpolation']['warm_start_interpolation_choice'].get('scored', 'fp32')}"
                 f", within the bounds: {r['interpolation']['warm_start_interpolation_choice']['met']}).", ""]
                if (r.get("interpolation") or {}).get("warm_start_interpolation_choice") else []),
              *recompress_gates(r), "", *noise, "",
              "## Retrain", "",
              f"Verdict {rt['action']} ({', '.join(rt['triggers'])}); production {rt['deployed_before']} -> "
              f"{rt['deployed_after']}; train re-run {rt['train_rerun']}. Selection: {rt['gates'].get('reason')}.",
              "", *retrain_lines(rt), *([""] if "validate" in rt else []), "## Accuracy", "",
              f"On {doc['eval']['recovery_tweets_n']} recovery-set tweets (never sent as traffic) and the "
              f"{doc['eval']['movie_test_n']} movie-review test sentences, each model scored as served"
              + (" (one text per call for a batch-dependent model, the dynamic-int8 ones: as `shrinkflow serve` "
                 "answers and validate scores them)" if doc["eval"].get("scored") else
                 " (in batches of 32: runs before 2026-12-02T14:45 scored dynamic-int8 models so, which moves "
                 "their labels)") + ":", "",
              "| model | tweets accuracy | movie test accuracy |", "|---|---|---|",
              *[f"| {m} | {tw[m]:.4f} | {mv[m]:.4f} |" for m in models], "",
              f"Re-compression recovered {recovered:.0%} of the production model's accuracy gap to the teacher on "
              f"the tweets ({tw[p0]:.4f} -> {tw[p1]:.4f}, teacher {tw[t0]:.4f}); in domain "
              f"{(mv[p1] - mv[p0]) * 100:+.2f} points.", *extra,
              f"After the retrain, the production model scores {tw[p2]:.4f} on the tweets against the old teacher's "
              f"{tw[t0]:.4f} (new teacher {tw[t2]:.4f}); in domain {(mv[p2] - mv[p0]) * 100:+.2f} points against "
              f"the first production model"
              + (f", {(mv[p2] - mv[p1]) * 100:+.2f} against the model it replaced (the re-compression's)"
                 if p1 != p0 and doc["recompress"]["deployed_after"] != doc["recompress"]["deployed_before"] else "")
              + f"; the new teacher {(mv[t2] - mv[t0]) * 100:+.2f} against the old."]
    rs = next((m for m in models if m.startswith("retrain's student")), None)
    if rs:
        lines.append(f"The retrain's student, refused by its gates (see above), scores {tw[rs]:.4f} on the tweets "
                     f"(old teacher {tw[t0]:.4f}, deployed {tw[p2]:.4f}) and {(mv[rs] - mv[p0]) * 100:+.2f} points "
                     "in domain on test against the first production model.")
    dn = doc.get("domain_noise")
    if dn:
        lines += ["", f"In domain on the {dn['n_test'] + dn['n_reference']:,} movie-review sentences of the test "
                  f"split and the monitor's drift reference ({dn['n_test']:,} + {dn['n_reference']:,}; neither "
                  "trained on nor used to choose), each difference paired on the same sentences, in points, with "
                  "its standard error sqrt((discordant - d^2) / n) (`domain_noise`):", "",
                  "| models | difference | standard error | 95% interval | at most 0.5 lost |",
                  "|---|---|---|---|---|"]
        for pair, x in dn["pairs"].items():
            lo, hi = x["ci95_points"]
            verdict = "met" if lo >= -0.5 else "missed" if hi < -0.5 else "not resolved"
            lines.append(f"| {pair} | {x['diff_points']:+.2f} | {x['se_points']:.2f} | [{lo:+.2f}, {hi:+.2f}] | "
                         f"{verdict} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if "--markdown-only" in sys.argv:
        # bench/results/monitoring.md again from monitoring.json (its prose, not its figures)
        saved = json.loads((RESULTS / "monitoring.json").read_text())
        (RESULTS / "monitoring.md").write_text(markdown(saved, list(saved["eval"]["recovery_tweets"])) + "\n")
    elif "--retrain-files" in sys.argv:
        # a run whose retrain was not yet recorded whole: its candidates and students from the project it
        # left (nothing runs after the retrain), then the markdown again
        saved = json.loads((RESULTS / "monitoring.json").read_text())
        saved["retrain"].update(retrain_files())
        (RESULTS / "monitoring.json").write_text(json.dumps(saved, indent=2) + "\n")
        (RESULTS / "monitoring.md").write_text(markdown(saved, list(saved["eval"]["recovery_tweets"])) + "\n")
    elif "--rescore" in sys.argv:
        sys.path.insert(0, str(ROOT))
        score(json.loads((RESULTS / "monitoring.json").read_text()))
    else:
        main()
