"""Running DVC stages and reading what DVC did (no Prefect here).

Flows call ``repro_stage`` once per stage so each stage is its own Prefect
task, while DVC alone decides whether the stage is stale.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Telemetry and update checks fail offline and only add noise.
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "ITERATIVE_DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def offline_env(base: dict | None = None) -> dict:
    """A copy of the environment with telemetry off and this venv's bin first
    on PATH, so dvc.yaml's ``python`` is the interpreter running shrinkflow."""
    env = dict(os.environ if base is None else base)
    for k, v in OFFLINE_ENV.items():
        env.setdefault(k, v)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


class StageFailed(RuntimeError):
    def __init__(self, stage: str, returncode: int, tail: str):
        self.stage, self.returncode, self.tail = stage, returncode, tail
        super().__init__(f"stage {stage!r} failed (exit {returncode}):\n{tail}")


@dataclass(frozen=True)
class StageRun:
    stage: str
    status: str          # "ran" | "skipped" | "restored"
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def classify(output: str, stage: str) -> str:
    """What DVC did with ``stage``, from its console output."""
    if f"Running stage '{stage}'" in output:
        return "ran"
    if f"Stage '{stage}' is cached" in output or "Restored stage" in output:
        return "restored"
    if f"Stage '{stage}' didn't change" in output:
        return "skipped"
    raise ValueError(f"cannot tell from DVC's output what happened to stage {stage!r}:\n{output[-1000:]}")


def repro_stage(stage: str, project_dir: Path | str, echo=sys.stdout.write,
                extra_env: dict | None = None, force: bool = False) -> StageRun:
    """``dvc repro --single-item <stage>``, streaming its output as it comes."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    t0 = time.perf_counter()
    env = {**offline_env(), **(extra_env or {})}
    proc = subprocess.Popen(cmd, cwd=project_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    chunks = []
    for line in proc.stdout:
        chunks.append(line)
        echo(line)
    rc = proc.wait()
    output = "".join(chunks)
    if rc != 0:
        raise StageFailed(stage, rc, output[-3000:])
    return StageRun(stage, classify(output, stage), round(time.perf_counter() - t0, 2))
