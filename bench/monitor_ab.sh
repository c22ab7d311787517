#!/usr/bin/env bash
# `shrinkflow monitor --report-only` from two checkouts of the code, alternating, on one
# deployed state: the wall seconds of each run, Prefect's ephemeral API (no PREFECT_API_URL).
#   bench/monitor_ab.sh BEFORE_TREE AFTER_TREE PROJECT [ROUNDS]
# BEFORE_TREE, AFTER_TREE: checkouts (e.g. `git worktree add /tmp/before <commit>`), run with
# this checkout's .venv; PROJECT: a deployed state with a prediction log, e.g.
# bench/work/monitor_speed/project after bench/monitor_speed.py (its window_last_n and log
# as that left them). Each tree has its own PREFECT_HOME, created by its first run.
set -euo pipefail
before=$(realpath "$1"); after=$(realpath "$2"); project=$(realpath "$3"); rounds=${4:-3}
py="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"   # not realpath: the venv is a symlink
cd "$project"
for r in $(seq 1 "$rounds"); do
  for tree in "$before" "$after"; do
    home="$project/.prefect-ab-$(basename "$tree")"
    s=$(date +%s.%N)
    out=$(env -u PREFECT_API_URL PREFECT_HOME="$home" PYTHONPATH="$tree" "$py" -m flows.cli monitor --report-only 2>&1) || true
    e=$(date +%s.%N)
    verdict=$(echo "$out" | grep -m1 '^verdict:' || echo "verdict: NONE (failed)")
    printf '%s round %s: %.2f s, load %s, %s\n' "$tree" "$r" "$(echo "$e - $s" | bc)" "$(cut -d' ' -f1 /proc/loadavg)" "$verdict"
  done
done
