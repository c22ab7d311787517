"""What the end-to-end tests share: the tiny params, a fresh git+DVC copy
of the project, and the real CLI run in it. Not a test module."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import PROJECT_ROOT

TINY = {
    "data": {"max_rows": 600, "max_shifted_rows": 50},
    "train": {"model": {"kind": "random", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                        "intermediate_size": 64},
              "epochs": 6, "batch_size": 16, "learning_rate": 3e-3, "max_seq_len": 32, "threads": 1},
    "frontier": {"small_direct": {"num_layers": 1, "epochs": 2, "learning_rate": 3e-3},
                 "robustness_sparsities": [0.5]},
    # int8 only: the default's student keeps teacher layers 0, 2, 4, which a
    # 2-layer tiny teacher does not have (distillation is tested in test_methods).
    "compress": {"candidates": [{"name": "int8", "recipe": [{"method": "quantize"}]}]},
    "validate": {"gates": {"min_accuracy": 0.0, "max_accuracy_drop": 0.5, "max_latency_ms_p95_b1": 1000.0,
                           "max_size_mb": 100.0, "min_speedup": 0.2,
                           # tiny models time in fractions of a millisecond: noise, not a slowdown
                           # (tests/test_e2e_warm_start.py, which must deploy, turns both off)
                           "max_p95_b1_slowdown_vs_production": 1.0,
                           # tiny models' val accuracies move by points from seed to seed, as the
                           # accuracy drop above (its boundaries: tests/test_gates.py)
                           "max_accuracy_drop_vs_production": 0.5,
                           # beside other tests the machine is never quiet, and a CI container's CPU quota
                           # may throttle them (their boundaries: tests/test_gates.py)
                           "max_timing_other_cpu_share": None, "max_timing_throttled_share": None,
                           "max_timing_cpu_wait_share": None},
                 # 3 rounds (not 10): each turn pauses 50 ms for the last model's threads to idle
                 "latency": {"threads": 1, "warmup_iters": 2, "iters_b1": 10, "iters_b32": 3, "rounds": 3,
                             # timed once: beside other tests the machine is always busy
                             "retimes_when_busy": 0}},
    # codecarbon off: its hardware set-up costs 1.5-2 s in each metered stage (train, compress) of
    # every pass. test_e2e_lifecycle turns it back on (METERED) and checks the figures end to end.
    "cost": {"country_iso_code": None},
}

# TINY with codecarbon's energy and CO2 estimate on, as the default params have it.
METERED = {"cost": {"country_iso_code": "USA"}}


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def copy_project(dest: Path) -> Path:
    """A fresh git+DVC repo at ``dest`` holding the project's tracked and new files."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in listed:
        src = PROJECT_ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    git = ["git", "-c", "user.name=e2e", "-c", "user.email=e2e@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "e2e copy"], cwd=dest, check=True)
    return dest


def run_cli(project: Path, api_url: str | None, *args, extra_env: dict | None = None):
    """The real console entry point, in the project copy, as a user runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env["PREFECT_HOME"] = str(project / ".prefect")
    env.update(extra_env or {})
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr


def status_json(project: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "status", "--json"], cwd=project,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def stages_line(output: str) -> dict[str, str]:
    line = re.search(r"^stages: (.*)$", output, re.M).group(1)
    return dict(kv.split("=") for kv in line.split(", "))


def write_params(path: Path, over: dict) -> Path:
    base = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    path.write_text(yaml.safe_dump(deep_merge(base, over), sort_keys=False))
    return path
