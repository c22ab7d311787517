"""Small I/O helpers: atomic writes, content hashes, and the readers of the
project's prepared inputs (splits, line files, unlabelled text).

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


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    h = hashlib.sha256()
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


def read_split(name: str, root: Path | str = "."):
    """Prepared split ``name`` (``data/prepared/<name>.parquet`` under
    ``root``) as a DataFrame (text, label). Raises shrinkflow.errors.MissingInput, naming
    the data stage, when it is missing."""
    import pandas as pd

    from shrinkflow.paths import split_path

    path = Path(root) / split_path(name)
    if not path.is_file():
        from shrinkflow.errors import MissingInput

        raise MissingInput(f"{path} is missing: run the data stage first (dvc repro data)")
    return pd.read_parquet(path)


def read_lines(path: Path | str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (a missing file is an error)."""
    path = Path(path)
    if not path.is_file():
        from shrinkflow.errors import MissingInput

        raise MissingInput(f"{path} is missing")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_unlabelled(root: Path | str = ".") -> list[str]:
    """What distillation learns from besides the training split: the
    production window snapshot (``data/unlabelled/texts.txt``, written by
    re-compression) followed by the user's own unlabelled text
    (``data.source.unlabelled_path``, prepared by the data stage into
    ``data/prepared/unlabelled.parquet``; empty for the built-in task)."""
    import pandas as pd

    from shrinkflow.paths import UNLABELLED, UNLABELLED_PREPARED

    texts = read_lines(Path(root) / UNLABELLED)
    prepared = Path(root) / UNLABELLED_PREPARED
    if prepared.is_file():
        texts += [t for t in pd.read_parquet(prepared)["text"].astype(str).tolist() if t.strip()]
    return texts


def unlabelled_hash(root: Path | str = ".") -> str:
    """Content hash of what ``read_unlabelled`` reads, for the candidate
    cache key. The window file's sha256 alone when the user gave no
    unlabelled text, so the built-in task's keys are unchanged."""
    import pandas as pd

    from shrinkflow.paths import UNLABELLED, UNLABELLED_PREPARED

    window = sha256_file(Path(root) / UNLABELLED)
    prepared = Path(root) / UNLABELLED_PREPARED
    if not prepared.is_file() or len(pd.read_parquet(prepared)) == 0:
        return window
    return hashlib.sha256(f"{window}:{sha256_file(prepared)}".encode()).hexdigest()
