"""Benchmark the main job: full run, no-op rerun, compress-only rerun.

Runs the default params.yaml in a fresh git+DVC copy of the project (so the
full run really runs every stage), with Prefect in its ephemeral mode, and
writes bench/results/lifecycle.{md,json}. Teacher and candidate figures come
from the same validate stage: measured side by side, one after the other, in
one run on one machine.

    .venv/bin/python bench/lifecycle.py
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import time

import yaml
from _common import RESULTS, ROOT, now_utc

WORK = ROOT / "bench" / "work" / "project"


def copy_project() -> None:
    shutil.rmtree(WORK.parent, ignore_errors=True)
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        # No dvc.lock and no committed stage outputs: the full run runs every stage.
        if (ROOT / rel).is_file() and not rel.startswith(("bench/results", "metrics/", "reports/", "deploy/")) \
                and rel != "dvc.lock":
            (WORK / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, WORK / rel)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=WORK, check=True)
    subprocess.run(git + ["add", "-A"], cwd=WORK, check=True)
    subprocess.run(git + ["commit", "-qm", "bench copy"], cwd=WORK, check=True)


def timed_run(label: str) -> tuple[float, str]:
    print(f"--- {label}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=WORK, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (WORK.parent / f"{label}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        sys.exit(f"{label} failed (exit {proc.returncode}); see {WORK.parent / (label + '.log')}\n"
                 + proc.stdout[-3000:] + proc.stderr[-3000:])
    stages = next(line for line in proc.stdout.splitlines() if line.startswith("stages: "))
    print(f"{label}: {wall:.1f}s  {stages}", flush=True)
    return wall, stages[len("stages: "):]


def main() -> None:
    copy_project()
    full, full_stages = timed_run("full")
    validated = json.loads((WORK / "metrics/validate.json").read_text())
    gates = json.loads((WORK / "reports/gates.json").read_text())
    train = json.loads((WORK / "metrics/train.json").read_text())
    built = json.loads((WORK / "metrics/compress.json").read_text())["candidates"]
    deployment = json.loads((WORK / "deploy/deployment.json").read_text())
    noop, noop_stages = timed_run("noop")
    params = yaml.safe_load((WORK / "params.yaml").read_text())
    step = params["compress"]["candidates"][0]["recipe"][0]
    step["per_channel"] = flipped = not step.get("per_channel", False)
    (WORK / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    comp, comp_stages = timed_run("compress_only")
    rebuilt = json.loads((WORK / "metrics/compress.json").read_text())["candidates"]

    chosen = gates["selected"]
    conf = validated["confirmation"]
    t = {**validated["teacher"], **conf["teacher"]}
    c = {**validated["candidates"][chosen], **conf["metrics"]}
    keys = ["accuracy", "f1", "latency_ms_p50_b1", "latency_ms_p95_b1", "latency_ms_p50_b32",
            "latency_ms_p95_b32", "throughput_eps_b32", "size_mb", "peak_rss_mb", "cpu_ms_per_prediction_b1",
            "cpu_ms_per_prediction_b32"]
    higher_is_better = {"accuracy", "f1", "throughput_eps_b32"}
    rows = []
    for k in keys:
        ratio = c[k] / t[k] if k in higher_is_better else t[k] / c[k]
        rows.append(f"| {k} | {t[k]:.4g} | {c[k]:.4g} | {ratio:.2f}x |")
    vt = validated["teacher"]
    cand_rows = []
    for n, m in validated["candidates"].items():
        g = gates["candidates"][n]["gates"]
        failed = ", ".join(f"{k} ({d['margin']:+.4g})" for k, d in g.items() if not d["passed"]) or "pass"
        cand_rows.append(f"| {n} | {m['accuracy']:.4f} | {100 * m['accuracy_drop']:+.2f} | "
                         f"{m['latency_ms_p95_b1']:.2f} | {vt['latency_ms_p95_b1'] / m['latency_ms_p95_b1']:.2f}x | "
                         f"{m['size_mb']:.1f} | {vt['size_mb'] / m['size_mb']:.2f}x | "
                         f"{built[n]['build_seconds']:.0f} ({built[n].get('build_cpu_seconds') or 0:.0f}) | {failed} |")
    doc = {"when": now_utc(), "machine": platform.machine(),
           "python": platform.python_version(),
           "cpu": __import__("shrinkflow.lineage", fromlist=["cpu_model"]).cpu_model(),
           "wall_s": {"full": full, "noop": noop, "compress_only": comp},
           "stages": {"full": full_stages, "noop": noop_stages, "compress_only": comp_stages},
           "train": train, "teacher": t, "deployed": chosen, "candidate": c, "validate": validated,
           "gates": gates, "compress": built, "compress_after_change": rebuilt, "roi": deployment.get("roi")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lifecycle.json").write_text(json.dumps(doc, indent=2) + "\n")
    from shrinkflow.artifacts import CostReturn
    from shrinkflow.markdown import roi_markdown

    md = [
        "# Lifecycle benchmark (default params.yaml)", "",
        f"Measured {doc['when']} on this project's 2-core CPU machine ({doc['cpu']}), Python {doc['python']}; "
        "threads pinned to 2 for training and for every latency figure.", "",
        "## Wall time of `shrinkflow run` (fresh git+DVC copy, ephemeral Prefect)", "",
        "| run | wall (s) | stages |", "|---|---|---|",
        f"| full lifecycle | {full:.1f} | {full_stages} |",
        f"| no-op rerun | {noop:.1f} | {noop_stages} |",
        f"| compress-only change (`int8` gets `per_channel: {str(flipped).lower()}`) | {comp:.1f} | {comp_stages} |", "",
        f"Targets: full run within 600 s: {'MET' if full <= 600 else 'MISSED'} ({full:.0f} s); no-op rerun within "
        f"15 s: {'MET' if noop <= 15 else 'MISSED'} ({noop:.1f} s). After the compress-only change, rebuilt: "
        + ", ".join(f"{n} ({'copied from the build cache' if r['cached'] else 'built'})" for n, r in rebuilt.items())
        + ".", "",
        f"Teacher training: {train['train_seconds']:.0f}s for {len(train['val_accuracy_by_epoch'])} epochs "
        f"(val accuracy by epoch {train['val_accuracy_by_epoch']}, best epoch {train['best_epoch']}).", "",
        f"## Every candidate on val (n={vt['n']}), timed interleaved with the teacher", "",
        "| candidate | accuracy | drop (points) | p95 b1 ms | faster than torch teacher | MB | smaller | "
        "build s (CPU-s) | gates |", "|---|---|---|---|---|---|---|---|---|", *cand_rows, "",
        f"Teacher on val: accuracy {vt['accuracy']:.4f}, p95 b1 {vt['latency_ms_p95_b1']:.2f} ms, "
        f"{vt['size_mb']:.1f} MB. Selection: {gates['reason']}", "",
        f"## Teacher (fp32, torch eager) vs deployed candidate `{chosen}`, test split (n={t['n']})", "",
        "The candidate was gated and selected on the val split; accuracy and F1 here are its test-split "
        "confirmation, on the same sentences as the teacher's.", "",
        "Ratio: teacher / candidate for costs, candidate / teacher for accuracy, F1 and throughput.", "",
        f"| metric | teacher | {chosen} | ratio |", "|---|---|---|---|", *rows, "",
        f"Accuracy drop on test: {100 * c['accuracy_drop']:+.2f} points, {c['confidence']:.0%} interval "
        f"[{100 * c['accuracy_drop_ci_low']:+.2f}, {100 * c['accuracy_drop_ci_high']:+.2f}] (paired), "
        f"McNemar p = {c['mcnemar_p']:.3g}; teacher agreement {c['agreement']:.4f}.", "",
        roi_markdown(CostReturn.model_validate(deployment["roi"]) if deployment.get("roi") else None),
        "Latency is the wall time of one `predict_logits` call (tokenize + forward), warm-up excluded, every "
        "model timed in alternating rounds over the same minutes (validate.latency). CPU ms per prediction "
        "is the measuring process's CPU time (every thread) over the timed calls. Size = every file needed "
        "to serve (weights + tokenizer + manifest). Peak RSS = VmHWM of the process that loads the model and "
        "runs the whole measurement (an ONNX candidate's process never imports torch).",
    ]
    (RESULTS / "lifecycle.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
