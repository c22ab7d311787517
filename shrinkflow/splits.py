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
    re-compression) followed by the user's own unlabelled text
    (``data.source.unlabelled_path``, prepared by the data stage into
    ``data/prepared/unlabelled.parquet``; empty for the built-in task)."""
    from shrinkflow.paths import UNLABELLED, UNLABELLED_PREPARED

    texts = read_lines(Path(root) / UNLABELLED)
    prepared = Path(root) / UNLABELLED_PREPARED
    if prepared.is_file():
        texts += [t for t in read_parquet(prepared)["text"].astype(str).tolist() if t.strip()]
    return texts


def unlabelled_hash(root: Path | str = ".") -> str:
    """Content hash of what ``read_unlabelled`` reads, for the candidate
    cache key. The window file's sha256 alone when the user gave no
    unlabelled text, so the built-in task's keys are unchanged."""
    from shrinkflow.paths import UNLABELLED, UNLABELLED_PREPARED

    window = sha256_file(Path(root) / UNLABELLED)
    prepared = Path(root) / UNLABELLED_PREPARED
    if not prepared.is_file() or len(read_parquet(prepared)) == 0:
        return window
    return hashlib.sha256(f"{window}:{sha256_file(prepared)}".encode()).hexdigest()
