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
    (the candidate's files) and ``build.json`` (their hashes, build time)."""

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
