"""``shrinkflow`` console script: one way in.

Every command takes ``--params FILE`` and ``--debug``. One Typer callback,
``_open_session`` (the ``--params`` option's), runs before any command body:
it finds the project (the nearest directory up from here with a dvc.yaml),
validates the params once, and calls the environment bootstrap
(``shrinkflow.bootstrap.configure_env``); the command gets the result as
``ctx.obj`` (a ``Session``). Prefect is imported only after that, so bad
params write nothing (not even Prefect's database). ``--help`` needs no
project.

Exit codes mean the same in every command: ``shrinkflow.errors.ExitCode``,
one table in docs/exit-codes.md, and each command's ``--help`` lists its own
(from ``EXIT_CODES`` below; tests/test_cli.py checks all three agree).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import traceback
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from flows.prefect_server import ephemeral_api
from shrinkflow.config import ParamsError, load_params
from shrinkflow.bootstrap import configure_env
from shrinkflow.errors import ExitCode, MissingInput
from shrinkflow.paths import PARAMS, PREFECT_HOME, STATE
from shrinkflow.remote import SSH_CONNECT_TIMEOUT_S

_USAGE = "bad params or flags, or not inside a project"
_CRASH = "something failed (--debug prints the traceback)"
_ADOPT = ("; or params.yaml has uncommitted changes that --params would overwrite, or leaves out a key dvc.yaml "
          "tracks")
# run and an acting monitor: another one holds the project (hold_project).
_HELD_BY = "; or another run or acting monitor is changing the project (named, with its pid)"
# Each command's exit codes and what each means there. Printed in its --help;
# docs/exit-codes.md lists the same (tests/test_cli.py).
EXIT_CODES: dict[str, dict[ExitCode, str]] = {
    "run": {ExitCode.OK: "deployed, or production kept (measured as a candidate while a re-compression's window "
                         "is staged, it passed every gate and won)",
            ExitCode.REFUSED: "no candidate passed every gate; production unchanged",
            ExitCode.USAGE: _USAGE + _ADOPT + _HELD_BY,
            ExitCode.CRASH: "a stage, Prefect or the deploy failed"},
    "status": {ExitCode.OK: "shown (also when nothing is deployed)", ExitCode.USAGE: _USAGE,
               ExitCode.CRASH: "the registry is unusable, or production's files fail their hashes; or "
                               "(serve.registry: shared) the shared registry cannot be used and nothing is cached"},
    "serve": {ExitCode.OK: "served until stopped by Ctrl-C (SIGTERM: a graceful shutdown, then 143, 128 + SIGTERM)",
              ExitCode.USAGE: _USAGE + "; or --params with --workers > 1",
              ExitCode.CRASH: "production's files, its labels or the prediction log are unusable; or "
                              "(serve.registry: shared) the shared registry cannot be used and nothing is cached; "
                              "or the port is in use",
              ExitCode.NOTHING: "nothing is in production (serve.registry: shared: in the shared registry)"},
    "rollback": {ExitCode.OK: "production moved back (and published, with shared_registry.url)",
                 ExitCode.USAGE: _USAGE + "; or --to names no version (or none is recorded as previous)" + _HELD_BY,
                 ExitCode.CRASH: "the target's files fail their hashes, or the registry is unusable; or it moved "
                                 "back here but could not be published to shared_registry.url",
                 ExitCode.NOTHING: "nothing in production, no other version, or the target already is "
                                   "production"},
    "versions": {ExitCode.OK: "listed (also when there are none)", ExitCode.USAGE: _USAGE, ExitCode.CRASH: _CRASH},
    "schedule": {ExitCode.OK: "stopped by Ctrl-C or SIGTERM",
                 ExitCode.USAGE: _USAGE + "; or another `shrinkflow schedule` serves this project; or a cron with no "
                                  "next run, or both --cron and --interval" + _ADOPT,
                 ExitCode.CRASH: "the Prefect server or the runner failed"},
    "team": {ExitCode.OK: "up: the stack runs (its UI's address is printed); down: none of it runs (also when "
                          "none did); status: every piece runs; env: printed",
             ExitCode.USAGE: _USAGE + "; or a cron with no next run, or both --cron and --interval" + _ADOPT,
             ExitCode.CRASH: "up: a piece could not start, be reached or deploy (its log's tail is printed); "
                             "status: some pieces run and others do not",
             ExitCode.NOTHING: "status: none of the stack runs"},
    "ui": {ExitCode.OK: "stopped by Ctrl-C or SIGTERM", ExitCode.USAGE: _USAGE,
           ExitCode.CRASH: "the Prefect server could not start or stopped by itself"},
    "simulate-traffic": {ExitCode.OK: "every request got 200",
                         ExitCode.REFUSED: "some requests got another status",
                         ExitCode.USAGE: _USAGE + "; or an empty shifted pool of the user's task; or feedback "
                                         "asked while the server's version names other classes",
                         ExitCode.CRASH: "the server cannot be reached, or a data file is missing"},
    "window": {ExitCode.OK: "restored", ExitCode.USAGE: _USAGE + "; or no such version",
               ExitCode.CRASH: "the archived window is missing", ExitCode.NOTHING:
               "the version was not re-compressed on a production window"},
    "monitor": {ExitCode.OK: "it ran (any verdict), and any re-compression or retrain deployed; `monitor ui`: "
                             "stopped by Ctrl-C or SIGTERM",
                ExitCode.REFUSED: "a re-compression or retrain deployed nothing (gates; production kept because "
                                  "it won the selection; a retrained teacher that failed its own gates, the project "
                                  "put back as it was)",
                ExitCode.USAGE: _USAGE + _ADOPT + _HELD_BY,
                ExitCode.CRASH: "the monitor or its re-compression failed; `monitor ui`: the Evidently UI could "
                                "not start, or stopped by itself",
                ExitCode.NOTHING: "nothing is in production (the monitor judges production's answers)"},
    "publish": {ExitCode.OK: "the shared registry holds every version and the production alias of this one",
                ExitCode.USAGE: _USAGE + "; or shared_registry.url is not set",
                ExitCode.CRASH: "the shared registry cannot be reached or written, holds another registry's "
                                "versions or moves of production this registry has not seen (pull first), holds "
                                "nothing where this registry published before (not mounted? --fresh), or a local "
                                "version fails its hashes",
                ExitCode.NOTHING: "the registry holds no version"},
    "pull": {ExitCode.OK: "this checkout's registry holds every shared version and the same production "
                          "(deploy/deployment.json restored when the shared registry holds the record dvc.lock pins)",
             ExitCode.USAGE: _USAGE + "; or shared_registry.url is not set",
             ExitCode.CRASH: "the shared registry cannot be reached, a shared version fails its hashes, or this "
                             "registry holds versions or moves of production the shared one lacks (or versions of "
                             "the same name with other files); --discard-local sets them aside",
             ExitCode.NOTHING: "the shared registry holds nothing in production"},
    "remote-ssh": {ExitCode.OK: "the remote is configured and answered",
                   ExitCode.USAGE: _USAGE + "; or a bad URL, a missing key file, or a remote of that name exists "
                                            "(without --force)",
                   ExitCode.CRASH: "DVC refused the config (dvc-ssh missing), or the remote cannot be reached "
                                   "or refused the login (the config is kept)"},
}


def _epilog(command: str) -> str:
    import textwrap

    rows = []
    for code, why in sorted(EXIT_CODES[command].items()):
        head = f"  {int(code)} {code.name.lower():<8} "
        rows += textwrap.wrap(why, width=78, initial_indent=head, subsequent_indent=" " * len(head))
    # "\b": Click prints the paragraph as written (no rewrapping).
    return "\b\nExit codes (docs/exit-codes.md):\n" + "\n".join(rows)


app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False, context_settings={"max_content_width": 100},
                  help="shrinkflow: train large, then compress. Runs the lifecycle through DVC and Prefect.")


def _command(name: str, short_help: str):
    """A command with its exit codes in its --help; ``short_help``: its line
    in ``shrinkflow --help``."""
    return app.command(name, epilog=_epilog(name), short_help=short_help)


@dataclass(frozen=True)
class Session:
    """What every command starts from: the project root, the params file
    the command uses and its validated contents."""

    root: Path
    params_path: Path
    params: Any

    @property
    def own_params(self) -> bool:
        """Whether the params file is the project's params.yaml."""
        return self.params_path.resolve() == (self.root / PARAMS).resolve()


