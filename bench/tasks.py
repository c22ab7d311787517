"""Both tasks side by side: the built-in sentiment task and Reuters R8.

``run`` runs the whole lifecycle of one task (``shrinkflow run [--params P]``)
in a project directory, times it, and appends one record to
``bench/results/tasks.jsonl``:

- teacher accuracy and macro-F1 on the test split;
- the deployed candidate's size and p95 batch-1 latency against the torch
  teacher's, both from validate's interleaved timing rounds (the teacher and
  every candidate timed in alternating rounds in the same process, so the
  speedup is a same-run ratio);
- the paired accuracy drop and the macro-F1 drop on test (teacher minus the
  deployed candidate, the same texts);
- the full run's wall time, the CPU, the commit.

``report`` writes ``bench/results/tasks.md`` from the newest record of each
task, with the issue's targets for R8 (run within 15 min; deployed model at
least 4x smaller and 4x faster at p95 batch 1; at most 1 point accuracy and 2
points macro-F1 drop).

Usage:
    python bench/tasks.py run --task builtin --project DIR
    python bench/tasks.py run --task reuters --project DIR --params params/reuters.yaml
    python bench/tasks.py report
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
JSONL = RESULTS / "tasks.jsonl"
MD = RESULTS / "tasks.md"
TARGETS = {"wall_minutes": 15.0, "size_ratio": 4.0, "speedup_p95_b1": 4.0,
           "accuracy_drop_points": 1.0, "macro_f1_drop_points": 2.0}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record(project: Path, task: str, wall_s: float, rc: int, started: float) -> dict:
    """One task's figures from its project's metrics after a run; a failed
    run that wrote no metrics of its own (``started``: its start, as
    ``time.time()``) records only its exit code and wall time, never the
    figures an earlier run left."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project,
                            capture_output=True, text=True).stdout.strip()
    metrics = project / "metrics/validate.json"
    if rc != 0 and (not metrics.is_file() or metrics.stat().st_mtime < started):
        return {"task": task, "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "commit": commit,
                "rc": rc, "wall_s": round(wall_s, 1), "deployed": None, "failed": "before validate"}
    validate = json.loads(metrics.read_text())
    gates = json.loads((project / "reports/gates.json").read_text())
    teacher, conf = validate["teacher"], validate["confirmation"] or {}
    chosen = gates["selected"] if rc == 0 else None  # deploy refuses what validate did not select
    rec = {"task": task, "date": datetime.date.today().isoformat(), "cpu": cpu_model(),
           "commit": commit,
           "rc": rc, "wall_s": round(wall_s, 1), "labels": validate.get("labels"),
           "teacher_accuracy_test": conf.get("teacher", {}).get("accuracy"),
           "teacher_macro_f1_test": conf.get("teacher", {}).get("macro_f1"),
           "teacher_size_mb": teacher["size_mb"], "teacher_p95_b1_ms": teacher["latency_ms_p95_b1"],
           "deployed": chosen}
    if chosen and chosen in validate["candidates"]:
        cand, m = validate["candidates"][chosen], conf.get("metrics", {})
        rec.update({"size_mb": cand["size_mb"], "p95_b1_ms": cand["latency_ms_p95_b1"],
                    "size_ratio": round(teacher["size_mb"] / cand["size_mb"], 2),
                    "speedup_p95_b1": cand.get("speedup_p95_b1"),
                    "accuracy_test": m.get("accuracy"), "macro_f1_test": m.get("macro_f1"),
                    "accuracy_drop_test": m.get("accuracy_drop"),
                    "accuracy_drop_ci": [m.get("accuracy_drop_ci_low"), m.get("accuracy_drop_ci_high")],
                    "macro_f1_drop_test": m.get("macro_f1_drop"),
                    "macro_f1_drop_ci": [m.get("macro_f1_drop_ci_low"), m.get("macro_f1_drop_ci_high")]})
    return rec


def run(args) -> int:
    project = args.project.resolve()
    cmd = [str(Path(sys.executable).with_name("shrinkflow")), "run"]
    if args.params:
        cmd += ["--params", str(args.params)]
    env = {**os.environ, "PYTHONPATH": str(project)}
    started, t0 = time.time(), time.perf_counter()
    rc = subprocess.run(cmd, cwd=project, env=env).returncode
    wall = time.perf_counter() - t0
    rec = record(project, args.task, wall, rc, started)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(JSONL, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    print(json.dumps(rec, indent=2))
    return rc


def _f(v, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def report(_args) -> int:
    newest: dict[str, dict] = {}
    failed: dict[str, dict] = {}   # a run newer than the task's newest figures that failed before them
    for line in JSONL.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("failed"):
                failed[rec["task"]] = rec
            else:
                newest[rec["task"]] = rec
                failed.pop(rec["task"], None)
    rows = [
        ("classes", lambda r: str(len(r["labels"] or []))),
        ("teacher accuracy (test)", lambda r: _f(r["teacher_accuracy_test"], ".4f")),
        ("teacher macro-F1 (test)", lambda r: _f(r["teacher_macro_f1_test"], ".4f")),
        ("deployed candidate", lambda r: r["deployed"] or "none"),
        ("size, MB (teacher / deployed)", lambda r: f"{r['teacher_size_mb']:.1f} / {_f(r.get('size_mb'), '.1f')}"),
        ("size ratio (target for R8: >= 4x)", lambda r: _f(r.get("size_ratio"), ".1f") + "x"),
        ("p95 batch-1 latency, ms (torch teacher / deployed, interleaved)",
         lambda r: f"{r['teacher_p95_b1_ms']:.2f} / {_f(r.get('p95_b1_ms'), '.2f')}"),
        ("speedup at p95 batch 1 (target: >= 4x)", lambda r: _f(r.get("speedup_p95_b1"), ".1f") + "x"),
        ("accuracy drop, points (test, paired; target <= 1)",
         lambda r: _f(None if r.get("accuracy_drop_test") is None else 100 * r["accuracy_drop_test"], "+.2f")
         + ("" if r.get("accuracy_drop_test") is None else
            f" [{100 * r['accuracy_drop_ci'][0]:+.2f}, {100 * r['accuracy_drop_ci'][1]:+.2f}]")),
        ("macro-F1 drop, points (test; target <= 2)",
         lambda r: _f(None if r.get("macro_f1_drop_test") is None else 100 * r["macro_f1_drop_test"], "+.2f")
         + ("" if r.get("macro_f1_drop_test") is None or r["macro_f1_drop_ci"][0] is None else
            f" [{100 * r['macro_f1_drop_ci'][0]:+.2f}, {100 * r['macro_f1_drop_ci'][1]:+.2f}]")),
        ("full run, wall (target for R8: <= 15 min)", lambda r: f"{r['wall_s'] / 60:.1f} min"),
        ("commit / CPU", lambda r: f"{r['commit']} / {r['cpu']}"),
    ]
    tasks = [t for t in ("builtin", "reuters") if t in newest] + [t for t in newest if t not in ("builtin", "reuters")]
    names = {"builtin": "built-in: movie-review sentiment (2 classes)", "reuters": "Reuters-21578 R8 (8 topics)"}
    lines = ["# Both tasks side by side", "",
             "Written by `python bench/tasks.py report` from `bench/results/tasks.jsonl`; each column is one",
             "full `shrinkflow run` (`python bench/tasks.py run ...`) on this machine's 2 cores. Latencies are",
             "validate's interleaved rounds (torch teacher and candidates alternate in one process), so the",
             "speedup is a same-run ratio; drops are teacher minus deployed on the same test texts, with 95%",
             "intervals (paired normal for accuracy, bootstrap for macro-F1).", "",
             "| | " + " | ".join(names.get(t, t) for t in tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for title, fn in rows:
        lines.append(f"| {title} | " + " | ".join(fn(newest[t]) for t in tasks) + " |")
    if "reuters" in newest:
        r = newest["reuters"]
        checks = {"full run <= 15 min": r["wall_s"] / 60 <= TARGETS["wall_minutes"],
                  ">= 4x smaller": (r.get("size_ratio") or 0) >= TARGETS["size_ratio"],
                  ">= 4x faster at p95 batch 1": (r.get("speedup_p95_b1") or 0) >= TARGETS["speedup_p95_b1"],
                  "<= 1 point accuracy drop": r.get("accuracy_drop_test") is not None
                  and 100 * r["accuracy_drop_test"] <= TARGETS["accuracy_drop_points"],
                  "<= 2 points macro-F1 drop": r.get("macro_f1_drop_test") is not None
                  and 100 * r["macro_f1_drop_test"] <= TARGETS["macro_f1_drop_points"]}
        lines += ["", "R8 targets: " + "; ".join(f"{k}: {'met' if ok else 'MISSED'}" for k, ok in checks.items()) + "."]
    for t, r in failed.items():
        lines += ["", f"The newest run of {names.get(t, t)} ({r['date']}, commit {r['commit']}) failed "
                      f"{r['failed']} (exit {r['rc']}, {r['wall_s']:.0f} s): the figures above are older."]
    MD.write_text("\n".join(lines) + "\n")
    print(MD.read_text())
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--task", required=True)
    r.add_argument("--project", type=Path, default=Path("."))
    r.add_argument("--params", type=Path, default=None)
    sub.add_parser("report")
    args = ap.parse_args(argv)
    return run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
