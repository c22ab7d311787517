"""Lineage: what exactly produced a deployed model.

Read from git and dvc.lock at deploy time, so every version can name the code
commit, the data, the params, the teacher, and (later) the production window
it was re-compressed on.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml


# A git command that takes longer than this is stopped and read as unknown.
GIT_TIMEOUT_S = 60.0


def git_commit(project_dir: Path) -> dict:
    """The commit checked out in ``project_dir`` and whether tracked files
    differ from it; None for either when git cannot tell (not a repository,
    or a command that ran past ``GIT_TIMEOUT_S``)."""
    def git(*args):
        try:
            proc = subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None
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


def cpu_model() -> str | None:
    """The CPU's model name: latency gates hold on one kind of hardware only."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None


# The libraries a model's numbers depend on, and the tools that built it.
MODEL_LIBRARIES = ("torch", "transformers", "tokenizers", "onnxruntime", "onnx", "numpy")
LINEAGE_LIBRARIES = (*MODEL_LIBRARIES, "dvc", "prefect")


def library_versions(dists: tuple[str, ...] = LINEAGE_LIBRARIES) -> dict[str, str | None]:
    """Installed versions of ``dists`` (metadata only: nothing is imported, so
    the deploy stage stays light)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in dists:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def params_digest(stages: dict, chain: tuple[str, ...]) -> str:
    """sha256 of the params values DVC recorded for the stages in ``chain``:
    exactly the keys those stages declare, so an unrelated key (frontier, say)
    never changes a deployed model's digest."""
    import hashlib
    import json

    used = {s: stages.get(s, {}).get("params", {}) for s in chain}
    return hashlib.sha256(json.dumps(used, sort_keys=True, default=str).encode()).hexdigest()


class LineageError(RuntimeError):
    """dvc.lock lacks an entry that lineage must record."""


def collect_lineage(project_dir: Path, chain: tuple[str, ...], split_outs: dict[str, str], teacher_out: str,
                    unlabelled_dep: str, extra: dict | None = None) -> dict:
    """Lineage of a model built by the DVC stages in ``chain``.

    Every hash comes from dvc.lock, so it names exactly what DVC pinned. A
    hash that is missing raises LineageError rather than recording None.
    """
    stages = dvc_lock_stages(project_dir)

    def need(value, what):
        if value is None:
            raise LineageError(f"dvc.lock has no {what}: run the stages through DVC (dvc repro)")
        return value

    return {
        "git": git_commit(project_dir),
        "params_sha256": params_digest(stages, chain),
        "data_md5": {name: need(out_hash(stages, "data", path), f"data out {path}")
                     for name, path in split_outs.items()},
        "teacher_md5": need(out_hash(stages, "train", teacher_out), f"train out {teacher_out}"),
        # the unlabelled text compress distilled on (e.g. a production window)
        "unlabelled_md5": need(dep_hash(stages, "compress", unlabelled_dep), f"compress dep {unlabelled_dep}"),
        "libraries": library_versions(),
        "cpu": cpu_model(),
        "dvc_lock": {s: stages[s] for s in chain if s in stages},
        **(extra or {}),
    }


def feedback_lineage(project_dir: Path, record) -> dict:
    """The feedback dataset a version's teacher was trained with: ``md5`` of
    data/feedback/labels.jsonl as dvc.lock records it (the data stage's dep;
    the empty file's md5 when no retrain ever appended to it), and the last
    retrain (``record``: a RetrainRecord; ``retrain`` None when there was
    none): the monitor run that asked for it, the dataset version it
    appended and the old teacher's figures. ``md5`` is None under a
    dvc.lock written before the data stage read the feedback dataset."""
    from shrinkflow.paths import FEEDBACK

    md5 = dep_hash(dvc_lock_stages(project_dir), "data", str(FEEDBACK))
    retrain = record.to_json_dict() if record.previous_teacher is not None else None
    return {"md5": md5, "retrain": retrain}
