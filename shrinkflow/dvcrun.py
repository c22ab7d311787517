"""Running DVC stages and reading what DVC did (no Prefect here).

Flows call ``repro_stage`` once per stage so each stage is its own Prefect
task, while DVC alone decides whether the stage is stale. What DVC did is
read from machine-readable answers, never from its console wording: the
stage command's own report that it ran (``shrinkflow.bootstrap.mark_stage_ran``)
is "ran"; otherwise, when the repro changed the stage's entry in dvc.lock
or any output it records (``stage_fingerprint``, taken before and after),
DVC restored it from its run-cache or cache: "restored"; else "skipped".
(A ``dvc status`` before each repro answered the same question for about
0.8 s a stage.) One ``dvc status`` over all of a run's stages before the
first (``up_to_date_stages``) lets a run skip the repro of each stage DVC
finds up to date while nothing before it in the run changed anything
(``skips_repro``): a run with nothing to do starts one DVC process, not
one a stage.

Every subprocess here has a timeout; a stage's whole process tree (``dvc``
and the command it started) is stopped with it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shrinkflow.bootstrap import (OFFLINE_ENV, STAGE_OWNER_ENV, STAGE_RAN_ENV, configure_env,  # noqa: F401
                                  owner_token)
from shrinkflow.detached import stop_tree
from shrinkflow.projectlock import held_fds

# A stage is stopped after this long (seconds; the default teacher trains in
# well under an hour on 2 cores, a large local teacher in a few). Override
# with SHRINKFLOW_STAGE_TIMEOUT_S. DVC's own bookkeeping commands (status,
# add, remote) get DVC_COMMAND_TIMEOUT_S; a push to a remote DVC_PUSH_TIMEOUT_S.
STAGE_TIMEOUT_ENV = "SHRINKFLOW_STAGE_TIMEOUT_S"
DEFAULT_STAGE_TIMEOUT_S = 12 * 3600.0
DVC_COMMAND_TIMEOUT_S = 600.0
DVC_PUSH_TIMEOUT_S = 3600.0


def offline_env(base: dict | None = None, project_dir: Path | str = ".") -> dict:
    """The environment for a DVC subprocess: a copy of ``base`` (default
    ``os.environ``) bootstrapped by ``configure_env`` (never overriding what
    is set), with this venv's bin first on PATH, so dvc.yaml's ``python`` is
    the interpreter running shrinkflow."""
    env = configure_env(project_dir, dict(os.environ if base is None else base))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


# A line that names an exception ending in one of the usual words, wherever
# it is: "IndexError: tuple index out of range", "shrinkflow.errors.DataError:
# ..." (not DVC's own "ERROR: ..."); a stage that logs a caught exception
# prints one without the traceback's last line being it.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)(?::\s.*)?$")
# The line after a traceback's frames names its exception, whatever its class
# is called ("zipfile.BadZipFile: ...", "pyarrow.lib.ArrowInvalid: ...",
# "StopIteration").
_TRACEBACK_HEADER = "Traceback (most recent call last):"
_EXCEPTION_NAME = re.compile(r"^[A-Za-z_][\w.]*(?::\s.*)?$")
# A stage's handled error (stages/common.py: "error: <stage>: <why>", one
# line on stderr; lower case, unlike DVC's "ERROR: ...").
_STAGE_ERROR_LINE = re.compile(r"^error: (.+)$")
# DVC's line when the stage's command exited non-zero (dvc/stage/run.py).
_COMMAND_EXIT = re.compile(r"^ERROR: failed to reproduce .*, exited with (-?\d+)\s*$")
# DVC's own reason, when it did not get as far as running the command (a
# missing dependency: "ERROR: failed to reproduce 'data': [Errno 2] No such
# file or directory: ..."): the reason alone; not its "failed to run: <cmd>,
# exited with N".
_DVC_REASON = re.compile(r"^ERROR: failed to reproduce '[^']*': (?!failed to run: )(.+)$")
# Any other error of DVC's ("ERROR: unexpected error - ..."), and a file it
# cannot parse, which it reports without the prefix ("'./dvc.lock' is
# invalid.", then where; dvc/utils/strictyaml.py).
_DVC_ERROR = re.compile(r"^ERROR: (?!failed to reproduce\b)(.+)$")
_DVC_INVALID = re.compile(r"^('[^']+' is invalid\.)$")


def _console_lines(output: str) -> list[str]:
    """``output``'s lines, DVC's closing ``ERROR: failed to reproduce ...``
    on a line of its own even where the command's last output (a progress
    bar, rewritten with carriage returns) ended without a newline before it:
    "train:   0%| | 0/464 [00:00<?, ?step/s]ERROR: failed to reproduce ..."."""
    lines = []
    for line in output.splitlines():
        cut = line.find("ERROR: failed to reproduce ")
        lines += [line[:cut], line[cut:]] if cut > 0 else [line]
    return lines


def _exception_lines(raw: list[str]) -> list[tuple[int, str]]:
    """(index, line) of every line of ``raw`` that names an exception: the
    first unindented line after each traceback's frames, and any line
    ``_EXCEPTION_LINE`` matches."""
    found = []
    for i, line in enumerate(raw):
        text = line.strip()
        if _EXCEPTION_LINE.match(text):
            found.append((i, text))
        elif text == _TRACEBACK_HEADER:
            for j in range(i + 1, len(raw)):
                if raw[j].strip() and not raw[j][0].isspace():
                    if _EXCEPTION_NAME.match(raw[j].strip()):
                        found.append((j, raw[j].strip()))
                    break
    return found


def failure_cause(output: str) -> str | None:
    """Why a stage failed, from its ``output``: the stage's own one-line
    ``error: ...`` (a handled error, without the prefix) when it printed one,
    else the last exception it printed (what a person looks for first in
    pages of Prefect's and DVC's tracebacks), else DVC's own reason when it
    did not run the command, else any other error of DVC's (a ``dvc.lock``
    it cannot parse); None when there is none of these (a stage killed by a
    signal, a command that exited without a word)."""
    raw = _console_lines(output)
    lines = [line.strip() for line in raw]
    for line in reversed(lines):
        m = _STAGE_ERROR_LINE.match(line)
        if m:
            return m.group(1)
    exceptions = _exception_lines(raw)
    if exceptions:
        return max(exceptions)[1]
    for pattern in (_DVC_REASON, _DVC_ERROR, _DVC_INVALID):
        for line in reversed(lines):
            m = pattern.match(line)
            if m:
                return m.group(1) + (_fix_for_invalid(m.group(1)) if pattern is _DVC_INVALID else "")
    return None


def _fix_for_invalid(line: str) -> str:
    """What to do about a file DVC cannot parse ("'./dvc.lock' is
    invalid."): restore it from git; a lock file may also be deleted, as DVC
    rebuilds it (each stage run again, or its outputs restored from DVC's
    run-cache)."""
    name = line.split("'")[1].removeprefix("./")
    fix = f" Restore it (git checkout -- {name})"
    if Path(name).name == "dvc.lock":
        return fix + ", or delete it: DVC then runs each stage again or restores it from its run-cache."
    return fix + ", or correct it."


def last_line(output: str) -> str | None:
    """The command's last line of output: the last non-blank line before
    DVC's closing ``ERROR: ...`` lines, for a command that failed without an
    error line or a traceback (``sys.exit("message")`` prints a bare line);
    None when the command printed nothing (the last line is DVC's ``> cmd``)."""
    for line in reversed(_console_lines(output)):
        text = line.strip()
        if not text or text.startswith(("ERROR: ", "WARNING: ")):
            continue
        return None if text.startswith("> ") else text
    return None


def command_exit_code(output: str) -> int | None:
    """The exit code of the stage's command as DVC reports it ("..., exited
    with 1"; minus the signal's number for a command a signal killed); None
    when DVC did not run it to an exit (DVC's own error)."""
    for line in reversed(_console_lines(output)):
        m = _COMMAND_EXIT.match(line.strip())
        if m:
            return int(m.group(1))
    return None


def signal_of(command_rc: int) -> int | None:
    """The number of the signal that killed a stage's command, or None.

    DVC reports minus the signal's number when it ran the command directly
    (a shell that ``exec``'d it, such as bash); a shell that waited for it
    instead (dash, Debian's ``/bin/sh``, which DVC uses when ``$SHELL`` is
    unset, as on CI machines) exits with 128 + the number and prints
    "Killed", the POSIX shell convention."""
    import signal

    if command_rc < 0:
        return -command_rc
    if command_rc > 128 and command_rc - 128 in {int(s) for s in signal.Signals}:
        return command_rc - 128
    return None


def how_it_ended(command_rc: int) -> str:
    """A stage command's end in words: "its command exited with 1", or for a
    command a signal killed "its command was killed by SIGKILL" (DVC's code
    -9; for a shell's 137 "... SIGKILL (its shell exited with 137)"),
    with the likeliest reason for SIGKILL: the kernel's out-of-memory killer
    (or someone's ``kill -9``)."""
    import signal

    number = signal_of(command_rc)
    if number is None:
        return f"its command exited with {command_rc}"
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    hint = ": out of memory, or stopped from outside" if name == "SIGKILL" else ""
    shell = "" if command_rc < 0 else f" (its shell exited with {command_rc})"
    return f"its command was killed by {name}{shell}{hint}"


def _whole_lines(tail: str) -> str:
    """``tail`` from its first full line (a tail cut mid-line starts after it)."""
    cut = tail.find("\n")
    return tail[cut + 1:] if cut >= 0 else tail


class StageFailed(RuntimeError):
    """``dvc repro`` of a stage exited non-zero (or ran past its timeout);
    ``returncode``: dvc's exit code; ``command_rc``: the stage command's, when
    DVC ran it to an exit (None otherwise: DVC failed before or after it);
    ``tail``: the last of its output (whole lines, without the lines the
    console leaves out); ``cause``: its own error line, its last exception
    line or DVC's error (None when it has none); ``last``: the command's last
    line of output, named when there is no cause. ``headline``: the message
    without the tail, for a console that has already shown the output."""

    def __init__(self, stage: str, returncode: int, tail: str, cause: str | None = None,
                 command_rc: int | None = None, last: str | None = None):
        self.stage, self.returncode, self.tail, self.cause = stage, returncode, tail, cause
        self.command_rc, self.last = command_rc, last
        if command_rc is None:
            head = f"DVC could not reproduce stage {stage!r} (dvc repro exited with {returncode})"
        else:
            head = f"stage {stage!r} failed ({how_it_ended(command_rc)})"
        if cause:
            head += f": {cause}"
        elif last and command_rc is not None and signal_of(command_rc) is None:   # a signal's victim's says nothing
            head += f"; its last line of output: {last}"
        self.headline = head
        super().__init__(f"{self.headline}; the end of its output:\n{tail}")


class StageTimedOut(StageFailed):
    """A stage ran longer than its timeout and was stopped."""

    def __init__(self, stage: str, timeout_s: float, tail: str):
        self.timeout_s = timeout_s
        self.headline = (f"stage {stage!r} ran longer than {timeout_s:.0f} s and was stopped "
                         f"(set {STAGE_TIMEOUT_ENV} to allow more)")
        RuntimeError.__init__(self, f"{self.headline}:\n{tail}")
        self.stage, self.returncode, self.tail, self.cause, self.command_rc = stage, None, tail, None, None
        self.last = None


def worth_retrying(exc: BaseException | None) -> bool:
    """Whether a failed stage may succeed if run again: only a StageFailed
    whose command exited ``STAGE_EXIT_TRANSIENT`` (the data source did not
    answer). A missing file, a hash that does not match, a bug or a timeout
    would fail the same way again."""
    from shrinkflow.errors import STAGE_EXIT_TRANSIENT

    return isinstance(exc, StageFailed) and exc.command_rc == STAGE_EXIT_TRANSIENT


# StageRun.checked_by of a stage skipped on the run's one `dvc status`, without a repro.
CHECKED_BY_STATUS = "dvc status"


@dataclass(frozen=True)
class StageRun:
    """What one stage did in a run: ``status`` as DVC decided it, ``seconds``
    of wall time its ``dvc repro`` took, and ``checked_by``: ``"dvc repro"``,
    or ``"dvc status"`` for a stage skipped without a repro because the
    run's one ``dvc status`` found it up to date (``skips_repro``; its
    ``seconds`` is then 0.0: no process ran)."""
    stage: str
    status: str          # "ran" | "skipped" | "restored"
    seconds: float
    checked_by: str = "dvc repro"

    def to_dict(self) -> dict:
        return asdict(self)


def stage_timeout_s(environ: dict | None = None) -> float:
    """The stage timeout in seconds: $SHRINKFLOW_STAGE_TIMEOUT_S, else 12 h.
    Raises ValueError for a value that is not a positive number."""
    raw = (os.environ if environ is None else environ).get(STAGE_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_STAGE_TIMEOUT_S
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{STAGE_TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return value


def _path_signature(path: Path) -> tuple:
    """What a checkout changes of ``path``: for a file its inode, mtime and
    size; for a directory the same for every entry below it; () if absent."""
    try:
        st = path.stat()
    except OSError:
        return ()
    sig = [("", st.st_ino, st.st_mtime_ns, st.st_size)]
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(dirs + files):
                full = Path(root) / name
                try:
                    s = full.lstat()
                except OSError:
                    continue
                sig.append((str(full.relative_to(path)), s.st_ino, s.st_mtime_ns, s.st_size))
    return tuple(sig)


def stage_fingerprint(stage: str, project_dir: Path | str) -> tuple | None:
    """``stage``'s entry in ``dvc.lock`` and the on-disk signature of each
    output it records, or None when the lock has no entry for it (or is
    absent or unreadable: DVC will reproduce the stage). A repro that did
    not run the command but changed this restored the stage."""
    import yaml

    from shrinkflow.lineage import dvc_lock_stages

    root = Path(project_dir)
    try:
        entry = dvc_lock_stages(root).get(stage)
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    if not isinstance(entry, dict):
        return None
    outs = [o["path"] for o in entry.get("outs") or [] if isinstance(o, dict) and "path" in o]
    return json.dumps(entry, sort_keys=True, default=str), tuple(_path_signature(root / p) for p in outs)


def stale_stages(stages: list[str], project_dir: Path | str) -> list[str]:
    """Which of ``stages`` DVC would reproduce now, in the order given: one
    ``dvc status --json`` over them all (only these stages, not their
    upstream). Raises RuntimeError when DVC fails (``dvc_command``; a
    stage dvc.yaml does not have is a failure)."""
    doc = json.loads(dvc_command(["status", "--json", *stages], project_dir) or "{}")
    return [s for s in stages if doc.get(s)]


def up_to_date_stages(stages: list[str], project_dir: Path | str) -> frozenset[str]:
    """The stages of ``stages`` that DVC finds up to date now: one ``dvc
    status --json`` over them all (``stale_stages``), whose answer for a
    stage compares its deps, params and outs with its dvc.lock entry, as
    ``dvc repro`` does before it decides to skip it. Empty when DVC cannot
    answer (it fails: a broken dvc.yaml or lock, a torn lock file, a
    process that cannot start or an answer that is not JSON; the repro of
    each stage then says what is wrong, as it did before). Valid only until
    a stage changes something: see ``skips_repro``. Where another DVC
    process reads the project (``dvc repro frontier``), the status answers
    and an up-to-date stage is skipped; its repro would have failed on the
    reader's lock."""
    try:
        stale = set(stale_stages(list(stages), project_dir))
    except (RuntimeError, ValueError, OSError):
        return frozenset()
    return frozenset(stages) - stale


def skips_repro(stage: str, up_to_date: frozenset[str], earlier: dict[str, dict], force: bool = False) -> bool:
    """Whether a run may report ``stage`` skipped without running its
    ``dvc repro``: DVC found it up to date before the run's first stage
    (``up_to_date_stages``), it is not forced, and every stage the run did
    before it (``earlier``: stage -> ``StageRun.to_dict()``) was skipped.
    Once one ran or was restored, a later stage's deps may have changed
    (a retrained teacher, a new split), so each later stage goes through
    DVC again. Pure."""
    return (not force and stage in up_to_date
            and all(run.get("status") == "skipped" for run in earlier.values()))


def what_dvc_did(changed: bool, forced: bool, ran: bool) -> str:
    """"ran" when the stage's command ran; "restored" when DVC reproduced it
    without running it (``changed``: its lock entry or outputs changed; its
    run-cache held the outputs), or was forced to; "skipped" when it was up
    to date."""
    if ran:
        return "ran"
    return "restored" if changed or forced else "skipped"




def repair_torn_rwlock(project_dir: Path | str) -> str | None:
    """Set aside DVC's ``.dvc/tmp/rwlock`` when it is torn (empty or not
    JSON), and return a warning saying so; None when there is nothing to do.

    DVC rewrites that file in place (``dvc.rwlock._edit_rwlock``: truncate,
    then write) under its guard lock, ``rwlock.lock``; a DVC process killed
    between the two (a run stopped by ``shrinkflow team down``, a host that
    went down) leaves it empty, and every later DVC command in the checkout
    fails with "Unable to read RWLock-file ... JSON structure is corrupted".
    This takes the same guard (zc.lockfile, as DVC does), so a file another
    DVC process is writing right now is never touched: while the guard is
    held, the file is left alone. A torn file is renamed to
    ``rwlock.torn-<unix time>`` (kept for inspection), which DVC reads as no
    lock held: the processes that held locks in it are gone."""
    import zc.lockfile

    path = Path(project_dir) / ".dvc" / "tmp" / "rwlock"

    def torn() -> bool:
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            return True
        return False

    if not torn():
        return None
    try:
        guard = zc.lockfile.LockFile(str(path.with_name("rwlock.lock")))
    except zc.lockfile.LockError:
        return None  # a DVC process holds the guard: it is writing the file now
    try:
        if not torn():
            return None
        aside = path.with_name(f"rwlock.torn-{int(time.time())}")
        os.replace(path, aside)
    finally:
        guard.close()
    return (f"warning: DVC's lock file {path} was torn (a DVC process was killed while writing it); "
            f"set aside as {aside.name}, so DVC can run again")


# DVC's advice after every stage that updated dvc.lock (dvc/repo/scm_context.py)
# and pushed nothing: `git add dvc.lock`, `dvc config core.autostage true`,
# `dvc push`. A run ends with one line that says what to git add and commit,
# and that `dvc push` sends the models and data (flows/cli.py), so the
# console leaves these out, and so does the tail a failure keeps (StageFailed).
_HINT_START = ("To track the changes with git, run:", "To enable auto staging, run:")
_HINT_BODY = ("\tgit add ", "\tdvc config core.autostage")
_HINT_LINE = "Use `dvc push` to send your updates to remote storage."


def _empty_by_design() -> frozenset[str]:
    """DVC's ``WARNING: '<path>' is empty.`` for the deps that are empty
    until production sends them text: the feedback dataset and the
    re-compression's window texts (empty in every ordinary run)."""
    from shrinkflow.paths import FEEDBACK, UNLABELLED, WINDOW_HELDOUT

    return frozenset(f"WARNING: '{p.as_posix()}' is empty." for p in (FEEDBACK, UNLABELLED, WINDOW_HELDOUT))


class HintFilter:
    """Wraps ``echo`` (one call per line, newline included) and drops DVC's
    per-stage git and push advice with the blank lines around it, and its
    warnings that a dep empty by design is empty; every other line is passed
    on unchanged and in order. A blank line is held until the next line says
    whether it belongs to the advice; ``flush`` passes on one still held at
    the end."""

    def __init__(self, echo):
        self.echo, self.held, self.in_hint, self.empty = echo, [], False, _empty_by_design()

    def __call__(self, line: str) -> None:
        text = line.rstrip("\r\n")
        if text in self.empty:
            return
        if text.startswith(_HINT_START) or text == _HINT_LINE:
            self.held, self.in_hint = [], text != _HINT_LINE
            return
        if self.in_hint and (not text.strip() or text.startswith(_HINT_BODY)):
            return
        self.in_hint = False
        if not text.strip():
            self.held.append(line)
            return
        for held in self.held:
            self.echo(held)
        self.held = []
        self.echo(line)

    def flush(self) -> None:
        for held in self.held:
            self.echo(held)
        self.held = []


# The prefix of the temporary folder holding a stage's marker ("ran"), then
# the owning process's id: ``shrinkflow-stage-<pid>-<random>``.
MARKER_PREFIX = "shrinkflow-stage-"


def sweep_orphaned_markers(tmp_dir: Path | str | None = None) -> int:
    """Remove the marker folders (``MARKER_PREFIX``) in ``tmp_dir`` (default
    the temporary directory) whose process no longer exists: what a
    ``shrinkflow`` killed by SIGKILL left. A folder of a live process, of
    another user, or without a process id is left alone. Returns how many
    were removed."""
    import shutil

    import psutil

    removed = 0
    for path in Path(tmp_dir or tempfile.gettempdir()).glob(f"{MARKER_PREFIX}*"):
        pid, sep, _ = path.name[len(MARKER_PREFIX):].partition("-")
        # older names had no pid; psutil counts another user's live process as existing
        if not (sep and pid.isdigit()) or not path.is_dir() or psutil.pid_exists(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += not path.exists()
    return removed


def repro_stage(stage: str, project_dir: Path | str, echo=sys.stdout.write,
                extra_env: dict | None = None, force: bool = False,
                timeout_s: float | None = None) -> StageRun:
    """``dvc repro --single-item <stage>`` in ``project_dir``, streaming its
    output to ``echo`` line by line as it comes.

    Returns what DVC did (see the module docstring). Raises StageFailed when
    DVC exits non-zero, StageTimedOut after ``timeout_s`` (default
    ``stage_timeout_s()``); either way DVC and everything it started are
    stopped (also on KeyboardInterrupt), so no stage outlives the run, and
    the outs the stage had before are put back (``restore_stage_outs``: DVC
    deleted them before it ran the command), with a line to ``echo`` saying
    which.
    """
    timeout_s = stage_timeout_s() if timeout_s is None else timeout_s
    torn = repair_torn_rwlock(project_dir)
    if torn:
        echo(torn + "\n")
    before = None if force else stage_fingerprint(stage, project_dir)
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    t0 = time.perf_counter()
    sweep_orphaned_markers()
    with tempfile.TemporaryDirectory(prefix=f"{MARKER_PREFIX}{os.getpid()}-") as tmp:
        kept = keep_stage_outs(stage, project_dir, Path(tmp) / "kept")
        try:
            return _repro(stage, project_dir, echo, extra_env, force, timeout_s, cmd, t0, before, Path(tmp))
        except BaseException:
            note = restore_stage_outs(stage, project_dir, kept)
            if note:
                echo(note + "\n")
            raise


def _repro(stage: str, project_dir: Path | str, echo, extra_env: dict | None, force: bool, timeout_s: float,
           cmd: list[str], t0: float, before: tuple | None, tmp: Path) -> StageRun:
    """``repro_stage``'s run of ``cmd`` (its DVC repro) in the temporary
    directory ``tmp``."""
    marker = Path(tmp) / "ran"
    env = {**offline_env(project_dir=project_dir), **(extra_env or {}), STAGE_RAN_ENV: str(marker),
           STAGE_OWNER_ENV: owner_token()}
    # pass_fds: DVC shares the project lock this process holds, so a
    # SIGKILL of this process leaves the project held until DVC ends.
    proc = subprocess.Popen(cmd, cwd=project_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, pass_fds=held_fds())
    timed_out = threading.Event()

    def expire() -> None:
        timed_out.set()
        stop_tree(proc)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    chunks, kept = [], []   # all of the output; what the console shows of it

    def show(line: str) -> None:
        kept.append(line)
        echo(line)

    shown = HintFilter(show)
    try:
        for line in proc.stdout:
            chunks.append(line)
            shown(line)
        rc = proc.wait()
    finally:
        shown.flush()
        timer.cancel()
        if proc.poll() is None:  # interrupted while streaming
            stop_tree(proc)
        proc.stdout.close()
    output = "".join(chunks)
    tail = _whole_lines("".join(kept)[-3000:])
    if timed_out.is_set():
        raise StageTimedOut(stage, timeout_s, tail)
    if rc != 0:
        cause = failure_cause(output)
        raise StageFailed(stage, rc, tail, cause, command_exit_code(output),
                          None if cause else last_line(output))
    ran = marker.is_file()
    changed = False if ran or force else (before is None or stage_fingerprint(stage, project_dir) != before)
    return StageRun(stage, what_dvc_did(changed, force, ran), round(time.perf_counter() - t0, 2))


@dataclass(frozen=True)
class KeptOuts:
    """What ``keep_stage_outs`` kept of a stage before its repro: the
    signature (``_path_signature``) of each out dvc.lock pins for it that
    existed, and a copy of each ``cache: false`` out (``dvc checkout``
    cannot restore those)."""
    pinned: dict          # out path (relative) -> signature before the repro
    uncached: dict        # out path (relative) -> its copy (absolute), for those that existed


def outs_by_kind(stage_entry) -> tuple[list[str], list[str]]:
    """One dvc.yaml stage entry's outs, metrics and plots as (cached,
    ``cache: false``) relative paths; ([], []) for anything but a mapping."""
    cached, uncached = [], []
    for key in ("outs", "metrics", "plots"):
        for out in stage_entry.get(key) or [] if isinstance(stage_entry, dict) else []:
            if isinstance(out, str):
                cached.append(out)
            elif isinstance(out, dict):
                for path, opts in out.items():
                    (uncached if isinstance(opts, dict) and opts.get("cache") is False else cached).append(path)
    return cached, uncached


def stage_outs(stage: str, project_dir: Path | str) -> tuple[list[str], list[str]]:
    """``stage``'s outs, metrics and plots in dvc.yaml as (cached, ``cache:
    false``) relative paths (``outs_by_kind``); ([], []) without a dvc.yaml
    or that stage (or one that cannot be read: DVC will say so itself)."""
    import yaml

    try:
        stages = (yaml.safe_load((Path(project_dir) / "dvc.yaml").read_text()) or {}).get("stages") or {}
        return outs_by_kind(stages.get(stage))
    except (OSError, yaml.YAMLError, AttributeError):
        return [], []


def keep_stage_outs(stage: str, project_dir: Path | str, copies: Path) -> KeptOuts:
    """Before ``stage``'s repro: what ``restore_stage_outs`` needs to put
    its outs back should it fail (DVC deletes a stage's outs before it runs
    the command, and writes dvc.lock only once it succeeded): the signature
    of every out dvc.lock pins for the stage that exists now, and a copy in
    ``copies`` of every ``cache: false`` one (metrics and reports: small
    files)."""
    import shutil

    from shrinkflow.lineage import dvc_lock_stages

    root = Path(project_dir)
    try:
        entry = dvc_lock_stages(root).get(stage)
    except Exception:  # noqa: BLE001 - no lock, or one DVC will refuse itself: nothing pinned to restore
        entry = None
    not_cached = stage_outs(stage, root)[1]
    pinned = {}
    for out in (entry or {}).get("outs") or [] if isinstance(entry, dict) else []:
        if (isinstance(out, dict) and isinstance(out.get("path"), str) and out["path"] not in not_cached
                and (root / out["path"]).exists()):
            pinned[out["path"]] = _path_signature(root / out["path"])
    uncached = {}
    for rel in not_cached:
        if (root / rel).is_file():
            uncached[rel] = copies / rel
            uncached[rel].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, uncached[rel])
    return KeptOuts(pinned, uncached)


def restore_stage_outs(stage: str, project_dir: Path | str, kept: KeptOuts) -> str | None:
    """After ``stage``'s repro failed, timed out or was interrupted: put back
    the outs it had before (``keep_stage_outs``), so that a failed run
    leaves the project as its last good run left it (the prepared splits
    and the monitor's reference, the kept teacher, the candidates): the
    cached ones DVC deleted or the failed command rewrote, with ``dvc
    checkout --force <stage>`` from dvc.lock and DVC's cache; a ``cache:
    false`` one (metrics, reports, the deploy record) from its copy, when it
    is missing (one the command wrote anew stands: a deploy interrupted
    after its promotion keeps the record of the version it promoted). Outs
    that did not exist before stay as they are. Never raises: returns the
    line to show (what was restored, and what could not be, why and how to
    get it back), None when nothing had changed."""
    from shrinkflow.files import atomic_write_bytes

    root = Path(project_dir)
    changed = [rel for rel, sig in kept.pinned.items() if _path_signature(root / rel) != sig]
    from_cache, from_copies, problems = [], [], []
    if changed:
        try:
            repair_torn_rwlock(root)
            dvc_command(["checkout", "--force", stage], root)
            from_cache += changed
        except Exception as exc:  # noqa: BLE001 - said; the stage's own failure is what is raised
            lines = [ln.strip() for ln in str(exc).splitlines()[1:] if ln.strip()]
            reason = next((ln for ln in lines if ln.startswith("ERROR")), lines[-1] if lines else str(exc))
            problems.append(f"{', '.join(sorted(changed))} could not be restored from DVC's cache (dvc checkout: "
                            f"{reason.removeprefix('ERROR: ')}): `dvc pull` brings them back where a remote has "
                            f"them, else the next `shrinkflow run` builds them again")
    for rel, copy in kept.uncached.items():
        try:
            if not (root / rel).exists():
                atomic_write_bytes(root / rel, copy.read_bytes())
                from_copies.append(rel)
        except OSError as exc:
            problems.append(f"{rel} could not be put back ({exc})")
    if not from_cache and not from_copies and not problems:
        return None
    done = []
    if from_cache:
        done.append(f"{', '.join(sorted(from_cache))} from DVC's cache, as dvc.lock pins them")
    if from_copies:
        done.append(f"{', '.join(sorted(from_copies))} as before it ran")
    line = f"stage {stage!r} did not finish: " + ("its previous outputs are back (" + "; ".join(done) + ")"
                                                  if done else "")
    if problems:
        line += ("; " if done else "") + "; ".join(problems)
    return line


def params_fingerprint(project_dir: Path | str) -> str:
    """Validate params.yaml, check it names every key dvc.yaml tracks
    (``shrinkflow.tracked_params.check_tracked``) and return the sha256 of
    its bytes. A run takes this once at the start and checks it before every
    stage. Raises ParamsError."""
    import hashlib

    from shrinkflow.config import parse_params_bytes
    from shrinkflow.paths import PARAMS

    from shrinkflow.tracked_params import check_tracked

    path = Path(project_dir) / PARAMS
    data = path.read_bytes()
    check_tracked(project_dir, data, parse_params_bytes(data, path))
    return hashlib.sha256(data).hexdigest()


def check_params_unchanged(project_dir: Path | str, fingerprint: str, before: str) -> None:
    """Raise ParamsChanged if params.yaml differs from the run's fingerprint:
    a run never mixes two versions of the params."""
    import hashlib

    from shrinkflow.errors import ParamsChanged
    from shrinkflow.paths import PARAMS

    path = Path(project_dir) / PARAMS
    now = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    if now != fingerprint:
        raise ParamsChanged(f"{path} changed during this run (before stage {before!r}); stopping so that no run "
                            "mixes two versions of the params. Run again to use the new ones.")


def dvc_command(args: list[str], project_dir: Path | str, timeout_s: float = DVC_COMMAND_TIMEOUT_S) -> str:
    """Run ``dvc <args>`` in the project and return its stdout. Raises
    RuntimeError with DVC's output when it exits non-zero or runs longer
    than ``timeout_s`` seconds."""
    cmd = [sys.executable, "-m", "dvc", *args]
    try:
        proc = subprocess.run(cmd, cwd=project_dir, env=offline_env(project_dir=project_dir),
                              capture_output=True, text=True, timeout=timeout_s, pass_fds=held_fds())
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or "") + (exc.stderr or "")
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise RuntimeError(f"dvc {' '.join(args)} ran longer than {timeout_s:.0f} s and was stopped:\n"
                           f"{out[-3000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed (exit {proc.returncode}):\n"
                           f"{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def dvc_add_and_push(path: Path | str, project_dir: Path | str) -> str:
    """``dvc add <path>`` in the project, then ``dvc push <path>.dvc`` to the
    default remote, whatever its protocol (a local folder, ``ssh://``, ...),
    when one is set (none set: the add alone). Returns DVC's output.
    Raises RuntimeError as ``dvc_command`` does when the add fails, and
    shrinkflow.remote.RemoteError when the push does: the add stands, so the
    data waits in the local cache for the next ``dvc push``."""
    from shrinkflow.remote import default_remote_url, push

    out = dvc_command(["add", str(path)], project_dir)
    remote = default_remote_url(project_dir)
    if remote[0]:
        out += push([f"{path}.dvc"], project_dir, remote=remote)
    return out


def out_md5(project_dir: Path | str, out: Path | str) -> str | None:
    """The md5 DVC gives the out ``out`` (a file or a directory, relative to
    the DVC project at ``project_dir``) as it is on disk now: for a
    directory, DVC's ``<md5>.dir``, the form dvc.lock records. DVC's own
    hashing (``dvc_data``'s ``build``, its state database caching each
    file's md5 by inode and mtime). On the default 88 MB teacher: 0.18-0.28 s
    for the first call (DVC's imports and repo), 0.13 s for a copy DVC never
    hashed, 0.01 s once cached; the same md5 as dvc.lock's. None when
    it cannot be computed (no DVC project, the path missing, DVC failing)."""
    try:
        from dvc.repo import Repo
        from dvc_data.hashfile.build import build

        path = Path(project_dir) / out
        if not path.exists():
            return None
        with Repo(str(project_dir)) as repo:
            _, _, obj = build(repo.cache.local, str(path), repo.fs, "md5", ignore=repo.dvcignore, state=repo.state)
        return obj.hash_info.value
    except Exception:  # noqa: BLE001 - a figure for a check, never a failure of its own
        return None
