"""What every stage command shares: env, params read once and scoped to the
keys dvc.yaml declares, clear errors, and the input readers (shrinkflow.splits)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn

from shrinkflow.bootstrap import configure_env, declared_params, exit_without_teardown, mark_stage_ran, stop_with_owner
# The readers live in the library (a Prefect task reads inputs too); the
# stages import them from here.
from shrinkflow.splits import read_lines, read_split  # noqa: F401
from shrinkflow.paths import PARAMS


def run_stage(stage: str, body: Callable, project_dir: Path | str = ".") -> int:
    """Run ``body(params, root)`` as DVC stage ``stage``. Returns the exit code.

    ``root`` is the project root, absolute, and the body resolves every
    project path (shrinkflow.paths, which are relative) against it, never
    against the current directory. How a stage command finds it: DVC runs a
    stage's ``cmd`` in the stage's ``wdir``, which is the directory of
    dvc.yaml when (as in every shrinkflow stage) none is set, so the command
    passes its current directory (the default ``"."``). Not ``$DVC_ROOT``:
    ``dvc exp run --temp/--queue`` points that at the parent repository,
    while the stage runs in a copy of the workspace.

    The environment bootstrap (``configure_env``) runs first, before
    anything imports Prefect. params.yaml is read once, validated, and
    handed to the stage as a view that allows only the keys dvc.yaml
    declares for it. If the file changed while the stage ran, the stage
    fails: DVC would otherwise record values in dvc.lock that the outputs
    were not computed from. Exit codes: 0 done; 1 a handled error
    (``shrinkflow.errors.HANDLED``: one line on stderr); 2 bad params;
    ``STAGE_EXIT_TRANSIENT`` (75) a source that did not answer
    (``SourceUnreachable``: one line, and the lifecycle retries). Anything
    else propagates (a traceback: a bug).
    """
    from shrinkflow.config import ParamsError, ScopedParams, parse_params_bytes
    from shrinkflow.errors import HANDLED, STAGE_EXIT_TRANSIENT, SourceUnreachable

    root = Path(project_dir).resolve()
    configure_env(root)
    mark_stage_ran(stage)
    stop_with_owner(stage)     # no stage outlives the shrinkflow run that started it
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
        body(ScopedParams(params, declared_params(stage, root), stage), root)
        if path.read_bytes() != data:
            from shrinkflow.errors import ParamsChanged

            raise ParamsChanged(f"{path} changed while the stage ran; its outputs come from the old "
                                "values, so DVC must not record the new ones: run again")
    except SourceUnreachable as exc:
        print(f"error: {stage}: {exc} (a passing failure: a later try may succeed)", file=sys.stderr)
        return STAGE_EXIT_TRANSIENT
    except HANDLED as exc:
        print(f"error: {stage}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(stage: str, body: Callable) -> NoReturn:
    """A stage command's entry point: ``run_stage(stage, body)``, then exit
    with its code without the interpreter's teardown
    (``shrinkflow.bootstrap.exit_without_teardown``: once the outputs are
    written, freeing torch and transformers took 1.3-1.6 s of every train and
    compress run). A bug (an exception ``run_stage`` does not handle) exits
    the usual way, with its traceback."""
    exit_without_teardown(run_stage(stage, body))
