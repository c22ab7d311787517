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

from shrinkflow.entry import OFFLINE_ENV, configure_env  # noqa: F401  (re-exported)


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


def params_fingerprint(project_dir: Path | str) -> str:
    """Validate params.yaml and return the sha256 of its bytes. A run takes
    this once at the start and checks it before every stage."""
    import hashlib

    from shrinkflow.config import parse_params_bytes
    from shrinkflow.paths import PARAMS

    path = Path(project_dir) / PARAMS
    data = path.read_bytes()
    parse_params_bytes(data, path)
    return hashlib.sha256(data).hexdigest()


def check_params_unchanged(project_dir: Path | str, fingerprint: str, before: str) -> None:
    """Raise ParamsChanged if params.yaml differs from the run's fingerprint:
    a run never mixes two versions of the params."""
    import hashlib

    from shrinkflow.errors import ParamsChanged
    from shrinkflow.paths import PARAMS

    path = Path(project_dir) / PARAMS
    now = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    if now != fingerprint:
        raise ParamsChanged(f"{path} changed during this run (before stage {before!r}); stopping so that no run "
                            "mixes two versions of the params. Run again to use the new ones.")


def dvc_command(args: list[str], project_dir: Path | str) -> str:
    """Run ``dvc <args>`` in the project; raise with DVC's output on failure."""
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project_dir, env=offline_env(),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout
