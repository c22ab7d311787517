"""A content-addressed cache of built candidates, one entry per candidate.

DVC re-runs the whole compress stage when any of its deps changes (one
recipe in params.yaml, a new production window), and deletes
``models/candidates`` first. A candidate whose own inputs did not change is
then copied from this cache instead of rebuilt, so a sweep that edits one
recipe rebuilds one candidate.

The key is a sha256 over everything a build reads: the candidate (name and
recipe), the teacher's files, the training split and the unlabelled text
(only when a step of the recipe reads data), the source of the code that
builds it, the library versions, the ONNX opset and the thread count (torch
results depend on it). The cache lives outside every DVC out (under
``.shrinkflow/``), and an entry is written to a temp directory and renamed,
so a crash never leaves half an entry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from shrinkflow.io import content_hash, file_hashes, fsync_tree, sha256_file

# The modules a build runs (apply_recipe and what it imports).
CODE = ("shrinkflow/compress", "shrinkflow/arch.py", "shrinkflow/modeling.py", "shrinkflow/train.py",
         "shrinkflow/io.py", "shrinkflow/config.py")
BUILD_INFO = "build.json"


def reads_data(candidate) -> bool:
    """Whether any step of the recipe learns from text (training split or the
    unlabelled window): distillation, pruning by importance or vocabulary,
    gradual magnitude pruning, static-int8 calibration."""
    for step in candidate.recipe:
        if step.method in ("distill", "structured_prune", "vocab_prune"):
            return True
        if step.method == "magnitude_prune" and step.schedule == "gradual":
            return True
        if step.method == "quantize" and step.mode == "static":
            return True
    return False


def code_hash(package_root: Path) -> str:
    files = []
    for rel in CODE:
        p = Path(package_root) / rel
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return hashlib.sha256("".join(f"{f.relative_to(package_root).as_posix()}:{sha256_file(f)}\n"
                                  for f in files).encode()).hexdigest()


def package_root() -> Path:
    """The directory holding shrinkflow/ (the project, in an editable install)."""
    return Path(__file__).resolve().parents[2]


def candidate_key(candidate, *, teacher_hash: str, train_hash: str, unlabelled_hash: str, code: str,
                  libraries: dict, opset: int, threads: int, fuse: bool = False, labels=()) -> str:
    """sha256 over everything a build reads (module docstring). ``labels``:
    the class names in id order; the teacher's hash covers them too (its
    manifest), but a candidate's soft labels are over exactly these classes,
    so they are part of the key in their own right."""
    data = reads_data(candidate)
    blob = {"candidate": candidate.model_dump(mode="json"), "teacher": teacher_hash, "labels": list(labels),
            "train": train_hash if data else None, "unlabelled": unlabelled_hash if data else None,
            "code": code, "libraries": libraries, "opset": opset, "threads": threads,
            "fuse": fuse}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def inputs_hashes(teacher_dir: Path, train_path: Path, unlabelled_path: Path) -> dict:
    """The data-dependent ``candidate_key`` arguments: content hashes of the
    teacher dir, the training split and the unlabelled text, and the
    teacher's labels (from its manifest)."""
    from shrinkflow.modeling import read_manifest

    return {"teacher_hash": content_hash(file_hashes(teacher_dir)), "train_hash": sha256_file(train_path),
            "unlabelled_hash": sha256_file(unlabelled_path),
            "labels": tuple(read_manifest(teacher_dir)["labels"])}


class CandidateCache:
    def __init__(self, root: Path | str):
        # Touches nothing on disk until an entry is stored.
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def fetch(self, key: str, dest: Path) -> dict | None:
        """Copy a cached build to ``dest``; its build info, or None on a miss.
        An entry whose files no longer match their recorded hashes is a miss."""
        src = self.entry(key)
        info_path = src / BUILD_INFO
        if not info_path.is_file():
            return None
        info = json.loads(info_path.read_text())
        model = src / "model"
        if file_hashes(model) != info["files"]:
            shutil.rmtree(src, ignore_errors=True)
            return None
        tmp = Path(dest).with_name(f".{Path(dest).name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(model, tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return info

    def store(self, key: str, built: Path, build_seconds: float, build_cpu_seconds: float | None = None) -> None:
        final = self.entry(key)
        if final.exists():
            return
        tmp = self.root / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(built, tmp / "model")
        info = {"files": file_hashes(tmp / "model"), "build_seconds": build_seconds,
                "build_cpu_seconds": build_cpu_seconds,
                "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        fsync_tree(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another worker stored the same key first
            shutil.rmtree(tmp, ignore_errors=True)
