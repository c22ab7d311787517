"""One project, one writer: ``shrinkflow run``, an acting monitor and the
flows they or a scheduler start (lifecycle, re-compression, retrain) hold an
exclusive lock on the project while they change it, so that a second one
is refused before it writes anything, naming the first, instead of both
failing half way (a newcomer's finding: a second ``run --params B`` copied B
over params.yaml while ``run --params A`` ran; A failed on the changed
params, B on DVC's lock).

The lock is an ``flock`` on ``.shrinkflow/project.lock`` (the ``filelock``
package): the OS releases it when its process ends, however it ends, so a
killed run never leaves the project locked. ``.shrinkflow/project.lock.json``
says who holds it. The DVC processes a holder starts inherit the lock's
descriptor (``held_fds``, their ``pass_fds``): after a SIGKILL of the
holder mid-stage the project stays held until its orphaned ``dvc repro``
has ended too (a helper's finding: the lock was free while it still ran).
That is seconds: DVC dies at its next output line (its stdout is a pipe
to the dead holder), and the stage itself ends with the holder
(``shrinkflow.bootstrap.stop_with_owner``); DVC records nothing, so the
next run runs that stage again.
Reentrant within a process (a monitor's re-compression
runs the lifecycle flow in the same process): a holder that holds it
already goes on. Importing this module does nothing.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from shrinkflow.paths import STATE

# The locks this process holds, by lock file: (the lock, its descriptor).
_HELD: dict[Path, tuple[object, int | None]] = {}


class ProjectBusy(RuntimeError):
    """Another process holds the project (its message names it, its pid
    and since when)."""


def _paths(root: Path | str, name: str = "project") -> tuple[Path, Path]:
    """The lock file ``<name>.lock`` under the project's state folder, and
    its record beside it."""
    state = Path(root) / STATE
    return (state / f"{name}.lock").resolve(), state / f"{name}.lock.json"


def _write_record(record: Path, **fields) -> None:
    """Say who holds a lock: ``fields``, this pid and since when, as JSON."""
    from shrinkflow.files import atomic_write_text

    atomic_write_text(record, json.dumps({**fields, "pid": os.getpid(), "since": datetime.now(
        timezone.utc).isoformat(timespec="seconds")}) + "\n")


def _read_record(record: Path) -> dict | None:
    """What ``_write_record`` wrote, or None when it cannot be read."""
    try:
        held = json.loads(record.read_text())
        return held if isinstance(held, dict) and {"pid", "since"} <= held.keys() else None
    except (OSError, ValueError):
        return None


def said(command: str) -> str:
    """``command`` as a message names it: a command a user types in
    backticks ("`shrinkflow run`"), a flow as it is ("the
    shrinkflow-lifecycle flow")."""
    return f"`{command}`" if command.startswith("shrinkflow ") else command


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # another user's process
        return True
    return True


def holder(root: Path | str) -> str:
    """Who holds the project at ``root``, as the holder recorded it:
    "`shrinkflow run` (pid 123, since 2026-12-05T18:04:10+00:00)", or
    "another shrinkflow command" when that record cannot be read. When
    that pid no longer runs, says so: a DVC process it started still holds
    the descriptor (``held_fds``)."""
    held = _read_record(_paths(root)[1])
    try:
        who = f"{said(held['command'])} (pid {held['pid']}, since {held['since']})"
        if not _running(int(held["pid"])):
            who += (", which no longer runs, left a DVC process it started that still holds the project (it "
                    "stops within seconds; `ps -ef | grep 'dvc repro'` finds it)")
        return who
    except (ValueError, KeyError, TypeError):
        return "another shrinkflow command"


def held_fds() -> tuple[int, ...]:
    """The descriptors of the project locks this process holds, for the
    ``pass_fds`` of a child that changes the project (a ``dvc repro``,
    ``dvc checkout``): the child shares the lock (one open file
    description; ``flock`` frees it when its last descriptor closes), so
    it outlives this process if this one is killed. Empty when none is
    held."""
    return tuple(fd for _, fd in _HELD.values() if fd is not None)


def _acquire(root: Path | str, command: str, wait_s: float = 0.0, on_wait=None):
    """The acquired lock, or None when this process holds it already.
    Raises ProjectBusy when another process does and still does after
    ``wait_s`` seconds (0: at once); ``on_wait(message)`` is called once
    when the wait starts."""
    from filelock import FileLock, Timeout

    path, record = _paths(root)
    if path in _HELD:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: a flow may run on another thread of this process.
    fds: list[int] = []
    lock = FileLock(path, timeout=0, thread_local=False, on_acquired=fds.append)
    try:
        lock.acquire()
    except Timeout:
        first = holder(root)
        if wait_s <= 0:
            raise ProjectBusy(f"{first} is changing this project ({Path(root)}): wait for it to end, then "
                              f"start {said(command)} again (nothing was started or changed)") from None
        if on_wait is not None:
            on_wait(f"{first} is changing this project ({Path(root)}): {said(command)} waits up to {wait_s:.0f} s "
                    "for it to end")
        try:
            lock.acquire(timeout=wait_s, poll_interval=min(1.0, wait_s))
        except Timeout:
            raise ProjectBusy(f"{holder(root)} is changing this project ({Path(root)}): {said(command)} waited "
                              f"{wait_s:.0f} s for it and was refused (nothing was started or changed)") from None
    _HELD[path] = (lock, fds[0] if fds else None)
    _write_record(record, command=command)
    return lock


def hold(root: Path | str, command: str) -> None:
    """Hold the project at ``root`` for ``command`` until this process ends
    (a CLI command). Raises ProjectBusy when another process holds it."""
    _acquire(root, command)


# `shrinkflow schedule`'s own lock, held until the process ends.
_SCHEDULER: list[object] = []


def hold_scheduler(root: Path | str, command: str = "shrinkflow schedule") -> None:
    """One scheduler per project: an ``flock`` on
    ``.shrinkflow/schedule.lock`` held until this process ends (a separate
    lock: the project lock is held only while a run changes the project).
    ``command`` is who holds it: ``shrinkflow schedule`` for its whole life
    (a second one started two Prefect servers on the same ``.prefect/``
    state, each running its share of the runs, so "one run at a time" no
    longer held: a helper's finding), or ``shrinkflow team up`` while it
    brings the team stack up (a ``schedule`` started then, before the
    worker ran, served the project beside the stack: another helper's
    finding). Raises ProjectBusy naming the holder."""
    from filelock import FileLock, Timeout

    path, record = _paths(root, "schedule")
    if _SCHEDULER:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        who = scheduler_holder(root) or "another scheduler"
        raise ProjectBusy(f"{who} already serves this project's schedules ({Path(root)}): a second scheduler "
                          "would run them twice; stop that one first (Ctrl-C in its terminal, or SIGTERM), or "
                          "wait for a `team up` that is starting to end. Nothing was started") from None
    _SCHEDULER.append(lock)
    _write_record(record, command=command)


def scheduler_holder(root: Path | str) -> str | None:
    """Who holds the project's schedule lock (``hold_scheduler``): a line
    naming the command and its pid (`` `shrinkflow schedule` (pid 12,
    since ...)``), or None when none does (or this process does). Takes
    the lock for a moment when it is free."""
    from filelock import FileLock, Timeout

    path, record = _paths(root, "schedule")
    if _SCHEDULER or not path.exists():
        return None
    lock = FileLock(path, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        held = _read_record(record)
        if not held:
            return "a `shrinkflow schedule` or `team up`"
        return f"{said(str(held.get('command') or 'shrinkflow schedule'))} (pid {held['pid']}, since {held['since']})"
    lock.release()
    return None


@contextmanager
def project_lock(root: Path | str, command: str, wait_s: float = 0.0, on_wait=None) -> Iterator[None]:
    """Hold the project at ``root`` for ``command`` while the block runs
    (a flow), unless this process holds it already. When another process
    holds it: wait up to ``wait_s`` seconds for it (a scheduled run:
    ``monitor.scheduled_wait_minutes``; ``on_wait(message)`` says so once),
    then raise ProjectBusy; 0 (the default): raise at once."""
    lock = _acquire(root, command, wait_s, on_wait)
    try:
        yield
    finally:
        if lock is not None:
            _HELD.pop(_paths(root)[0], None)
            lock.release()
