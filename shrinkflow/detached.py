"""Long-running processes that outlive the command that started them, each
known by a pid file (``shrinkflow team up`` starts the Prefect server and
its worker this way; ``team down`` stops them from another process).

A process is started in a session of its own (no controlling terminal, its
own process group: closing the terminal or Ctrl-C in it does not reach it),
its output appended to a log file, and its pid file records the pid **and
the process's start time**: a pid the kernel has since given to another
process is not mistaken for ours. Stopping ends the whole process group
(uvicorn's and Prefect's helpers included): SIGTERM, then SIGKILL after a
grace period. Nothing happens at import; the constructor touches nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from shrinkflow.files import read_json, write_json


def _alive(proc) -> bool:
    """Running, and not a zombie nobody has reaped yet (a detached process's
    parent has usually exited; init reaps it, a container's PID 1 may not)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is alive (zombies
    excluded)."""
    import psutil

    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and _alive(p):
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return False


def kill_group(pgid: int, grace_s: float = 30.0) -> bool:
    """End process group ``pgid``: SIGTERM, then SIGKILL to what is left
    after ``grace_s`` seconds; returns once none of it is alive (or after
    10 s more). Returns False when the group had no live process."""
    if not group_alive(pgid):
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return True
            time.sleep(0.2)
    return True


@dataclass
class Detached:
    """One detached process: ``name`` (for messages), its ``pid_file`` and
    its ``log_file`` (appended to at each start)."""

    name: str
    pid_file: Path
    log_file: Path

    def __post_init__(self):
        self.pid_file, self.log_file = Path(self.pid_file), Path(self.log_file)

    def record(self) -> dict | None:
        """What the pid file says (``pid``, ``create_time``, ``command``), or
        None when there is none or it is unreadable."""
        try:
            doc = read_json(self.pid_file)
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) and isinstance(doc.get("pid"), int) else None

    def process(self):
        """The live ``psutil.Process`` the pid file names, or None: no pid
        file, the process is gone, or its pid now belongs to a process
        started at another time (pid reuse)."""
        import psutil

        rec = self.record()
        if rec is None:
            return None
        try:
            proc = psutil.Process(rec["pid"])
            if abs(proc.create_time() - float(rec.get("create_time", 0))) > 1.0:
                return None
        except (psutil.Error, TypeError, ValueError):
            return None
        return proc if _alive(proc) else None

    @property
    def pid(self) -> int | None:
        """The pid of the live process, or None."""
        proc = self.process()
        return proc.pid if proc is not None else None

    def running(self) -> bool:
        return self.process() is not None

    def start(self, command: list[str], env: dict, cwd: Path | str) -> int:
        """Start ``command`` detached (a new session; stdin from /dev/null,
        stdout and stderr appended to ``log_file``) and write the pid file.
        Returns the pid. Raises OSError when it cannot be started."""
        import psutil

        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting {self.name}: "
                      f"{' '.join(command)}\n".encode())
            log.flush()
            proc = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True, close_fds=True)
        try:
            created = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            created = time.time()
        write_json(self.pid_file, {"pid": proc.pid, "create_time": created, "command": command})
        return proc.pid

    def stop(self, grace_s: float = 30.0) -> bool:
        """End the process and its group (``kill_group``) and remove the pid
        file. Idempotent; returns whether anything was running."""
        proc = self.process()
        stopped = False
        if proc is not None:
            stopped = kill_group(proc.pid, grace_s)  # its own session: its pgid is its pid
        self.pid_file.unlink(missing_ok=True)
        return stopped

    def tail(self, chars: int = 3000) -> str:
        """The end of the log (empty when there is none)."""
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - chars))
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""


def _until_stopped(p, timeout_s: float = 2.0) -> None:
    """Wait until psutil process ``p``, just sent SIGSTOP, is stopped (or
    gone), at most ``timeout_s``: a process still running may yet fork."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP, psutil.STATUS_ZOMBIE,
                              psutil.STATUS_DEAD):
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.002)


def stop_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """``stop_pid_tree(proc.pid, grace_s)``, then reap ``proc``."""
    stop_pid_tree(proc.pid, grace_s)
    proc.poll()


def stop_pid_tree(pid: int, grace_s: float = 10.0) -> None:
    """Stop process ``pid`` and every process it started (DVC and the stage command
    under it): SIGTERM to all, then SIGKILL to what is left after
    ``grace_s``. The children stay in the caller's process group, so Ctrl-C
    in a terminal still reaches them directly, as it always did.

    The tree is frozen first (SIGSTOP, parent before children, each one's
    children listed once it is stopped), so a process cannot start a child
    between being listed and being stopped: DVC starting the stage command at
    the moment of a timeout used to leave that command running, orphaned.
    SIGSTOP is delivered asynchronously, so each process's children are
    listed only once the kernel shows it stopped: a shell (dash) forking the
    stage command just as it was sent SIGSTOP left the command orphaned."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs, seen, todo = [], set(), [root]
    while todo:
        p = todo.pop()
        if p.pid in seen:
            continue
        seen.add(p.pid)
        try:
            p.suspend()
            procs.append(p)
            _until_stopped(p)
            todo += p.children()
        except psutil.NoSuchProcess:
            pass
    for p in procs:
        try:
            p.terminate()
            p.resume()   # the SIGTERM is delivered once it runs again
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)
