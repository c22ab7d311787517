"""A content-addressed cache of built candidates, one entry per candidate.

DVC re-runs the whole compress stage when any of its deps changes (one
recipe in params.yaml, a new production window), and deletes
``models/candidates`` first. A candidate whose own inputs did not change is
then copied from this cache instead of rebuilt, so a sweep that edits one
recipe rebuilds one candidate. What a key covers: shrinkflow.compress.keys.

The cache lives outside every DVC out (under ``.shrinkflow/``), and an entry
is written to a temp directory and renamed, so a crash never leaves half an
entry.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from shrinkflow.files import file_hashes, fsync_tree

BUILD_INFO = "build.json"


class CandidateCache:
    """Built candidates under ``root``, one directory per key: ``model/``
    (the candidate's files), ``student/`` (a distilled candidate's warm-start
    sidecar, shrinkflow.compress.warm) and ``build.json`` (their hashes,
    build time, how the build went)."""

    def __init__(self, root: Path | str):
        # Touches nothing on disk until an entry is stored.
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def fetch(self, key: str, dest: Path, student_dest: Path | None = None) -> dict | None:
        """Copy a cached build to ``dest`` (and its student sidecar to
        ``student_dest`` when given); its build info, or None on a miss. An
        entry whose files no longer match their recorded hashes is a miss; so
        is one without the student sidecar ``student_dest`` asks for."""
        src = self.entry(key)
        info_path = src / BUILD_INFO
        if not info_path.is_file():
            return None
        info = json.loads(info_path.read_text())
        parts = {"model": (info["files"], dest)}
        if student_dest is not None:
            if "student_files" not in info:
                return None
            parts["student"] = (info["student_files"], student_dest)
        if any(file_hashes(src / name) != files for name, (files, _) in parts.items()):
            shutil.rmtree(src, ignore_errors=True)
            return None
        for name, (_, target) in parts.items():
            tmp = Path(target).with_name(f".{Path(target).name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src / name, tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        return info

    def store(self, key: str, built: Path, build_seconds: float, build_cpu_seconds: float | None = None,
              student: Path | None = None, run_stats: dict | None = None) -> None:
        """Keep ``built`` (and its ``student`` sidecar) under ``key``, with
        what the build cost and ``run_stats`` (how it went); a key already
        stored is kept as it is."""
        final = self.entry(key)
        if final.exists():
            return
        tmp = self.root / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(built, tmp / "model")
        info = {"files": file_hashes(tmp / "model"), "build_seconds": build_seconds,
                "build_cpu_seconds": build_cpu_seconds,
                "stored_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if student is not None:
            shutil.copytree(student, tmp / "student")
            info["student_files"] = file_hashes(tmp / "student")
        if run_stats:
            info["run_stats"] = run_stats
        (tmp / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
        fsync_tree(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another worker stored the same key first
            shutil.rmtree(tmp, ignore_errors=True)
