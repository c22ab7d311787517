"""The monitoring loop on the real models: drift found, re-compression from
the kept teacher, and what re-compressing on the window bought.

In a git+DVC copy of this checkout (its teacher, candidates and registry), with
the default candidates (a distilled student is added only if they have none):
  1. `shrinkflow run` builds the candidates without any production window;
  2. `shrinkflow serve` answers traffic: first movie-review test sentences
     (the domain it was trained on), then tweets from the traffic pool of
     Hutto & Gilbert's tweet set (shipped in the same pinned archive, used by
     no stage; `shrinkflow.traffic.shifted_split`, the pool that
     `shrinkflow simulate-traffic --domain shifted` sends), with feedback
     labels for some of them;
  3. `shrinkflow monitor --report-only` after the in-domain traffic, then
     `shrinkflow monitor` after the tweets: the verdicts, the figures, and the
     re-compression it starts (train skipped, window distilled);
  4. every candidate before and after re-compression, and the teacher, on
     1,000 tweets of the recovery set, which is never sent as traffic:
     accuracy and agreement with the teacher, side by side in one process.
Writes bench/results/monitoring.{md,json}.

    .venv/bin/python bench/monitoring.py   # after `shrinkflow run`
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import yaml
from _common import RESULTS, ROOT, now_utc

WORK = ROOT / "bench" / "work" / "monitoring"
PROJECT = WORK / "project"
STUDENT = {"name": "l024-vocab2-int8", "recipe": [
    {"method": "distill", "layers": [0, 2, 4], "epochs": 2},
    {"method": "vocab_prune", "min_count": 2}, {"method": "quantize"}]}
WINDOW_TWEETS, EVAL_TWEETS, FEEDBACK = 600, 1000, 100


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
    for rel in ("data/raw", "data/prepared", "models", "registry", "deploy"):
        if (ROOT / rel).exists():
            shutil.copytree(ROOT / rel, PROJECT / rel, dirs_exist_ok=True)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=PROJECT, check=True)
    subprocess.run(git + ["add", "-A"], cwd=PROJECT, check=True)
    subprocess.run(git + ["commit", "-qm", "bench copy"], cwd=PROJECT, check=True)


def cli(*args: str, check: bool = True) -> tuple[float, str, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=PROJECT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    (WORK / f"{'_'.join(args) or 'cli'}.log").write_text(out)
    if check and proc.returncode not in (0, 1):
        sys.exit(f"shrinkflow {' '.join(args)} failed (exit {proc.returncode}):\n{out[-4000:]}")
    return round(wall, 1), out, proc.returncode


def tweets(part: str) -> tuple[list[str], np.ndarray]:
    """The tweets of one side of the shifted domain ("pool": traffic,
    "recovery": evaluation only), shuffled with seed 0."""
    sys.path.insert(0, str(ROOT))
    from shrinkflow.traffic import shifted_split

    df = shifted_split(ROOT / "data/raw/source.tar.gz")[part]
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


def send(port: int, texts: list[str]) -> list[dict]:
    out = []
    with httpx.Client(timeout=60) as client:
        for i in range(0, len(texts), 8):
            r = client.post(f"http://127.0.0.1:{port}/predict", json={"texts": texts[i:i + 8]})
            r.raise_for_status()
            out += r.json()["predictions"]
    return out


def evaluate(model_dirs: dict[str, Path], texts: list[str], labels: np.ndarray, teacher_key: str) -> dict:
    from shrinkflow.predictors import load_predictor, predict_labels

    preds = {k: predict_labels(load_predictor(d, threads=2), texts) for k, d in model_dirs.items()}
    t = preds[teacher_key]
    return {k: {"accuracy": round(float((p == labels).mean()), 4),
                "agreement_with_teacher": round(float((p == t).mean()), 4)} for k, p in preds.items()}


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from shrinkflow.splits import read_parquet

    from shrinkflow.config import parse_params_yaml
    from shrinkflow.lineage import cpu_model

    copy_project()
    params = parse_params_yaml((PROJECT / "params.yaml").read_bytes(), PROJECT / "params.yaml")
    if not any(s.get("method") == "distill" for c in params["compress"]["candidates"] for s in c["recipe"]):
        params["compress"]["candidates"] = params["compress"]["candidates"] + [STUDENT]
    params["monitor"].update({"window_last_n": WINDOW_TWEETS, "min_window_rows": 200, "shadow_sample_rows": 300})
    (PROJECT / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    names = [c["name"] for c in params["compress"]["candidates"]]

    print("--- shrinkflow run (no window)", flush=True)
    run_s, out, code = cli("run")
    v_before = json.loads((PROJECT / "deploy/deployment.json").read_text())["version"] if code == 0 else None
    before = WORK / "candidates_before"
    shutil.copytree(PROJECT / "models/candidates", before)

    # Window from the traffic pool, evaluation from the recovery set: the two
    # never share a tweet (shrinkflow.traffic.shifted_part).
    texts, labels = tweets("pool")
    window, w_labels = texts[:WINDOW_TWEETS], labels[:WINDOW_TWEETS]
    held, h_labels = tweets("recovery")
    held, h_labels = held[:EVAL_TWEETS], h_labels[:EVAL_TWEETS]
    in_domain = read_parquet(PROJECT / "data/prepared/test.parquet")["text"].tolist()[:WINDOW_TWEETS]

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = serve(port)
    try:
        print("--- in-domain traffic, then monitor --report-only", flush=True)
        send(port, in_domain)
        mon_a_s, out_a, _ = cli("monitor", "--report-only")
        print("--- tweets, feedback, then monitor", flush=True)
        answers = send(port, window)
        with httpx.Client(timeout=30) as client:
            for a, y in zip(answers[:FEEDBACK], w_labels[:FEEDBACK]):
                client.post(f"http://127.0.0.1:{port}/feedback",
                            json={"prediction_id": a["prediction_id"], "label": int(y)}).raise_for_status()
        mon_b_s, out_b, code_b = cli("monitor")
        time.sleep(3)  # the server polls the alias
        served_after = httpx.get(f"http://127.0.0.1:{port}/health").json()["model_version"]
    finally:
        server.terminate()
        server.wait(timeout=60)

    def verdict(out: str) -> str:
        return next((line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("verdict: ")), "?")

    def reasons(out: str) -> list[str]:
        return [line.strip()[2:] for line in out.splitlines() if line.startswith("  - ")]

    reg_dir = PROJECT / params["deploy"]["registry_dir"]
    aliases = json.loads((reg_dir / "aliases.json").read_text())
    v_after = aliases["production"]
    manifest = json.loads((reg_dir / "versions" / v_after / "manifest.json").read_text())
    validate = json.loads((PROJECT / "metrics/validate.json").read_text())
    dirs = {"teacher (fp32)": PROJECT / "models/teacher",
            **{f"{n} before": before / n for n in names},
            **{f"{n} after": PROJECT / "models/candidates" / n for n in names}}
    on_tweets = evaluate(dirs, held, h_labels, "teacher (fp32)")
    movie = read_parquet(PROJECT / "data/prepared/test.parquet")
    on_movies = evaluate(dirs, movie["text"].tolist(), movie["label"].to_numpy(), "teacher (fp32)")
    doc = {"when": now_utc(), "cpu": cpu_model(),
           "run_s": run_s, "deployed_before": v_before,
           "monitor_in_domain": {"seconds": mon_a_s, "verdict": verdict(out_a), "reasons": reasons(out_a)},
           "monitor_tweets": {"seconds_with_recompression": mon_b_s, "verdict": verdict(out_b),
                              "reasons": reasons(out_b), "exit": code_b,
                              "train_rerun": "Running stage 'train'" in out_b,
                              "compress_rerun": "Running stage 'compress'" in out_b},
           "deployed_after": v_after, "served_after": served_after,
           "lineage_window": manifest["lineage"].get("window"),
           "window_heldout_agreement": {n: validate["candidates"][n]["agreement"].get("window_heldout")
                                        for n in names},
           "selection_after": json.loads((PROJECT / "reports/gates.json").read_text())["reason"],
           "eval_tweets": on_tweets, "movie_test": on_movies, "eval_tweets_n": len(held)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitoring.json").write_text(json.dumps(doc, indent=2) + "\n")

    rows = [f"| {k} | {on_tweets[k]['accuracy']:.4f} | {on_tweets[k]['agreement_with_teacher']:.4f} | "
            f"{on_movies[k]['accuracy']:.4f} |" for k in dirs]
    w = doc["lineage_window"] or {}
    md = ["# Monitoring and re-compression on the real models", "",
          f"Measured {doc['when']} on this project's 2-core machine ({doc['cpu']}), by `bench/monitoring.py` in a "
          f"git+DVC copy of the checkout, candidates {', '.join(f'`{n}`' for n in names)}. Traffic went through `shrinkflow serve`: 600 movie-review test sentences, then 600 tweets "
          f"from the traffic pool of Hutto & Gilbert's tweet set (in the same pinned archive, used by no stage) with "
          f"{FEEDBACK} feedback labels.", "",
          "| step | seconds | verdict |", "|---|---|---|",
          f"| `shrinkflow run` (candidates built without a window; deployed {v_before}) | {run_s} | |",
          f"| `shrinkflow monitor --report-only` after in-domain traffic | {mon_a_s} | {doc['monitor_in_domain']['verdict']} |",
          f"| `shrinkflow monitor` after the tweets, re-compression included | {mon_b_s} | "
          f"{doc['monitor_tweets']['verdict']} |", "",
          "Why, after the tweets:", "", *[f"- {r}" for r in doc["monitor_tweets"]["reasons"]], "",
          f"Re-compression: train re-run: {doc['monitor_tweets']['train_rerun']}; compress re-run: "
          f"{doc['monitor_tweets']['compress_rerun']}; production {v_before} -> {v_after} (the running server "
          f"answered with {served_after} afterwards); {doc['selection_after']}. Lineage window: "
          f"{w.get('rows_distill')} texts distilled, {w.get('rows_heldout')} held out, md5 {w.get('texts_md5')}, "
          f"monitor run {w.get('monitor_flow_run')}, triggers {w.get('triggers')}.", "",
          "Agreement with the teacher on the held-out window (the new gate, "
          f"min {params['validate']['gates'].get('min_window_agreement', 0.9)}): "
          + ", ".join(f"{n} {a}" for n, a in doc["window_heldout_agreement"].items()) + ".", "",
          f"Every model on {len(held)} tweets of the recovery set, never sent as traffic (labels from the human "
          "ratings), and on the movie-review test split:", "",
          "| model | tweets accuracy | tweets agreement with teacher | movie test accuracy |", "|---|---|---|---|",
          *rows, ""]
    (RESULTS / "monitoring.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
