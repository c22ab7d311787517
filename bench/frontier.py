"""Run the frontier (small-direct baseline, robustness, verdict) on the sweep.

Needs `bench/compression.py --sweep` to have run first: it reuses that
workspace's teacher and sweep candidates through DVC (without --sweep that
workspace holds the default candidates, and this reports on those instead;
`dvc repro frontier` does the same in the project itself), brings in this checkout's code,
then runs `dvc repro -s small_direct` and `dvc repro -s frontier` there and
copies the report, plot and figures to bench/results/.

    .venv/bin/python bench/frontier.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "compression"
RESULTS = ROOT / "bench" / "results"
CODE = ("shrinkflow/", "stages/", "tasks/", "flows/", "dvc.yaml")


def main() -> None:
    if not (WORK / "metrics" / "validate.json").is_file():
        sys.exit("run bench/compression.py --sweep first")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith(CODE) and (ROOT / rel).is_file():
            (WORK / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, WORK / rel)
    sys.path.insert(0, str(ROOT))
    from shrinkflow.dvcrun import offline_env

    for stage in ("small_direct", "frontier"):
        proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=WORK,
                              env=offline_env(), capture_output=True, text=True)
        (WORK / f"{stage}.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            sys.exit(f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for src, dst in (("reports/frontier.md", "frontier.md"), ("reports/frontier.png", "frontier.png"),
                     ("metrics/frontier.json", "frontier.json"), ("metrics/small_direct.json", "small_direct.json")):
        shutil.copyfile(WORK / src, RESULTS / dst)
    doc = json.loads((WORK / "metrics" / "frontier.json").read_text())
    print((WORK / "reports" / "frontier.md").read_text())
    for r in doc["verdict"]:
        if r["winner"]:
            lat = r["key"] == "latency_ms_p95_b1"
            print(f"{r['budget']}: {r['winner']} {r['points_in_domain']:+.2f} pts in domain "
                  f"(target >= 5: {'MET' if r['points_in_domain'] >= 5 else 'MISSED'}), "
                  f"{r['points_shifted']:+.2f} shifted (target >= 8: "
                  f"{'MET' if r['points_shifted'] >= 8 else 'MISSED'})" + ("" if lat else " [size budget]"))


if __name__ == "__main__":
    main()
