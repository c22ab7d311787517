"""Lineage: what exactly produced a deployed model.

Read from git and dvc.lock at deploy time, so every version can name the code
commit, the data, the params, the teacher, and (later) the production window
it was re-compressed on.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


def git_commit(project_dir: Path) -> dict:
    def git(*args):
        proc = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def dvc_lock_stages(project_dir: Path) -> dict:
    path = Path(project_dir) / "dvc.lock"
    if not path.is_file():
        return {}
    return (yaml.safe_load(path.read_text()) or {}).get("stages", {})


def out_hash(stages: dict, stage: str, out_path: str) -> str | None:
    for out in stages.get(stage, {}).get("outs", []):
        if out.get("path") == out_path:
            return out.get("md5")
    return None


def dep_hash(stages: dict, stage: str, dep_path: str) -> str | None:
    for dep in stages.get(stage, {}).get("deps", []):
        if dep.get("path") == dep_path:
            return dep.get("md5")
    return None


def collect_lineage(project_dir: Path, params_digest: str, data_out: str, teacher_out: str,
                    unlabelled_dep: str | None = None, extra: dict | None = None) -> dict:
    stages = dvc_lock_stages(project_dir)
    return {
        "git": git_commit(project_dir),
        "params_sha256": params_digest,
        "data_md5": out_hash(stages, "data", data_out),
        "teacher_md5": out_hash(stages, "train", teacher_out),
        # the unlabelled text compress distilled on (e.g. a production window)
        "unlabelled_md5": dep_hash(stages, "compress", unlabelled_dep) if unlabelled_dep else None,
        "dvc_lock": stages,
        **(extra or {}),
    }
