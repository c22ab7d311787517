"""What a `shrinkflow run` with nothing to do costs, this checkout's code
against a baseline checkout's, side by side in one run.

Each code gets a tiny project of its own (``tests/e2e.py``'s ``TINY`` params:
the random 2-layer teacher, hidden 32, on 600 rows), built by one full run;
then the no-op runs alternate between the two, ``--rounds`` times each, all
against one Prefect API (``prefect_test_harness``: a server start is not
what is compared). Measured per run: wall seconds and the CPU seconds of
the command's whole process tree (``os.times`` of the reaped children), and
the ``stages:`` line, which must be all "skipped" for both.

The change it was written for (``shrinkflow.dvcrun.up_to_date_stages``):
one ``dvc status`` over every stage before the first, instead of a ``dvc
repro --single-item`` process per stage, when DVC finds them up to date.

    git worktree add /tmp/baseline <commit>      # the code to compare against
    .venv/bin/python bench/noop_run.py --baseline /tmp/baseline   # about 3 min on 2 cores

Writes bench/results/noop_run.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import RESULTS, ROOT, stamp  # noqa: E402


def commit_of(path: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True,
                          text=True).stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the code to compare against")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shrinkflow-noop-bench-"))
    os.environ["PREFECT_HOME"] = str(work / "prefect-home")

    from shrinkflow.bootstrap import configure_env

    configure_env(ROOT)
    import tests.e2e as e2e
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    codes = {"baseline": args.baseline.resolve(), "this checkout": ROOT}
    projects = {}
    for name, src in codes.items():
        e2e.PROJECT_ROOT = src          # copy_project copies the tracked files of this checkout
        dest = work / name.replace(" ", "_")
        dest.mkdir()
        e2e.copy_project(dest)
        e2e.write_params(dest / "params.yaml", e2e.TINY)
        projects[name] = dest

    runs: dict[str, list[dict]] = {name: [] for name in codes}
    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()

        def run(name: str) -> dict:
            dest = projects[name]
            env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
            env.update(PREFECT_API_URL=url, PREFECT_HOME=str(dest / ".prefect"))
            t0, r0 = time.perf_counter(), os.times()
            proc = subprocess.run([sys.executable, "-m", "flows.cli", "run"], cwd=dest, env=env,
                                  capture_output=True, text=True, timeout=900)
            r1 = os.times()
            if proc.returncode != 0:
                raise SystemExit(f"{name}: shrinkflow run exited {proc.returncode}:\n{proc.stdout[-3000:]}"
                                 f"{proc.stderr[-3000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("stages: "))
            return {"wall_s": round(time.perf_counter() - t0, 2),
                    "cpu_s": round(r1.children_user - r0.children_user + r1.children_system - r0.children_system, 2),
                    "stages": line[len("stages: "):]}

        full = {name: run(name) for name in codes}
        for _ in range(args.rounds):
            for name in codes:
                r = run(name)
                if set(v.split("=")[1] for v in r["stages"].split(", ")) != {"skipped"}:
                    raise SystemExit(f"{name}: a no-op run did something: {r['stages']}")
                runs[name].append(r)
    shutil.rmtree(work, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    doc = {**stamp(), "baseline_commit": commit_of(codes["baseline"]), "commit": commit_of(ROOT),
           "rounds": args.rounds, "full_run": full, "noop_runs": runs,
           "median": {name: {"wall_s": med(name, "wall_s"), "cpu_s": med(name, "cpu_s")} for name in codes}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "noop_run.json").write_text(json.dumps(doc, indent=2) + "\n")
    b, t = doc["median"]["baseline"], doc["median"]["this checkout"]
    lines = ["# A `shrinkflow run` with nothing to do", "",
             f"Measured {doc['measured_at']} on {doc['machine']}; `bench/noop_run.py --rounds {args.rounds}`: "
             f"this checkout ({doc['commit']}) against {doc['baseline_commit']}, tiny projects (tests/e2e.py TINY), "
             "one Prefect test server, the no-op runs alternating.", "",
             "| code | no-op runs: wall s | CPU s (process tree) | median wall | median CPU "
             "| full first run: wall, CPU |",
             "|---|---|---|---|---|---|"]
    for name in codes:
        lines.append(f"| {name} ({doc['commit'] if name == 'this checkout' else doc['baseline_commit']}) | "
                     f"{', '.join(str(r['wall_s']) for r in runs[name])} | "
                     f"{', '.join(str(r['cpu_s']) for r in runs[name])} | {med(name, 'wall_s')} | "
                     f"{med(name, 'cpu_s')} | {full[name]['wall_s']} s, {full[name]['cpu_s']} s |")
    lines += ["", f"Median no-op run: {t['wall_s'] / b['wall_s']:.2f}x the baseline's wall time, "
                  f"{t['cpu_s'] / b['cpu_s']:.2f}x its CPU. The full runs are one each (not a comparison)."]
    (RESULTS / "noop_run.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