def _fail(code: ExitCode, message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def find_root(start: Path | None = None) -> Path:
    """The nearest directory from ``start`` (default: here) upwards that has
    a dvc.yaml. Raises typer.Exit(USAGE) when there is none."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file():
            return d
    raise _fail(ExitCode.USAGE, f"{here} is not inside a shrinkflow project (no dvc.yaml found)")


def _open_session(ctx: typer.Context, value: Optional[Path]) -> Optional[Path]:
    """The ``--params`` option's callback, run for every command before its
    body (never for ``--help``): find the project, validate the params once,
    bootstrap the environment. Bad params exit USAGE before anything runs."""
    if ctx.resilient_parsing:
        return value
    root = find_root()
    from shrinkflow.paths import STATE

    if (root / STATE).exists() and not (root / STATE).is_dir():   # a helper's finding: a FileExistsError traceback
        raise _fail(ExitCode.USAGE, f"{root / STATE} is a file: shrinkflow keeps the project's local state (locks, "
                                    "the prediction log, caches) in that directory; move the file away")
    path = (value if value is not None else root / PARAMS).resolve()
    try:
        parsed = load_params(path)
    except ParamsError as exc:
        raise _fail(ExitCode.USAGE, str(exc))
    configure_env(root)
    ctx.obj = Session(root, path, parsed)
    return value


ParamsOpt = Annotated[Optional[Path], typer.Option(
    "--params", metavar="FILE", callback=_open_session,
    help="params file (default: the project's params.yaml). Commands that run DVC stages (run, monitor, "
         "schedule, team up) make it the project's params.yaml, refusing if params.yaml has uncommitted "
         "changes; the others only read it")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="on a crash, print its traceback")]


def crash_message(exc: BaseException, what: str = "the lifecycle") -> str:
    """The one message a crash prints: what failed (``what``: "the
    lifecycle", "the monitor", ...) and why, so that a monitor failure never
    reads as the lifecycle's."""
    from shrinkflow.errors import DeploymentMissing, IntegrityError, ParamsChanged, RegistryError
    from shrinkflow.dvcrun import StageFailed
    from shrinkflow.remote import RemoteError
    from shrinkflow.predlog import PredictionLogError

    if isinstance(exc, PredictionLogError):
        # Already names the log, its path and the cause (and, from the
        # monitor, the monitor).
        return str(exc) if str(exc).startswith(what) else f"{what} could not run: {exc}"
    if isinstance(exc, StageFailed):
        # The stage's output was streamed to the console as it ran.
        line = f"{what} failed: {exc.headline} (its output is above)"
        return line + unreachable_advice(exc)
    if isinstance(exc, (DeploymentMissing, ParamsChanged, RemoteError)):
        return f"{what} failed: {exc}"
    if isinstance(exc, MissingInput):
        return f"{what} could not run: missing file: {exc}"
    if isinstance(exc, (RegistryError, IntegrityError)):
        return f"{what} could not run: {exc}"
    # Anything else happened outside a stage: most often Prefect itself (an
    # API that cannot start or be reached), else a bug. Name it with its type.
    return f"{what} could not run: {type(exc).__name__}: {exc}"


def unreachable_advice(exc: BaseException) -> str:
    """For a stage whose data source did not answer after every try
    (``worth_retrying``): how many tries it had and what to do offline (a
    mirror, or the archive in the cache); "" for any other failure."""
    from shrinkflow.dvcrun import worth_retrying
    from shrinkflow.paths import cache_dir
    from tasks.dvc import RETRIES

    if not worth_retrying(exc):
        return ""
    tries = RETRIES.get(exc.stage, 0) + 1
    return (f"; tried {tries} time{'s' if tries > 1 else ''}. Offline, point PIP_INDEX_URL at a mirror, or put "
            f"the archive in {cache_dir()} (or $SHRINKFLOW_CACHE_DIR), where it is checked against its sha256 "
            "before use: docs/operations.md")


def _short_failures(debug: bool) -> None:
    """Unless ``--debug``: Prefect's console lines about a failure that
    ``crash_message`` explains are cut to one line, without tracebacks
    (``flows.console``); Prefect's API, and so its UI, keeps them whole."""
    if not debug:
        from flows.console import shorten_known_failures_on_console

        shorten_known_failures_on_console()


def _not_a_server_stop(record) -> bool:
    """A logging filter: False for the "Stopping temporary server on ..."
    line that Prefect's ephemeral API (or ``ephemeral_api``) logs at exit."""
    return not record.getMessage().startswith("Stopping temporary server on ")


def _interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is an interrupt in disguise: a stop signal arrived
    (``_stop_on_signals``), or a KeyboardInterrupt raised inside library
    code came back wrapped (pydantic's serializer turned one into
    "PydanticSerializationError: ... KeyboardInterrupt", which read as a
    crash, exit 3, instead of 130)."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt) or "KeyboardInterrupt" in str(e):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return bool(_SIGNALLED)


def _crash(exc: BaseException, what: str, debug: bool, message: str | None = None) -> BaseException:
    """Print a crash (``message``, default ``crash_message``) and, with
    ``--debug``, its traceback; returns the Exit(CRASH) to raise, or a
    KeyboardInterrupt (exit INTERRUPTED) when ``exc`` is an interrupt in
    disguise (``_interrupted``)."""
    if _interrupted(exc):
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        return KeyboardInterrupt()
    # The closing error line stays the last line: the temporary server's stop is not logged after it
    # (its logger is "prefect" itself; a filter there sees nothing its children log).
    import logging

    logging.getLogger("prefect").addFilter(_not_a_server_stop)
    typer.echo(f"error: {message or crash_message(exc, what)}", err=True)
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    else:
        typer.echo("(--debug prints the traceback)", err=True)
    return typer.Exit(ExitCode.CRASH)


def _session(ctx: typer.Context) -> Session:
    return ctx.obj


def _git_params_state(root: Path) -> str:
    """params.yaml in git: "clean", "modified" (uncommitted changes, staged
    or not), "untracked", or "no-git" (not a repository, or git missing)."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--", str(PARAMS)], cwd=root, capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "no-git"
    if proc.returncode != 0:
        return "no-git"
    line = proc.stdout.strip()
    return "clean" if not line else ("untracked" if line.startswith("??") else "modified")


def hold_project(s: Session, command: str) -> None:
    """Hold the project for ``command`` (``shrinkflow run``, an acting
    ``shrinkflow monitor``) until this process ends, before anything is
    changed, --params's copy included (``shrinkflow.projectlock.hold``):
    a second such command, or a flow a scheduler started, exits USAGE,
    naming the one that holds it, its pid and since when, and changes
    nothing."""
    from shrinkflow.projectlock import ProjectBusy, hold

    try:
        hold(s.root, command)
    except ProjectBusy as exc:
        raise _fail(ExitCode.USAGE, str(exc))


def adopt_params(s: Session, hold: str | None = None) -> None:
    """Make the ``--params`` file the project's params.yaml, for the commands
    that run DVC stages: DVC reads params.yaml (dvc.yaml's ``params:``) and
    nothing else, so the file is copied over it. Keys dvc.yaml tracks that
    the file leaves out (a file written for an older shrinkflow, or with
    only the keys its author changed) are written into the copy with the
    values the stages read without them, their defaults, and named on the
    console (DVC would refuse the stage that tracks one). The project's own
    params.yaml is never rewritten: one that leaves out a tracked key exits
    USAGE, naming the lines to add, before anything runs.

    Never loses an edit: when git holds params.yaml, uncommitted changes are
    refused (exit USAGE) rather than overwritten, and a clean file is
    replaced with no copy (git has it: ``git checkout params.yaml`` brings it
    back). Outside git, the previous file is kept in .shrinkflow/ as before.
    Uncommitted changes that are exactly an earlier ``--params`` copy (each
    copy is recorded in .shrinkflow/params.adopted.json) are no edit of the
    user's: they are replaced, the earlier file kept in .shrinkflow/ too
    unless that file still holds them, so that ``run --params A`` then
    ``run --params B`` runs B.

    ``hold``: the command (``"shrinkflow run"``) that holds the project
    from here to the end of this process (``hold_project``), taken once
    the params are known good, before anything is written.
    """
    import hashlib

    from shrinkflow.tracked_params import check_tracked

    target = s.root / PARAMS
    if s.own_params:
        try:
            check_tracked(s.root, target.read_bytes(), s.params)
        except (ParamsError, ValueError) as exc:
            raise _fail(ExitCode.USAGE, str(exc))
        if hold:
            hold_project(s, hold)
        return
    new, filled = _params_copy(s.root, s.params_path)
    if target.is_file() and target.read_bytes() == new:
        if hold:
            hold_project(s, hold)
        return
    record = s.root / STATE / "params.adopted.json"
    state = _git_params_state(s.root) if target.is_file() else "absent"
    earlier = _earlier_copy(record, target.read_bytes()) if state == "modified" else None
    if state == "modified" and earlier is None:
        raise _fail(ExitCode.USAGE, f"params.yaml has uncommitted changes, which --params {s.params_path} would "
                                    "overwrite: commit them, or drop them (git checkout params.yaml), and run again")
    if hold:   # before the copy: never over another run's params
        hold_project(s, hold)
    note = ""
    if state in ("untracked", "no-git") or (earlier is not None and not (
            earlier.is_file() and _earlier_still_holds(s.root, earlier, target.read_bytes()))):
        backup = s.root / STATE / "params.previous.yaml"
        backup.parent.mkdir(exist_ok=True)
        shutil.copyfile(target, backup)
        note = f" (previous copy: {backup.relative_to(s.root)})"
    elif earlier is not None:
        note = (f" (it held the copy of {earlier} an earlier --params made, which that file still holds; "
                "the committed one: git diff params.yaml)")
    elif state == "clean":
        note = " (the previous one is in git: git diff params.yaml)"
    from shrinkflow.files import atomic_write_bytes, atomic_write_text

    atomic_write_bytes(target, new)
    record.parent.mkdir(exist_ok=True)
    atomic_write_text(record, json.dumps({"source": str(s.params_path),
                                          "sha256": hashlib.sha256(new).hexdigest()}) + "\n")
    typer.echo(f"params.yaml replaced by {s.params_path}{note}")
    if filled:
        typer.echo(f"params.yaml names {len(filled)} key(s) that dvc.yaml tracks and {s.params_path.name} left out, "
                   "with the values the stages read without them (the defaults), so that DVC runs every stage: "
                   + ", ".join(f"{k}: {json.dumps(v)}" for k, v in filled.items()))


def _earlier_still_holds(root: Path, earlier: Path, current: bytes) -> bool:
    """Whether the earlier ``--params`` file still makes the copy params.yaml
    holds (``current``); False when it no longer can (edited, now invalid):
    then the copy is kept aside, never blamed on the file run now."""
    try:
        return _params_copy(root, earlier, quiet=True)[0] == current
    except Exception:
        return False


def _params_copy(root: Path, path: Path, quiet: bool = False) -> tuple[bytes, dict]:
    """What ``--params`` ``path`` makes params.yaml: its bytes, with every
    key dvc.yaml tracks that it leaves out written in with its default
    (``shrinkflow.tracked_params.fill_missing``), and those keys with their
    values; the bytes unchanged and ``{}`` when it names them all. Raises
    typer.Exit (USAGE) when the keys cannot be written in."""
    from ruamel.yaml import YAMLError

    from shrinkflow.tracked_params import fill_missing, tracked_params

    data = path.read_bytes()
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        return data, {}
    try:
        text, filled = fill_missing(data.decode("utf-8"), path, tracked_params(dvc_yaml))
    except (ParamsError, ValueError, OSError, YAMLError) as exc:
        if quiet:
            raise
        raise _fail(ExitCode.USAGE, f"could not write the keys dvc.yaml tracks that {path} leaves out into "
                                    f"params.yaml: {exc}")
    return (text.encode("utf-8"), filled) if filled else (data, {})


def _earlier_copy(record: Path, current: bytes) -> Path | None:
    """The ``--params`` file whose copy params.yaml holds unchanged (``current``
    is its content), as ``adopt_params`` recorded it; None when params.yaml
    is anything else (an edit of the user's) or nothing was recorded."""
    import hashlib

    try:
        doc = json.loads(record.read_text())
        if doc["sha256"] == hashlib.sha256(current).hexdigest():
            return Path(doc["source"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


# The stop signals this process received (``_stop_on_signals``).
_SIGNALLED: list[int] = []


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP stop like Ctrl-C (KeyboardInterrupt), so every
    ``finally`` runs: the runner first, then the server."""
    import signal

    def _stop(signum, frame):
        _SIGNALLED.append(signum)
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)


@_command("run", "Run the lifecycle: train, compress, validate, deploy.")
def run(ctx: typer.Context, params: ParamsOpt = None, debug: DebugOpt = False,
        revalidate: Annotated[bool, typer.Option(
            "--revalidate", help="run validate again though nothing changed: time and gate the candidates "
                                 "anew (after a timing on a busy machine was refused)")] = False):
    """Run the lifecycle flow: DVC stages fetch -> data -> train -> compress -> validate -> deploy.

    With --params FILE, FILE becomes the project's params.yaml first (DVC
    reads only that file): refused when params.yaml has uncommitted changes,
    so no edit is lost; git keeps the previous version. A stage running
    longer than $SHRINKFLOW_STAGE_TIMEOUT_S seconds (default 12 h) is stopped.
    """
    s = _session(ctx)
    adopt_params(s, hold="shrinkflow run")
    # SIGTERM and SIGHUP (timeout, systemd, docker stop) unwind like Ctrl-C:
    # the stage's DVC process tree is stopped and the temporary Prefect
    # server with it; a SIGKILL leaves that server to its watchdog
    # (ephemeral_api). Both used to leave Prefect's own temporary server
    # running, orphaned, ~230 MB each (a helper's finding).
    _stop_on_signals()
    before = _production_alias(s)
    try:
        import importlib

        _short_failures(debug)
        with ephemeral_api(lambda: importlib.import_module("flows.lifecycle")):
            from flows.lifecycle import lifecycle

            result = lifecycle(project_dir=str(s.root), revalidate=revalidate)
    except BaseException as exc:  # noqa: BLE001 - every crash is exit 3, with its reason; an interrupt 130
        _say_if_production_moved(s, before)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        typer.echo("", err=True)
        raise _crash(exc, "the lifecycle", debug)
    _print_summary(s.root, s.params, result)
    if result.get("publish_warning"):
        typer.echo(f"warning: {result['publish_warning']}", err=True)
    raise typer.Exit(ExitCode.OK if result["deployed_version"] or result.get("kept_version") else ExitCode.REFUSED)


def _production_alias(s: Session) -> str | None:
    """The version in production now, or None (none, or the registry
    unreadable: this only feeds a message)."""
    from tasks.retrain import production_version

    version = production_version(str(s.root), s.params.deploy.registry_dir)
    return None if version == "unreadable" else version


def _say_if_production_moved(s: Session, before: str | None) -> None:
    """After a run that did not finish: say so when production moved all
    the same (stopped during deploy, after the alias moved but before DVC
    recorded the stage: a helper's finding, exit 130 with nothing said)."""
    after = _production_alias(s)
    if after is not None and after != before:
        typer.echo(f"note: production moved to {after} (from {before or 'none'}) before the run stopped; dvc.lock "
                   f"does not record that deploy, so the next run deploys again: it finds {after} already in "
                   "production when nothing changed in between (no commit, no params edit, no rollback), else it "
                   "stores a new version"
                   + (f"; `shrinkflow rollback --to {before}` returns to the version before (a run after it "
                      "deploys again)" if before else ""),
                   err=True)


def _baselines_note(root: Path, result: dict) -> list[str]:
    """When train ran, the stages outside the lifecycle that read the teacher
    (small_direct, frontier) may now be stale: say which, so that `dvc status`
    does not look like a failure (docs/operations.md). Nothing when train was
    skipped, or when DVC cannot tell (a summary never fails a run)."""
    from flows.lifecycle import BASELINE_STAGES
    from shrinkflow.dvcrun import stale_stages

    if result["stages"].get("train", {}).get("status") == "skipped":
        return []
    try:
        stale = stale_stages(list(BASELINE_STAGES), root)
    except (RuntimeError, ValueError, OSError):  # DVC failed (or a dvc.yaml without them): say nothing
        return []
    if not stale:
        return []
    return [f"not part of the lifecycle, now stale: {', '.join(stale)} (they read the teacher train rebuilt); "
            f"`dvc repro frontier` refreshes them, or leave them (docs/operations.md)"]


def _commit_hint(root: Path) -> list[str]:
    """What to `git add` to version this run: the tracked files it changed
    (dvc.lock, metrics/, reports/, params.yaml after --params), by their top
    folder. Nothing outside git or when nothing changed."""
    try:
        proc = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    paths = [line[3:].split(" -> ")[-1] for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not paths:
        return []
    tops = sorted({p.split("/", 1)[0] for p in paths})
    return [f"to version this run: git add {' '.join(tops)} && git commit ({len(paths)} tracked files changed; "
            f"`dvc push` sends the models and data to the DVC remote)"]


def _print_summary(root: Path, parsed, result: dict) -> None:
    from shrinkflow.artifacts import GatesReport

    gates = GatesReport.model_validate(result["gates"])
    stages = ", ".join(f"{s}={r['status']}" for s, r in result["stages"].items())
    out = ["", "=" * 72, f"stages: {stages}"]
    if result["deployed_version"]:
        version, where = result["deployed_version"], f"{parsed.deploy.registry_dir}/versions/{result['deployed_version']}"
        if result["stages"].get("deploy", {}).get("status") == "skipped":
            # DVC found nothing changed since that deploy: this run deployed nothing
            out.append(f"UP TO DATE: {version} (candidate {result['selected']!r}) was deployed by an earlier run "
                       f"and nothing changed since, so nothing was re-deployed -> {where}")
        else:
            out.append(f"DEPLOYED {version} (candidate {result['selected']!r}) -> {where}")
        for c in gates.unconfirmed or []:
            out.append(f"  set aside first: {c.candidate!r} passed every gate on val but not on test: "
                       + "; ".join(f.describe() for f in c.gates.to_report().failures))
        production = result.get("production_version")
        if production and production != result["deployed_version"]:
            out.append(f"production is {production}: a rollback from {result['deployed_version']} stands (nothing "
                       f"changed since the deploy, so nothing was re-deployed over it; `shrinkflow rollback --to "
                       f"{result['deployed_version']}` undoes it)")
    elif result.get("kept_version"):
        # production measured as a candidate (a re-compression's window staged) won: nothing to promote
        kept, reason = result["kept_version"], result.get("kept_reason") or "it won the selection"
        out.append(f"KEPT production {kept}: {reason}"
                   + ("" if "nothing was promoted" in reason else "; nothing was promoted"))
        production = result.get("production_version")
        if production and production != kept:   # a helper's finding: it said KEPT v0006 with v0005 serving
            out.append(f"production is {production}: a rollback from {kept} stands (nothing changed since the run "
                       f"that kept {kept}, so nothing was re-deployed over it; `shrinkflow rollback --to {kept}` "
                       "undoes it)")
    else:
        out.append("NOT DEPLOYED: no candidate passed every gate; production is unchanged.")
        for name, d in gates.candidates.items():
            for f in d.to_report().failures:
                out.append(f"  {name} (val): {f.describe()}")
        for conf in [*(gates.unconfirmed or []), gates.confirmation]:
            if conf and not conf.passed:
                for f in conf.gates.to_report().failures:
                    out.append(f"  {conf.candidate} (test confirmation): {f.describe()}")
    out += _baselines_note(root, result)
    out += _commit_hint(root)
    out += ["metrics and gates: reports/gates.md, metrics/validate.json (or `dvc metrics show`)",
            f"Prefect flow run: {result['flow_run_name']} ({result['flow_run_id']}), "
            f"artifact 'shrinkflow-lifecycle'",
            "  browse it: shrinkflow ui (starts Prefect's UI on this project's runs and prints its address)",
            "status: shrinkflow status --json", "=" * 72]
    typer.echo("\n".join(out))


@_command("status", "Show the production version: figures, gates, lineage.")
def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print JSON"),
           params: ParamsOpt = None, debug: DebugOpt = False):
    """Show the deployed (production) version: test figures, gates, lineage.

    On a serving host (serve.registry: shared): the version the shared
    registry's production names, and the one this host's verified cache
    holds (its figures, its files verified), with a warning when the cache
    lags or the shared registry cannot be used."""
    from shrinkflow.errors import RegistryError
    from shrinkflow.registry import Registry
    from shrinkflow.status import status_report, status_text

    s = _session(ctx)
    if s.params.serve.registry == "shared":
        return _serving_host_status(s, as_json, debug)
    try:
        report = status_report(Registry(s.root / s.params.deploy.registry_dir))
    except RegistryError as exc:
        raise _crash(exc, "status", debug, message=str(exc))
    typer.echo(json.dumps(report.to_json_dict(), indent=2, sort_keys=True) if as_json else status_text(report))
    if not as_json and report.deployed is not None and report.deployed.integrity != "verified":
        raise typer.Exit(ExitCode.CRASH)


def _serving_host_status(s: Session, as_json: bool, debug: bool) -> None:
    """`status` with serve.registry: shared: the shared production against
    this host's cache (shrinkflow.status.serving_host_status). Exit 3 as for
    the local registry (the cached production fails its hashes, or the cache
    is unusable), and when the shared registry cannot be used and nothing is
    cached (as `serve` would)."""
    from shrinkflow.errors import RegistryError
    from shrinkflow.registry import Registry
    from shrinkflow.shared_registry import SharedRegistry
    from shrinkflow.status import serving_host_status, serving_host_text

    sp = s.params.shared_registry
    try:
        report = serving_host_status(Registry(s.root / sp.cache_dir), SharedRegistry(sp.url, sp.connect_timeout_s))
    except RegistryError as exc:
        raise _crash(exc, "status", debug, message=str(exc))
    typer.echo(json.dumps(report.to_json_dict(), indent=2, sort_keys=True) if as_json
               else serving_host_text(report))
    if report.deployed is None and report.shared.state == "unusable":
        raise typer.Exit(ExitCode.CRASH)
    if not as_json and report.deployed is not None and report.deployed.integrity != "verified":
        raise typer.Exit(ExitCode.CRASH)


@_command("serve", "Serve the production version over HTTP.")
def serve(ctx: typer.Context,
          host: Optional[str] = typer.Option(None, "--host", help="default: serve.host (127.0.0.1)"),
          port: Optional[int] = typer.Option(None, "--port", min=0, max=65535,
                                             help="default: serve.port; 0: a free port (printed)"),
          workers: int = typer.Option(1, "--workers", min=1, help="uvicorn worker processes"),
          params: ParamsOpt = None, debug: DebugOpt = False):
    """Serve the registry's production version over HTTP (FastAPI + uvicorn)."""
    import uvicorn

    from shrinkflow.errors import IntegrityError, RegistryError
    from shrinkflow.httpedge import PROTOCOL
    from shrinkflow.predlog import PredictionLogError, prediction_log
    from shrinkflow.serving import TOKEN_ENV, make_app, served_registry

    s = _session(ctx)
    root, parsed = s.root, s.params
    if workers > 1 and not s.own_params:
        raise _fail(ExitCode.USAGE, "--params with --workers > 1: each worker reads the project's params.yaml")
    sp = parsed.serve
    # serve.registry: shared: a local cache kept at the shared registry's production
    registry, follower = served_registry(root, parsed)
    source = (f"the shared registry {parsed.shared_registry.url} (verified copy in {registry.root})"
              if follower is not None else str(registry.root))
    try:  # refuse to start rather than fail on the first request
        from shrinkflow.serving import model_labels

        if follower is not None:
            _follow_at_start(follower)
        if registry.alias() is None:
            raise _fail(ExitCode.NOTHING, f"cannot serve: the shared registry {parsed.shared_registry.url} has "
                                          "nothing in production: is the storage mounted, is the URL right? (Else `shrinkflow publish` on "
                                          "the host that deploys sends production there)" if follower is not None else
                                          f"cannot serve: registry {registry.root}: nothing is in production "
                                          "(shrinkflow run deploys one)")
        model_labels(registry.load().path, registry.alias() or "")   # no label names: nothing to answer with
        # The log too: locked or unwritable, say so here, not in a traceback
        # from inside uvicorn's startup.
        log = prediction_log(root, sp)   # serve.log_url (PostgreSQL) or serve.log_path (SQLite)
        log.open()
    except (RegistryError, IntegrityError, PredictionLogError, OSError) as exc:
        raise _crash(exc, "serve", debug, message=f"cannot serve: {exc}")
    host, port = host or sp.host, sp.port if port is None else port
    from shrinkflow.ports import listening_socket, port_is_free

    sock = None
    if port == 0:   # as `monitor ui --port 0`: a free port, printed below
        # Bound and listening here, and handed to uvicorn: no other process
        # can take the port between its pick and uvicorn's bind.
        try:
            sock = listening_socket(host)
        except OSError as exc:
            log.close()
            raise _fail(ExitCode.CRASH, f"cannot serve on {host}: {exc}")
        port = sock.getsockname()[1]
    elif not port_is_free(host, port):
        log.close()
        raise _fail(ExitCode.CRASH, f"cannot serve: {host}:{port} is already in use (another server? `--port 0` "
                                    "picks a free port)")
    typer.echo(f"serving {registry.alias()} from {source} on http://{host}:{port} "
               f"(docs at /docs, monitoring reports at /reports/; prediction log {log.location})")
    # The HTTP edge (shrinkflow/httpedge.py): header size and count limits and
    # a request deadline, which uvicorn's default protocol does not have; no
    # WebSockets (the API has none, and an upgraded connection would escape
    # those limits). The limits come from the app (serve: in params.yaml).
    edge = {"http": PROTOCOL, "ws": "none", "log_level": "warning"}
    from shrinkflow.serving.app import log_to_stderr

    log_to_stderr()   # hot reloads and refusals, timestamped
    if workers > 1:
        os.environ["SHRINKFLOW_PROJECT"] = str(root)
        _run_workers(uvicorn.Config("shrinkflow.serving:app_from_env", factory=True, host=host, port=port,
                                    workers=workers, **edge), sock, root / STATE)
        return
    log.close()   # the app opens its own connections on its event loop's threads
    app_ = make_app(registry, prediction_log(root, sp), sp, reports_dir=root / parsed.monitor.reports_dir,
                    token=os.environ.get(TOKEN_ENV) or None, follower=follower)
    if sock is None:
        uvicorn.run(app_, host=host, port=port, **edge)
        return
    server = uvicorn.Server(uvicorn.Config(app_, host=host, port=port, **edge))   # as uvicorn.run, on our socket
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(3)   # uvicorn's STARTUP_FAILURE, as uvicorn.run exits


def _run_workers(config, sock, state_dir: Path) -> None:
    """``serve --workers N``: what ``uvicorn.run`` does for workers (its
    Multiprocess supervisor), on ``sock`` when one is bound already (else
    the config binds one). A SIGTERM stops the workers gracefully, then ends
    this process by that signal, as one worker does (the shell's 143, not
    0); Ctrl-C exits 0. Each worker also stops by itself should this
    process die (``shrinkflow.serving.app.stop_with_parent``). The workers
    count their metrics in files under a fresh folder,
    ``state_dir/metrics-<pid>`` (``shrinkflow.serving.metrics.MULTIPROC_ENV``),
    removed at the end (a killed server's, by the next ``serve --workers``),
    so that /metrics answers for the whole server."""
    import shutil
    import signal

    import psutil
    from uvicorn.supervisors import Multiprocess

    from shrinkflow.serving.metrics import MULTIPROC_ENV

    class Supervisor(Multiprocess):
        terminated = False

        def handle_term(self) -> None:
            self.terminated = True
            super().handle_term()

    # /metrics sums every worker's counts (prometheus_client's multiprocess
    # mode): a fresh folder for this server's workers, set before they start.
    for old in state_dir.glob("metrics-*"):   # those of servers killed outright
        pid = old.name.removeprefix("metrics-")
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = state_dir / f"metrics-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    try:
        supervisor = Supervisor(config, sockets=[sock if sock is not None else config.bind_socket()])
        supervisor.run()
    finally:
        shutil.rmtree(os.environ.pop(MULTIPROC_ENV), ignore_errors=True)
    if supervisor.terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _follow_at_start(follower) -> None:
    """Bring the serving cache to the shared production before serving.
    When the shared registry cannot be used, serve what the cache holds (a
    restart while the storage is down), with a warning; with nothing
    cached, re-raise (exit 3)."""
    from shrinkflow.shared_registry import SharedRegistryError, VersionRefused

    try:
        follower.sync()
    except (SharedRegistryError, VersionRefused, OSError) as exc:
        cached = follower.cache.alias()
        if cached is None:
            raise
        typer.echo(f"warning: {exc}; serving {cached} from the local copy ({follower.cache.root}) until the shared "
                   "registry answers with a sound version", err=True)


@_command("rollback", "Move production back to an earlier version.")
def rollback(ctx: typer.Context,
             to: Optional[str] = typer.Option(None, "--to", metavar="VERSION",
                                              help="version to make production (default: the previous production "
                                                   "version)"),
             params: ParamsOpt = None, debug: DebugOpt = False):
    """Move production back atomically (recorded in the registry's history)."""
    from shrinkflow.errors import IntegrityError, NothingToRollBack, RegistryError, UnknownVersion
    from shrinkflow.registry import Registry

    s = _session(ctx)
    registry = Registry(s.root / s.params.deploy.registry_dir)
    if (note := _serving_host_note(s, registry)) is not None:
        raise _fail(ExitCode.NOTHING, f"{note}: roll back on the host that deploys (it publishes the move and every "
                                      "serving host follows), or `shrinkflow pull` here first to make this "
                                      "checkout one that deploys")
    if not registry.root.is_dir():   # said before the rollback's lock would create it (a newcomer's finding)
        raise _fail(ExitCode.NOTHING, f"nothing to roll back: there is no registry at {registry.root} "
                                      "(deploy.registry_dir; `shrinkflow run` deploys the first version)")
    # A run or an acting monitor may deploy meanwhile, and its report would name this move as its own
    # (a helper's finding): one writer at a time.
    hold_project(s, "shrinkflow rollback")
    try:
        done = registry.rollback(to)
    except UnknownVersion as exc:
        raise _fail(ExitCode.USAGE, str(exc))
    except NothingToRollBack as exc:
        raise _fail(ExitCode.NOTHING, str(exc))
    except IntegrityError as exc:
        raise _crash(exc, "rollback", debug, message=f"refusing to roll back to a corrupted version: {exc}")
    except RegistryError as exc:
        raise _crash(exc, "rollback", debug, message=str(exc))
    typer.echo(f"production: {done.previous} -> {done.version}")
    _publish_after(s, "rollback", debug)


def _publish_after(s: Session, what: str, debug: bool) -> None:
    """With shared_registry.url set, publish the registry after ``what``
    moved production here; when that fails, exit 3 saying that production
    moved here but not where serving hosts look."""
    from shrinkflow.shared_registry import publish_project

    published, warning = publish_project(s.root, s.params)
    if published is not None:
        typer.echo(published.describe())
    elif warning is not None:
        raise _fail(ExitCode.CRASH, f"the {what} is done in {s.params.deploy.registry_dir}/, but {warning}")


@_command("publish", "Publish the registry to the shared registry serving hosts follow.")
def publish(ctx: typer.Context,
            fresh: bool = typer.Option(False, "--fresh", help="publish to a shared registry that holds nothing "
                                                              "although this registry published there before (a "
                                                              "new, empty one on purpose)"),
            check_all: bool = typer.Option(False, "--check-all", help="read back every shared version, not only "
                                                                      "production, and upload broken ones again"),
            params: ParamsOpt = None, debug: DebugOpt = False):
    """Publish this machine's registry to shared_registry.url: every version the shared registry lacks
    (verified here, uploaded under a temporary name, renamed when complete), the deploy record, then the
    production alias (renamed into place); then production's shared copy is read back, and uploaded again
    when it fails its hashes. `shrinkflow run` and `rollback` do it by themselves; run it for a registry
    built before the URL was set, or after a publish failed. Serving hosts with serve.registry: shared
    follow (docs/team.md)."""
    from shrinkflow.errors import IntegrityError, RegistryError
    from shrinkflow.paths import DEPLOYMENT
    from shrinkflow.registry import Registry
    from shrinkflow.shared_registry import SharedRegistry, SharedRegistryError

    s = _session(ctx)
    shared = s.params.shared_registry
    if shared.url is None:
        raise _fail(ExitCode.USAGE, "shared_registry.url is not set in the params: nothing to publish to "
                                    "(docs/team.md, \"The production model on every serving host\")")
    registry = Registry(s.root / s.params.deploy.registry_dir)
    try:
        if not registry.versions():
            raise _fail(ExitCode.NOTHING, f"registry {registry.root} holds no version: nothing to publish "
                                          "(shrinkflow run deploys one)")
        done = SharedRegistry(shared.url, shared.connect_timeout_s).publish(
            registry, deployment=s.root / DEPLOYMENT, fresh=fresh, check_all=check_all)
    except IntegrityError as exc:
        raise _crash(exc, "publish", debug, message=f"refusing to publish a corrupted version (nothing of it was "
                                                    f"uploaded): {exc}")
    except (SharedRegistryError, RegistryError, OSError) as exc:
        raise _crash(exc, "publish", debug, message=str(exc))
    typer.echo(done.describe())


@_command("pull", "Copy the shared registry into this checkout (a second clone, after `dvc pull`).")
def pull(ctx: typer.Context,
         discard_local: bool = typer.Option(False, "--discard-local", help="when this registry and the shared one "
                                                                          "diverged, take the shared one's history "
                                                                          "and aliases; versions only here are set "
                                                                          "aside in registry/set-aside/"),
         params: ParamsOpt = None, debug: DebugOpt = False):
    """Copy shared_registry.url into this checkout's registry: every version it lacks, verified against
    its hashes, then the history and the aliases; and restore deploy/deployment.json, the deploy record
    that dvc.lock pins (the deploying host published it). After `dvc pull` and this, a second clone has
    a clean `dvc status`, `shrinkflow status` shows the same production version, and a `shrinkflow run`
    here publishes its own new versions to the same shared registry (docs/team.md)."""
    from shrinkflow.errors import IntegrityError, RegistryError
    from shrinkflow.shared_registry import SharedRegistryError, pull_project

    s = _session(ctx)
    if s.params.shared_registry.url is None:
        raise _fail(ExitCode.USAGE, "shared_registry.url is not set in the params: nothing to pull from "
                                    "(docs/team.md, \"A teammate gets everything\")")
    try:
        done = pull_project(s.root, s.params, discard_local=discard_local)
    except SharedRegistryError as exc:
        if "holds nothing in production" in str(exc):
            raise _fail(ExitCode.NOTHING, str(exc))
        raise _crash(exc, "pull", debug, message=str(exc))
    except IntegrityError as exc:
        raise _crash(exc, "pull", debug, message=f"refusing a corrupted version (nothing of it was copied): {exc}")
    except (RegistryError, OSError) as exc:
        raise _crash(exc, "pull", debug, message=str(exc))
    typer.echo(done.describe())


@_command("versions", "List every version and when it was live.")
def versions(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="print JSON"),
             params: ParamsOpt = None, debug: DebugOpt = False):
    """List every version: key figures, when it was live, and which is live now."""
    from shrinkflow.registry import Registry
    from shrinkflow.status import versions_text

    s = _session(ctx)
    registry = Registry(s.root / s.params.deploy.registry_dir)
    try:
        rows = registry.describe_versions()
    except Exception as exc:  # noqa: BLE001
        raise _crash(exc, "versions", debug)
    note = _serving_host_note(s, registry)
    if note is not None and not as_json:
        typer.echo(f"{note}: `shrinkflow status` shows the shared production and this host's copy; the versions "
                   "are listed on the host that deploys (or here after `shrinkflow pull`)")
        return
    typer.echo(json.dumps([r.to_json_dict() for r in rows], indent=2, sort_keys=True) if as_json
               else versions_text(rows))


def _serving_host_note(s: Session, registry) -> Optional[str]:
    """What to say instead of the deploying host's advice when this
    checkout serves from the shared registry (serve.registry: shared) and
    its own registry holds nothing; None otherwise."""
    if s.params.serve.registry != "shared" or registry.versions():
        return None
    return (f"this checkout is a serving host (serve.registry: shared, {s.params.shared_registry.url}) and its "
            f"{s.params.deploy.registry_dir}/ holds no version")


def _schedule_of(cron: Optional[str], interval: Optional[int], p_cron: Optional[str],
                 p_minutes: Optional[int], flag: str) -> tuple[Optional[str], Optional[int]]:
    """Flags override params; exactly one of cron and interval (seconds).

    A cron that Prefect would refuse, or that has no next run at all (31
    February: Prefect accepts it, then its scheduler logs an error every
    minute and never starts a run), exits 2 naming it, before Prefect is
    imported or anything is started. Params crons were checked the same way
    when params.yaml was loaded (``MonitorParams``)."""
    from shrinkflow.config import cron_next_run

    if cron is not None and interval is not None:
        typer.echo(f"error: give exactly one of --{flag}cron or --{flag}interval", err=True)
        raise typer.Exit(ExitCode.USAGE)
    if cron is None and interval is None:
        cron, interval = p_cron, (p_minutes * 60 if p_minutes else None)
    if cron is not None:
        try:  # the scheduler's own cron library, before anything is started
            cron_next_run(cron)
        except ValueError as exc:
            typer.echo(f"error: --{flag}cron {exc}", err=True)  # exc starts with the expression
            raise typer.Exit(ExitCode.USAGE)
    return cron, interval


def deployment_schedule(cron: Optional[str], interval_s: Optional[int]) -> dict:
    """The schedule keyword of ``Flow.to_deployment`` for exactly one of a
    cron (UTC, as before) and an interval in seconds: the interval as a
    Prefect ``Interval`` on the fixed anchor of ``shrinkflow.schedules``
    (Prefect's own default anchor is the moment it is deployed, so each
    start of `schedule` would move the runs)."""
    if cron is not None:
        return {"cron": cron}
    from prefect.schedules import Interval

    from shrinkflow.schedules import INTERVAL_ANCHOR

    return {"schedule": Interval(interval_s, anchor_date=INTERVAL_ANCHOR, timezone="UTC")}


@_command("schedule", "Run the lifecycle and the monitor on schedules.")
def schedule(ctx: typer.Context,
             cron: Optional[str] = typer.Option(None, "--cron", help='lifecycle cron, e.g. "0 3 * * 0" '
                                                "(default: monitor.lifecycle_cron / lifecycle_interval_minutes)"),
             interval: Optional[int] = typer.Option(None, "--interval", min=1, help="lifecycle: seconds between runs"),
             monitor_cron: Optional[str] = typer.Option(None, "--monitor-cron", help="monitor cron (default: "
                                                        "monitor.cron / interval_minutes)"),
             monitor_interval: Optional[int] = typer.Option(None, "--monitor-interval", min=1,
                                                            help="monitor: seconds between runs"),
             name: str = typer.Option("scheduled", "--name", help="deployment name (both flows)"),
             params: ParamsOpt = None, debug: DebugOpt = False):
    """Serve the lifecycle and the monitor as Prefect deployments, each on its
    own schedule, in one process (Ctrl-C stops).

    With no PREFECT_API_URL set, a local Prefect server (with the scheduler
    that turns schedules into runs) is started first, its state in .prefect/,
    and stopped on the way out (also when this process is killed). A
    lifecycle run is a full `shrinkflow run` (DVC skips what is unchanged); a
    monitor run reports on the prediction log and re-compresses when the
    policy says so. One run at a time.

    A cron with no next run (31 February) exits 2 before anything starts.
    The scheduler's errors happen inside the server: the local server's log
    is followed and its errors echoed to stderr (each kind once); for any
    server, external ones included, each deployment is checked 90 s after it
    is served to have a scheduled run, and a warning names the one without.
    """
    s = _session(ctx)
    root, m = s.root, s.params.monitor
    # Checked before Prefect is imported: a schedule that cannot run starts
    # nothing and writes nothing (no .prefect/).
    cron, interval = _schedule_of(cron, interval, m.lifecycle_cron, m.lifecycle_interval_minutes, "")
    monitor_cron, monitor_interval = _schedule_of(monitor_cron, monitor_interval, m.cron, m.interval_minutes,
                                                  "monitor-")
    wait = m.scheduled_wait_minutes * 60
    from shrinkflow.projectlock import ProjectBusy, hold_scheduler

    try:   # one scheduler per project (a `team up` starting holds it too), before --params is copied
        hold_scheduler(root)
    except ProjectBusy as exc:
        raise _fail(ExitCode.USAGE, str(exc))
    from flows.team import TeamStack

    team_worker = TeamStack(root).worker
    if team_worker.running():   # the team stack's worker serves these schedules already
        raise _fail(ExitCode.USAGE, f"`shrinkflow team up` serves this project's schedules ({root}): its worker "
                                    f"runs (pid {team_worker.pid}), and both would run every schedule; stop it "
                                    "first (`shrinkflow team down`), or keep the team stack. Nothing was started")
    adopt_params(s)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.prefect_server import (SCHEDULER_PID_ENV, LocalPrefectServer, ScheduleWatch, ServerLogFollower,
                                      crash_lost_runs, drain_api_logs, thin_missed_runs)
    from shrinkflow.config import cron_next_run
    from shrinkflow.schedules import interval_next_run

    _stop_on_signals()
    server = follower = watch = None
    api_url = os.environ.get("PREFECT_API_URL")

    def warn(line: str) -> None:
        typer.echo(line, err=True)

    try:
        if not api_url:
            server = LocalPrefectServer(root / PREFECT_HOME)
            typer.echo(f"starting a local Prefect server (state in {PREFECT_HOME}/, log {server.log_path}) ...")
            server.home.mkdir(parents=True, exist_ok=True)
            follower = ServerLogFollower(server.log_path, emit=warn)  # from the log's end before this start
            api_url = server.start()
            follower.start()
            os.environ["PREFECT_API_URL"] = api_url  # inherited by every run's subprocesses
            typer.echo(f"Prefect UI: {server.url}  (API {api_url}); its errors are echoed here")
        else:
            typer.echo(f"using the Prefect server at {api_url}: its scheduler's errors are in that server's log; "
                       "each deployment is checked for a scheduled run 90 s after it is served")
        from prefect import serve as prefect_serve

        from flows.lifecycle import lifecycle
        from flows.monitor import monitor

        def when(c, i):
            if c:
                return f"cron {c!r}, next run {cron_next_run(c):%Y-%m-%d %H:%M} UTC"
            return f"every {i}s, next run {interval_next_run(i):%Y-%m-%d %H:%M:%S} UTC"

        typer.echo(f"serving deployments shrinkflow-lifecycle/{name} ({when(cron, interval)}) and "
                   f"shrinkflow-monitor/{name} ({when(monitor_cron, monitor_interval)}) for {root} "
                   f"against {api_url}; a run that finds the project held by another writer waits up to "
                   f"{m.scheduled_wait_minutes:g} min (monitor.scheduled_wait_minutes); Ctrl-C stops")
        served = [f"{lifecycle.name}/{name}", f"{monitor.name}/{name}"]
        # An earlier session's runs that came due while nothing served them:
        # the newest runs now, with this session's parameters; the rest are
        # cancelled, and said.
        parameters = {"project_dir": str(root), "wait_for_project_s": wait}
        from prefect.client.orchestration import get_client

        with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            # and runs an earlier session left Running: killed with it, they could not say so. Only
            # on this project's own server: an external one's runs may live on other hosts.
            for line in crash_lost_runs(client, served, why="it ended with the `shrinkflow schedule` that ran it "
                                                            "and could not report its end") if server else ():
                typer.echo(line)
            # "busy": an earlier session serving at capacity (one run at a time) skips nothing, but
            # a run due while another ran waits Late too (a helper's finding: "no schedule served it").
            for line in thin_missed_runs(client, served, parameters=parameters,
                                         why="no `shrinkflow schedule` started it (none served it, "
                                             "or it was busy with an earlier run)"):
                typer.echo(line)
        watch = ScheduleWatch(api_url, served, emit=warn).start()
        os.environ[SCHEDULER_PID_ENV] = str(os.getpid())   # its runs stop when it is killed (tie_to_scheduler)
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            prefect_serve(
                # A scheduled run waits for a writer someone started by
                # hand (monitor.scheduled_wait_minutes), then fails.
                lifecycle.to_deployment(name=name, parameters=parameters, **deployment_schedule(cron, interval)),
                monitor.to_deployment(name=name, parameters=parameters,
                                      **deployment_schedule(monitor_cron, monitor_interval)),
                # One run at a time across both: each may run DVC in this
                # workspace (a re-compression is a `dvc repro`), and DVC
                # allows one repro per workspace.
                limit=1, print_starting_message=False)
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001
        raise _crash(exc, "the schedule", debug)
    finally:
        if watch is not None:
            watch.stop()
        if server is not None:
            drain_api_logs()   # while the server still takes them: no "Error logging to API" after it stops
            server.stop()
            typer.echo("stopped the local Prefect server")
        if follower is not None:
            follower.stop()  # what the server logged while stopping
            if follower.repeats:
                warn(f"(the Prefect server logged {follower.repeats} more errors like those above; "
                     f"see {follower.path})")


class TeamAction(str, Enum):
    up = "up"
    down = "down"
    status = "status"
    env = "env"


@_command("team", "The team stack: PostgreSQL, a Prefect server, a work pool and its worker.")
def team(ctx: typer.Context,
         action: TeamAction = typer.Argument(..., metavar="up|down|status|env",
                                             help="up: start (or complete) the stack and deploy; down: stop all "
                                                  "of it; status: say what runs; env: print the variables "
                                                  "prefect.yaml reads (and the API), for `prefect deploy --all` by "
                                                  "hand"),
         cron: Optional[str] = typer.Option(None, "--cron", help="up: lifecycle cron (default: "
                                            "monitor.lifecycle_cron / lifecycle_interval_minutes)"),
         interval: Optional[int] = typer.Option(None, "--interval", min=1, help="up: lifecycle: seconds "
                                                "between runs"),
         monitor_cron: Optional[str] = typer.Option(None, "--monitor-cron", help="up: monitor cron (default: "
                                                    "monitor.cron / interval_minutes)"),
         monitor_interval: Optional[int] = typer.Option(None, "--monitor-interval", min=1,
                                                        help="up: monitor: seconds between runs"),
         pool: Optional[str] = typer.Option(None, "--pool", help="the process work pool (default: the last up's, "
                                            "else shrinkflow)"),
         host: str = typer.Option("127.0.0.1", "--host", help="up: address the Prefect server listens on"),
         port: Optional[int] = typer.Option(None, "--port", min=1, max=65535,
                                            help="up: the Prefect server's port (default: the last up's when "
                                                 "free, else 4200 when free, else a free one)"),
         params: ParamsOpt = None, debug: DebugOpt = False):
    """Run the project the way a team does, on this host: `up` initialises a PostgreSQL cluster in
    .shrinkflow/team/ (or reuses it, its data and its port), starts a Prefect server on it, creates the
    process work pool, deploys prefect.yaml (the lifecycle and the monitor, on params.yaml's schedules) and
    starts a worker; they keep running after this command ends. `down` stops them all; `status` says what
    runs. With PREFECT_API_DATABASE_CONNECTION_URL set the server uses that database; with PREFECT_API_URL set
    that server is used and only the pool, the deployments and the worker are handled here (docs/team.md)."""
    s = _session(ctx)
    from flows.team import Schedules, TeamError, TeamStack, deploy_env

    stack = TeamStack(s.root, pool=pool, host=host, port=port, emit=typer.echo)
    if action is TeamAction.env:
        import shlex

        api = stack.api_url()
        for k, v in {**({"PREFECT_API_URL": api} if api else {}), **deploy_env(s.root, stack.pool)}.items():
            typer.echo(f"export {k}={shlex.quote(v)}")
        return
    if action is TeamAction.up:
        m = s.params.monitor
        c, i = _schedule_of(cron, interval, m.lifecycle_cron, m.lifecycle_interval_minutes, "")
        mc, mi = _schedule_of(monitor_cron, monitor_interval, m.cron, m.interval_minutes, "monitor-")
        from shrinkflow.projectlock import ProjectBusy, hold_scheduler

        try:   # while it starts, a `schedule` of this project is refused; once up, its worker refuses one
            hold_scheduler(s.root, "shrinkflow team up")
        except ProjectBusy as exc:   # a `schedule` serves the project: both would run every schedule
            raise _fail(ExitCode.USAGE, str(exc))
        schedules = Schedules(c, i, mc, mi, from_params=all(
            v is None for v in (cron, interval, monitor_cron, monitor_interval)),
            wait_for_project_s=m.scheduled_wait_minutes * 60)
        adopt_params(s)
        from shrinkflow.pgcluster import PgClusterError

        try:
            ui_url = stack.up(schedules)
        except (TeamError, PgClusterError) as exc:
            raise _crash(exc, "team up", debug, message=f"{exc}\n(what is already up keeps running: "
                                                        "`shrinkflow team status`; `shrinkflow team down` "
                                                        "stops it)")
        except Exception as exc:  # noqa: BLE001
            raise _crash(exc, "team up", debug)
        typer.echo(f"Prefect UI: {ui_url}  (API {stack.api_url()}); `shrinkflow team down` stops the stack")
        return
    if action is TeamAction.down:
        try:
            stopped = stack.down()
        except Exception as exc:  # noqa: BLE001
            raise _crash(exc, "team down", debug)
        typer.echo("stopped: " + ", ".join(stopped) if stopped else "nothing of the team stack was running")
        return
    try:
        st = stack.status()
    except Exception as exc:  # noqa: BLE001
        raise _crash(exc, "team status", debug)
    typer.echo(st.text())
    if st.none_running:
        raise typer.Exit(ExitCode.NOTHING)
    if not st.all_running:
        raise typer.Exit(ExitCode.CRASH)


@_command("ui", "Browse past runs in Prefect's UI.")
def ui(ctx: typer.Context,
       host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
       port: int = typer.Option(4200, "--port", min=1, max=65535, help="port to listen on"),
       params: ParamsOpt = None, debug: DebugOpt = False):
    """Browse this project's past runs and artifacts: start a local Prefect
    server on its state (.prefect/), print the UI's address, and serve until
    Ctrl-C. The server's scheduler is off: nothing runs from here."""

    from flows.prefect_server import LocalPrefectServer

    s = _session(ctx)
    _stop_on_signals()
    server = LocalPrefectServer(s.root / PREFECT_HOME, host=host, port=port, scheduler=False)
    if os.environ.get("PREFECT_API_URL"):
        typer.echo(f"note: PREFECT_API_URL is set ({os.environ['PREFECT_API_URL']}): runs made against that "
                   "server are in its own UI, not here")
    try:
        typer.echo(f"starting a local Prefect server (state in {PREFECT_HOME}/, log {server.log_path}) ...")
        server.start()
        typer.echo(f"Prefect UI: {server.url}  (API {server.api_url}); Ctrl-C stops")
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001
        raise _crash(exc, "the Prefect UI", debug)
    finally:
        server.stop()


class TrafficDomain(str, Enum):
    in_ = "in"
    shifted = "shifted"


@_command("simulate-traffic", "Send real texts (and feedback) to a running server.")
def simulate_traffic(
        ctx: typer.Context,
        domain: TrafficDomain = typer.Option(..., "--domain", help="in: the test split; shifted: the traffic "
                                             "pool of the shifted split (the user's, or the built-in tweets), "
                                             "never its recovery set"),
        n: int = typer.Option(..., "--n", min=1, help="predictions to request (the pool is cycled if smaller)"),
        feedback_rate: float = typer.Option(0.0, "--feedback-rate", min=0.0, max=1.0,
                                            help="share of answered predictions whose true label is posted"),
        url: Optional[str] = typer.Option(None, "--url", help="default: http://serve.host:serve.port"),
        seed: int = typer.Option(0, "--seed", help="order of the texts and choice of the feedback"),
        concurrency: int = typer.Option(4, "--concurrency", min=1, max=256, help="requests in flight"),
        params: ParamsOpt = None, debug: DebugOpt = False):
    """Send real texts to a running `shrinkflow serve`, one POST /predict
    each, and post the true label (by name) of a seeded share of the answers
    to /feedback (bearer token from SHRINKFLOW_API_TOKEN when set)."""
    from shrinkflow.errors import DataError
    from shrinkflow.serving import TOKEN_ENV
    from shrinkflow.traffic import (ServedLabelsDiffer, ServerUnreachable, server_url, simulate, traffic_order,
                                    traffic_pool)

    s = _session(ctx)
    root, parsed = s.root, s.params
    if url is None:
        url = server_url(parsed.serve.host, parsed.serve.port)
    else:
        import httpx

        try:
            parsed_url = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise _fail(ExitCode.USAGE, f"--url {url!r} is not a URL: {exc}")
        if parsed_url.scheme not in ("http", "https") or not parsed_url.host:
            raise _fail(ExitCode.USAGE, f"--url {url!r} is not an http(s) URL with a host "
                                        "(e.g. http://127.0.0.1:8000)")
    from shrinkflow.labels import BUILTIN_LABELS, read_labels
    from shrinkflow.paths import LABELS_JSON

    # The user's task (data.source.kind: files) or the built-in archive.
    kind = getattr(getattr(getattr(parsed, "data", None), "source", None), "kind", None)
    try:
        pool = traffic_pool(domain.value, root, kind)
        # Feedback is posted by name: the names the data stage wrote (the
        # built-in task before labels.json existed: its two).
        names = read_labels(root / LABELS_JSON) if kind == "files" or (root / LABELS_JSON).is_file() \
            else BUILTIN_LABELS
    except (MissingInput, DataError) as exc:
        typer.echo(f"error: cannot read the {domain.value!r} traffic: {exc}", err=True)
        raise typer.Exit(ExitCode.CRASH)
    if len(pool) == 0:
        hint = (": this task has no shifted data; set data.source.shifted_path to labelled text of another "
                "domain and run `shrinkflow run`" if domain.value == "shifted" and kind == "files" else "")
        typer.echo(f"error: the {domain.value!r} traffic pool is empty: nothing to send{hint}", err=True)
        raise typer.Exit(ExitCode.USAGE if hint else ExitCode.CRASH)
    bad = sorted({int(y) for y in pool["label"] if not 0 <= int(y) < len(names)})
    if bad:
        typer.echo(f"error: the {domain.value!r} traffic has class ids {bad} that {LABELS_JSON} "
                   f"({list(names)}) does not name: run `shrinkflow run` to prepare the data again", err=True)
        raise typer.Exit(ExitCode.CRASH)
    rows, passes = traffic_order(pool, n, seed)
    what = "test split" if domain.value == "in" else (
        "shifted traffic pool (the recovery set is never sent)" if kind == "files"
        else "shifted traffic pool (tweets; the recovery set is never sent)")
    typer.echo(f"sending {n} texts from the {what}, {len(pool)} texts, to {url}"
               + (f"; n is larger than the pool, so it is cycled ({passes} passes)" if passes > 1 else ""))
    try:
        res = simulate(url, rows["text"].tolist(), [names[int(y)] for y in rows["label"]],
                       feedback_rate=feedback_rate, seed=seed,
                       concurrency=concurrency, token=os.environ.get(TOKEN_ENV) or None, label_names=list(names))
    except ServerUnreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(ExitCode.CRASH)
    except ServedLabelsDiffer as exc:
        typer.echo(f"error: {exc} (from {LABELS_JSON}). Nothing was sent: send with --feedback-rate 0, or serve a "
                   "version of these labels", err=True)
        raise typer.Exit(ExitCode.USAGE)

    def counts(c) -> str:
        return ", ".join(f"{k}: {v}" for k, v in sorted(c.items())) or "none"

    sent = rows["label"].astype(int).value_counts(normalize=True)
    typer.echo(f"predict: {res.sent} requests; by status {counts(res.predict_status)}")
    typer.echo("texts sent, by their true label: " + ", ".join(f"{name} {sent.get(k, 0.0):.1%}"
                                                               for k, name in enumerate(names)))
    share = res.feedback_posted / res.answered if res.answered else 0.0
    typer.echo(f"feedback: {res.feedback_posted} labels posted ({share:.1%} of {res.answered} answered predictions; "
               f"asked {feedback_rate:.1%})" + (f"; by status {counts(res.feedback_status)}"
                                                 if res.feedback_status else ""))
    if res.unreachable:
        typer.echo(f"error: the server at {url} stopped answering: {counts(res.predict_status)}", err=True)
        raise typer.Exit(ExitCode.CRASH)
    if not res.ok:
        bad = {k: v for k, v in (res.predict_status + res.feedback_status).items() if k != "200"}
        hint = " (401: set SHRINKFLOW_API_TOKEN to the server's token)" if "401" in bad else ""
        typer.echo(f"error: some requests failed: {counts(bad)}{hint}", err=True)
        raise typer.Exit(ExitCode.REFUSED)


@_command("window", "Restore the window a version was re-compressed on.")
def window(ctx: typer.Context,
           version: str = typer.Argument(..., metavar="VERSION", help="a registry version, e.g. v0006"),
           out: Path = typer.Option(..., "--out", help="where to write the window's distillation text"),
           heldout: bool = typer.Option(False, "--heldout", help="restore the held-out part instead"),
           params: ParamsOpt = None, debug: DebugOpt = False):
    """Restore the production window a version was re-compressed on, from the
    DVC-tracked archive (data/windows/), by the md5 in its lineage."""
    from shrinkflow.errors import RegistryError
    from shrinkflow.registry import Registry
    from shrinkflow.window import restore_window

    s = _session(ctx)
    try:
        lineage = Registry(s.root / s.params.deploy.registry_dir).manifest(version).get("lineage") or {}
    except (KeyError, ValueError, RegistryError) as exc:   # no such version, or not a version name
        raise _fail(ExitCode.USAGE, str(exc.args[0]) if exc.args else str(exc))
    meta = lineage.get("window")
    if not meta:
        raise _fail(ExitCode.NOTHING, f"{version} was not re-compressed on a production window (no window in its "
                                      "lineage)")
    md5 = meta["heldout_md5"] if heldout else meta["texts_md5"]
    try:
        path = restore_window(s.root, md5, out)
    except (MissingInput, ValueError) as exc:
        raise _crash(exc, "window", debug, message=str(exc))
    typer.echo(f"{version}: window {md5} ({meta['rows_heldout' if heldout else 'rows_distill']} texts; monitor run "
               f"{meta.get('monitor_flow_run')}) -> {path}")


@_command("remote-ssh", "Share data and models through a DVC remote over SSH.")
def remote_ssh(ctx: typer.Context,
               name: str = typer.Argument(..., metavar="NAME", help="the remote's name, e.g. team"),
               url: str = typer.Argument(..., metavar="URL", help="ssh://[user@]host[:port]/absolute/path"),
               key_file: Path = typer.Option(..., "--key-file", metavar="PATH",
                                             help="your private key; written to .dvc/config.local only"),
               user: Optional[str] = typer.Option(None, "--user", metavar="NAME",
                                                  help="log in as this user instead of the URL's (this checkout "
                                                       "only: .dvc/config.local)"),
               default: bool = typer.Option(True, "--default/--no-default",
                                            help="make it the remote every push and pull uses"),
               timeout_s: int = typer.Option(SSH_CONNECT_TIMEOUT_S, "--timeout-s", min=1, metavar="SECONDS",
                                             help="connect timeout in seconds"),
               force: bool = typer.Option(False, "--force", help="replace a remote of the same name"),
               check: bool = typer.Option(True, "--check/--no-check", help="log in to the remote once configured"),
               params: ParamsOpt = None, debug: DebugOpt = False):
    """Add a DVC remote over SSH with real `dvc remote` commands: its name, URL and connect timeout in
    .dvc/config (commit it, so clones know the remote), the key file (and --user) in .dvc/config.local, which
    git ignores; by default it becomes the default remote, so `dvc push`, `dvc pull` and every push shrinkflow
    makes go there. Then it logs in once to check. docs/team.md says how to set up the server."""
    from shrinkflow.remote import RemoteError, add_ssh_remote, probe_remote, ssh_remote

    s = _session(ctx)
    try:
        remote = ssh_remote(name, url, key_file, user=user, default=default, timeout_s=timeout_s)
    except (ValueError, MissingInput) as exc:
        raise _fail(ExitCode.USAGE, str(exc))
    try:
        cmds = add_ssh_remote(s.root, remote, replace=force)
    except ValueError as exc:
        raise _fail(ExitCode.USAGE, str(exc))
    except RuntimeError as exc:
        raise _crash(exc, "remote-ssh", debug, message=f"{exc}\n(is dvc-ssh installed? scripts/setup.sh installs "
                                                        "it)")
    for cmd in cmds:
        typer.echo("dvc " + " ".join(cmd))
    if check:
        try:
            found = probe_remote(s.root, name)
        except RemoteError as exc:
            raise _crash(exc, "remote-ssh", debug, message=f"{exc}\n(the remote stays configured; fix the "
                                                            "server or the key, then `dvc push`)")
        typer.echo(f"remote {name!r} answered: {'its directory exists' if found else 'empty (dvc push creates it)'}")
    typer.echo(f"next: git add .dvc/config && git commit -m 'DVC remote {name}'; then `dvc push`. A teammate: "
               f"git clone, `dvc remote modify --local {name} keyfile ~/.ssh/THEIR_KEY`, `dvc pull` "
               "(docs/team.md)")


class MonitorView(str, Enum):
    ui = "ui"


@_command("monitor", "Run the monitor once (and re-compress if it says so); `monitor ui`: its dashboard.")
def monitor_cmd(ctx: typer.Context,
                view: Optional[MonitorView] = typer.Argument(
                    None, metavar="ui", help="ui: serve the Evidently dashboard of the past runs instead (until "
                                               "Ctrl-C)"),
                act: bool = typer.Option(True, "--act/--report-only",
                                         help="on a recompress verdict, run the re-compression flow"),
                as_json: bool = typer.Option(False, "--json", help="print JSON"),
                host: str = typer.Option("127.0.0.1", "--host", help="ui: address to listen on"),
                port: Optional[int] = typer.Option(None, "--port", min=0, max=65535,
                                                   help="ui: port (default 8100, where the reports index links "
                                                        "snapshots, or a free one when it is taken; 0: a free one)"),
                params: ParamsOpt = None, debug: DebugOpt = False):
    """Run the monitor once: Evidently reports on the newest prediction-log
    window, the policy's verdict, its snapshot in the project's Evidently
    workspace, and (on recompress) re-compression. `shrinkflow monitor ui`
    serves that workspace in Evidently's UI, whose dashboard shows the
    figures of every run over time (docs/monitoring.md)."""
    s = _session(ctx)
    if view is MonitorView.ui:
        return _monitor_ui(s, host, port, debug)
    # Acting, it may re-compress or retrain: DVC stages, the registry, so the
    # project is held and --params becomes params.yaml. Reporting only, it
    # holds nothing, so it reads --params where it is: a copy over params.yaml
    # would change what a running lifecycle's stages read.
    if act:
        adopt_params(s, hold="shrinkflow monitor")
        _stop_on_signals()   # SIGTERM and SIGHUP too unwind like Ctrl-C: a retrain puts the project back
    from shrinkflow.errors import RegistryError
    from shrinkflow.registry import Registry

    registry = Registry(s.root / s.params.deploy.registry_dir)
    try:
        production = registry.alias()
    except RegistryError as exc:
        raise _crash(exc, "the monitor", debug, message=str(exc))
    if production is None:  # said before Prefect starts a server for nothing
        raise _fail(ExitCode.NOTHING, f"nothing to monitor: registry {registry.root} has nothing in production "
                                      "(`shrinkflow run` deploys one; the monitor judges production's answers)")
    try:
        from flows.monitor import monitor
        from monitoring.run import prepare

        _short_failures(debug)
        with ephemeral_api(lambda: prepare(s.root, s.params)):
            result = monitor(project_dir=str(s.root), act=act,
                             params_path=None if act or s.own_params else str(s.params_path))
    except Exception as exc:  # noqa: BLE001
        raise _crash(exc, "the monitor", debug)
    from shrinkflow.retrain import production_lines

    rec = result.get("recompress") or result.get("retrain")
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "summary"} | {
            "summary": result.get("summary")}, indent=2, default=str))
    else:
        typer.echo(f"verdict: {result['action']}"
                   + (" (not acted on: --report-only; no re-compression, no cooldown started)"
                      if result["action"] in ("recompress", "retrain") and not result.get("acted") else ""))
        for r in result["reasons"]:
            typer.echo(f"  - {r}")
        for n in (result.get("summary") or {}).get("not_computed", []):
            typer.echo(f"  not computed on this window: {n['metric']}: {n['reason']}")
        tr = (result.get("summary") or {}).get("truncation")
        if tr:
            share = "not computed" if tr["share"] is None else f"{tr['share']:.3f} of {tr['known_rows']} rows"
            drift = tr.get("drift")
            typer.echo(f"truncated texts ({tr['strategy']}): window {share}; reference "
                       f"{tr['reference_share']:.3f}" + (f"; drift p={drift['value']:.3g}"
                                                         f"{' (drifted)' if drift['drifted'] else ''}"
                                                         if drift else ""))
        s = result.get("summary") or {}
        if s.get("class_share_reference"):
            cur = s.get("class_share_current") or {}
            typer.echo("class shares (window / reference): " + ", ".join(
                f"{k} {cur[k]:.2f}" if k in cur else f"{k} n/a" for k in s["class_share_reference"])
                + " / " + ", ".join(f"{v:.2f}" for v in s["class_share_reference"].values()))
        if result.get("report_dir"):
            typer.echo(f"reports: {result['report_dir']} (index: {Path(result['report_dir']).parent / 'index.html'})")
        ev = result.get("evidently") or {}
        if ev.get("snapshot_id"):
            typer.echo(f"Evidently: snapshot added to \"{ev['project']}\"; `shrinkflow monitor ui` shows the "
                       "dashboard over time")
        elif ev.get("error"):
            typer.echo(f"Evidently: the snapshot could not be added to the workspace (reports and verdict are "
                       f"kept): {ev['error']}")
        if rec is not None:
            kept = rec.get("kept_version")
            what = (f"DEPLOYED {rec['deployed_version']}" if rec["deployed_version"] else
                    f"KEPT production {kept}" if kept else "NOT DEPLOYED")
            typer.echo(f"{'retrain' if result.get('retrain') is not None else 're-compression'}: {what}: "
                       f"{rec['reason']}")
            win = rec.get("window") or {}
            if "rows_distill" in win:
                typer.echo(f"  its texts: {win['rows_distill']} distinct distilled, {win['rows_heldout']} held out "
                           f"for the window gates, of the newest {win.get('corpus_rows', '?')} logged rows "
                           f"(monitor.recompress_last_n, heldout_fraction); archived as data/windows/"
                           f"{win['texts_md5']}.txt")
            for line in production_lines(rec) if result.get("retrain") is not None else ():
                typer.echo(f"  {line}")
            for gate, f in (rec.get("teacher_gates") or {}).items():  # a retrain's: every one, passed or not
                typer.echo(f"  retrained teacher: {gate} {'passed' if f['passed'] else 'FAILED'}: {f['value']:.4g} "
                           f"(threshold {f['threshold']:.4g}, margin {f['margin']:+.4g})")
            for name, c in (rec.get("candidates") or {}).items():
                for gate, f in c["failed"].items():
                    typer.echo(f"  {name}: {gate} FAILED: {f['value']:.4g} (threshold {f['threshold']:.4g}, "
                               f"margin {f['margin']:+.4g})")
            if rec.get("push_warning"):
                typer.echo(f"warning: {rec['push_warning']}", err=True)
            if rec.get("publish_warning"):
                typer.echo(f"warning: {rec['publish_warning']}", err=True)
    if rec is not None and not rec["deployed_version"]:
        raise typer.Exit(ExitCode.REFUSED)


def _monitor_ui(s: Session, host: str, port: Optional[int], debug: bool) -> None:
    """``shrinkflow monitor ui``: Evidently's UI over the project's
    monitoring workspace, on ``host``, until Ctrl-C or SIGTERM."""

    from flows.evidently_ui import EvidentlyUI
    from monitoring.workspace import (UI_PORT, WORKSPACE, find_project, project_name, task_name,
                                      unreadable_workspace_files)
    from shrinkflow.ports import port_is_free

    _stop_on_signals()
    if port is None:
        port = UI_PORT if port_is_free(host, UI_PORT) else 0
        if port == 0:
            typer.echo(f"note: port {UI_PORT} is taken, so a free port is used: the reports index's snapshot "
                       f"links (port {UI_PORT}) will not reach this UI")
    elif port and not port_is_free(host, port):
        # Checked first: the UI's health check would otherwise be answered
        # by whatever holds the port, and this command announce a UI that
        # then dies (a helper's finding).
        raise _fail(ExitCode.CRASH, f"cannot serve the Evidently UI: {host}:{port} is already in use (another "
                                    "`shrinkflow monitor ui`? leave out --port to take a free one)")
    unreadable = unreadable_workspace_files(s.root / WORKSPACE)
    if unreadable:
        raise _fail(ExitCode.CRASH, f"the monitoring workspace has files Evidently cannot read: "
                                    f"{'; '.join(unreadable)}. Move the workspace aside (`mv {WORKSPACE} "
                                    f"{WORKSPACE}.bad`): the next `shrinkflow monitor` starts a new one "
                                    "(its reports and the index are kept)")
    ui = EvidentlyUI(s.root / WORKSPACE, s.root / STATE / "evidently-ui.log", host=host, port=port)
    try:
        typer.echo(f"starting Evidently's UI on the monitoring workspace ({WORKSPACE}/, log {ui.log_path}) ...")
        url = ui.start()
        typer.echo(f"Evidently UI: {url}  (workspace {WORKSPACE}/); Ctrl-C stops")
        task = task_name(s.params)
        project = find_project(s.root / WORKSPACE, task)
        if project:
            typer.echo(f"dashboard of \"{project_name(task)}\": {url}/projects/{project}")
        else:
            typer.echo(f"no monitor run is recorded for \"{project_name(task)}\" yet: each `shrinkflow monitor` "
                       "adds one")
        ui.serve_forever()
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001
        raise _crash(exc, "the Evidently UI", debug)
    finally:
        ui.stop()


def flush_prefect_workers(timeout_s: float = 30.0) -> None:
    """Send what Prefect's log and event workers still hold, and stop them,
    now: while the event loop they run on, and a temporary API server, still
    run. Left to the exit, logging's shutdown (the last exit handler) asks
    the log worker to drain after Prefect's exit handlers have stopped that
    loop, and waits its full 5 s timeout for an answer that cannot come (5.00
    s after every `shrinkflow monitor` here). Does nothing where Prefect was
    never imported."""
    if "prefect.logging.handlers" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout_s)


def main() -> None:
    """Console-script entry point: runs the app and exits with its ExitCode.
    Ctrl-C exits INTERRUPTED; an exception that escapes a command (a bug in
    the CLI itself) exits CRASH with its traceback, not Typer's exit 1, which
    means "refused" here. A command that returns exits through
    ``shrinkflow.bootstrap.exit_without_teardown``."""
    try:
        code = app(standalone_mode=False)
        if code == ExitCode.INTERRUPTED:
            # Typer turns a KeyboardInterrupt (Ctrl-C, or SIGTERM/SIGHUP via
            # _stop_on_signals) into Exit(130) and returns it: said like one
            # raised here (a helper's finding: exit 130 with nothing said)
            typer.echo("interrupted", err=True)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("interrupted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except typer.TyperException as exc:  # a bad flag or argument: Click's message, exit USAGE
        exc.show() if hasattr(exc, "show") else typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001
        typer.echo(f"error: shrinkflow crashed: {type(exc).__name__}: {exc}", err=True)
        traceback.print_exception(exc, file=sys.stderr)
        sys.exit(ExitCode.CRASH)
    # The command finished: exit without freeing what it imported (Evidently, torch,
    # transformers: 1-2 s of a 2-core CPU after a monitor or run); atexit still runs.
    from shrinkflow.bootstrap import exit_without_teardown

    flush_prefect_workers()

    exit_without_teardown(code if isinstance(code, int) else ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
