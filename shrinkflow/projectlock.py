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
says who holds it. Reentrant within a process (a monitor's re-compression
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

# The locks this process holds, by lock file.
_HELD: dict[Path, object] = {}


class ProjectBusy(RuntimeError):
    """Another process holds the project (its message names it, its pid
    and since when)."""


def _paths(root: Path | str) -> tuple[Path, Path]:
    state = Path(root) / STATE
    return (state / "project.lock").resolve(), state / "project.lock.json"


def holder(root: Path | str) -> str:
    """Who holds the project at ``root``, as the holder recorded it:
    "`shrinkflow run` (pid 123, since 2026-12-05T18:04:10+00:00)", or
    "another shrinkflow command" when that record cannot be read."""
    try:
        held = json.loads(_paths(root)[1].read_text())
        return f"`{held['command']}` (pid {held['pid']}, since {held['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another shrinkflow command"


def _acquire(root: Path | str, command: str):
    """The acquired lock, or None when this process holds it already.
    Raises ProjectBusy when another process does."""
    from filelock import FileLock, Timeout

    from shrinkflow.files import atomic_write_text

    path, record = _paths(root)
    if path in _HELD:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    # thread_local=False: a flow may run on another thread of this process.
    lock = FileLock(path, timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise ProjectBusy(f"{holder(root)} is changing this project ({Path(root)}): wait for it to end, then "
                          f"start `{command}` again (nothing was started or changed)") from None
    _HELD[path] = lock
    atomic_write_text(record, json.dumps({"command": command, "pid": os.getpid(),
                                          "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}) + "\n")
    return lock


def hold(root: Path | str, command: str) -> None:
    """Hold the project at ``root`` for ``command`` until this process ends
    (a CLI command). Raises ProjectBusy when another process holds it."""
    _acquire(root, command)


@contextmanager
def project_lock(root: Path | str, command: str) -> Iterator[None]:
    """Hold the project at ``root`` for ``command`` while the block runs
    (a flow), unless this process holds it already. Raises ProjectBusy
    when another process holds it."""
    lock = _acquire(root, command)
    try:
        yield
    finally:
        if lock is not None:
            _HELD.pop(_paths(root)[0], None)
            lock.release()
