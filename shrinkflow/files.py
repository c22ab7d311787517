"""Files on disk: atomic writes, JSON, content hashes and fsync.

Every artifact is written to a temp file in the destination directory and
renamed into place, so a crash mid-write never leaves a half-written file
under the final name (rename is atomic within one filesystem).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process's umask, read without changing it (Linux's
    /proc/self/status; 0o022 where that is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary file in the same
    directory, fsynced, renamed over ``path``, the directory fsynced). The
    file gets the mode ``open()`` would give it (0o666 less the umask), not
    the temporary file's 0o600: other users (a serving host's account on a
    shared mount) read it as they read the rest. Raises OSError."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # make the rename itself durable
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    return _hash_file(hashlib.sha256(), path, chunk)


def file_md5(path: Path | str, chunk: int = 1 << 20) -> str:
    """The md5 of a file's bytes (hex): what DVC 3 records for a file out in
    dvc.lock. Raises FileNotFoundError when it is missing."""
    return _hash_file(hashlib.md5(), path, chunk)


def _hash_file(h, path: Path | str, chunk: int) -> str:
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_size_bytes(path: Path | str) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def file_hashes(model_dir: Path | str) -> dict[str, str]:
    """sha256 of every file under ``model_dir``, by relative POSIX path."""
    root = Path(model_dir)
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def content_hash(hashes: dict[str, str]) -> str:
    """One hash for a whole directory's files (names and contents)."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()


def fsync_tree(root: Path | str) -> None:
    """Flush every file and directory under ``root`` (and root) to disk, so a
    power cut after a rename cannot leave the new name over missing data."""
    root = Path(root)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *sorted((p for p in root.rglob("*") if p.is_dir()), reverse=True)]:
        fsync_dir(d)


def fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
