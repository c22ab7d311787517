"""What every stage command shares: env, params read once and scoped to the
keys dvc.yaml declares, clear errors, and small I/O helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from shrinkflow.entry import configure_env, declared_params, mark_stage_ran
from shrinkflow.errors import MissingInput
from shrinkflow.paths import PARAMS, split_path


def run_stage(stage: str, body: Callable, project_dir: Path | str = ".") -> int:
    """Run ``body(params)`` as DVC stage ``stage``. Returns the exit code.

    How a stage finds the project root: it is the current directory. DVC
    runs a stage's ``cmd`` in the stage's ``wdir``, which is the directory of
    dvc.yaml when (as in every shrinkflow stage) none is set, so ``"."`` is
    the root, and every project path (shrinkflow.paths) is relative to it.
    Not ``$DVC_ROOT``: ``dvc exp run --temp/--queue`` points that at the
    parent repository, while the stage runs in a copy of the workspace.

    The environment bootstrap (``configure_env``) runs first, before
    anything imports Prefect. params.yaml is read once, validated, and
    handed to the stage as a view that allows only the keys dvc.yaml
    declares for it. If the file changed while the stage ran, the stage
    fails: DVC would otherwise record values in dvc.lock that the outputs
    were not computed from. Exit codes: 0 done; 1 a handled error
    (``shrinkflow.errors.HANDLED``: one line on stderr); 2 bad params.
    Anything else propagates (a traceback: a bug).
    """
    from shrinkflow.config import ParamsError, ScopedParams, parse_params_bytes
    from shrinkflow.errors import HANDLED

    root = Path(project_dir)
    configure_env(root)
    mark_stage_ran(stage)
    path = root / PARAMS
    try:
        data = path.read_bytes()
        params = parse_params_bytes(data, path)
    except FileNotFoundError:
        print(f"error: {stage}: {path} not found", file=sys.stderr)
        return 2
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        body(ScopedParams(params, declared_params(stage, root), stage))
        if path.read_bytes() != data:
            from shrinkflow.errors import ParamsChanged

            raise ParamsChanged(f"{path} changed while the stage ran; its outputs come from the old "
                                "values, so DVC must not record the new ones: run again")
    except HANDLED as exc:
        print(f"error: {stage}: {exc}", file=sys.stderr)
        return 1
    return 0


def read_split(name: str, root: Path | str = "."):
    import pandas as pd

    path = Path(root) / split_path(name)
    if not path.is_file():
        raise MissingInput(f"{path} is missing: run the data stage first (dvc repro data)")
    return pd.read_parquet(path)


def read_lines(path: Path | str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (a missing file is an error)."""
    path = Path(path)
    if not path.is_file():
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
    import hashlib

    import pandas as pd

    from shrinkflow.io import sha256_file
    from shrinkflow.paths import UNLABELLED, UNLABELLED_PREPARED

    window = sha256_file(Path(root) / UNLABELLED)
    prepared = Path(root) / UNLABELLED_PREPARED
    if not prepared.is_file() or len(pd.read_parquet(prepared)) == 0:
        return window
    return hashlib.sha256(f"{window}:{sha256_file(prepared)}".encode()).hexdigest()
