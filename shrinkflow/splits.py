"""Readers of the project's prepared inputs: the splits, line files and
unlabelled text, and the one Parquet reader every module uses.

``read_parquet`` reads with ``use_threads=False``: a process that read
Parquet with Arrow's thread pool can abort at interpreter exit
(``terminate called without an active exception``, SIGABRT, exit 134 or
-6) when a pool worker is still alive as the interpreter finalizes
(apache/arrow#34314). A CLI command or a DVC stage that did all its work
must not then fail; the files read here are small, so threads buy nothing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from shrinkflow.files import sha256_file


def read_parquet(path: Path | str, columns: list[str] | None = None):
    """A Parquet file as a pandas DataFrame, read on the calling thread
    (see the module docstring). Raises FileNotFoundError when it is missing
    and pyarrow's ArrowInvalid when it is not Parquet."""
    import pandas as pd

    return pd.read_parquet(path, columns=columns, use_threads=False)


def read_split(name: str, root: Path | str = "."):
    """Prepared split ``name`` (``data/prepared/<name>.parquet`` under
    ``root``) as a DataFrame (text, label). Raises shrinkflow.errors.MissingInput, naming
    the data stage, when it is missing."""
    from shrinkflow.paths import split_path

    path = Path(root) / split_path(name)
    if not path.is_file():
        from shrinkflow.errors import MissingInput

        raise MissingInput(f"{path} is missing: run the data stage first (dvc repro data)")
    return read_parquet(path)


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
    re-compression), then the texts of the production labels a retrain
    fine-tunes the teacher on (``data/prepared/feedback_train.parquet``,
    written by the data stage; empty until a retrain), then the user's own
    unlabelled text (``data.source.unlabelled_path``, prepared by the data
    stage into ``data/prepared/unlabelled.parquet``; empty for the built-in
    task). The students learn the retrained teacher's fix on the very text it
    was retrained for. Never read: the held-out production labels, and a
    production label's text that is also in the window's held-out texts
    (``data/unlabelled/heldout.txt``, whitespace-normalised), whose agreement
    gates the candidates."""
    from shrinkflow.paths import UNLABELLED, UNLABELLED_PREPARED, WINDOW_HELDOUT, split_path

    root = Path(root)
    feedback_train = split_path("feedback_train")
    texts = read_lines(root / UNLABELLED)
    if _has_rows(root / feedback_train):
        held = {" ".join(t.split()) for t in read_lines(root / WINDOW_HELDOUT)} \
            if (root / WINDOW_HELDOUT).is_file() else set()
        texts += [t for t in _texts(root / feedback_train) if " ".join(t.split()) not in held]
    if _has_rows(root / UNLABELLED_PREPARED):
        texts += _texts(root / UNLABELLED_PREPARED)
    return texts


def _texts(path: Path) -> list[str]:
    """The non-blank ``text`` column of a prepared Parquet file."""
    return [t for t in read_parquet(path, columns=["text"])["text"].astype(str).tolist() if t.strip()]


def _has_rows(path: Path) -> bool:
    return path.is_file() and len(read_parquet(path, columns=["text"])) > 0


def unlabelled_hash(root: Path | str = ".") -> str:
    """Content hash of what ``read_unlabelled`` reads, for the candidate
    cache key. The window file's sha256 alone when there are no production
    labels and the user gave no unlabelled text, so the built-in task's keys
    are unchanged; with production labels, the window's held-out texts
    (which filter them) count too."""
    from shrinkflow.paths import UNLABELLED, UNLABELLED_PREPARED, WINDOW_HELDOUT, split_path

    root = Path(root)
    feedback_train = split_path("feedback_train")
    window = sha256_file(root / UNLABELLED)
    parts = []
    if _has_rows(root / feedback_train):
        parts.append(f"feedback_train.parquet={sha256_file(root / feedback_train)}")
        if (root / WINDOW_HELDOUT).is_file():
            parts.append(f"heldout.txt={sha256_file(root / WINDOW_HELDOUT)}")
    if _has_rows(root / UNLABELLED_PREPARED):
        if not parts:   # the key it had before production labels counted
            return hashlib.sha256(f"{window}:{sha256_file(root / UNLABELLED_PREPARED)}".encode()).hexdigest()
        parts.append(f"unlabelled.parquet={sha256_file(root / UNLABELLED_PREPARED)}")
    return hashlib.sha256(":".join([window, *parts]).encode()).hexdigest() if parts else window
