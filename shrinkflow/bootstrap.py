"""The one environment bootstrap every entry point calls first, and the
params keys dvc.yaml declares for a stage.

The entry points are the ``shrinkflow`` CLI (its Typer callback), each DVC
stage command (``stages.common.run_stage``), the benchmarks and the test
suite's conftest. Each calls ``configure_env`` explicitly, before Prefect is
imported (Prefect reads its settings once, at import); importing a package
changes nothing (``flows/__init__.py`` is empty of code on purpose).

Import-light on purpose: every DVC stage depends on this file.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

# Telemetry and update checks fail offline and only add noise; so do the
# Hugging Face progress bars (transformers' "Loading weights" bar on every
# model load, in each stage's output; shrinkflow's own bars are unaffected).
OFFLINE_ENV = {
    "DO_NOT_TRACK": "1", "DVC_NO_ANALYTICS": "1", "ITERATIVE_DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}

# Set by shrinkflow.dvcrun.repro_stage for the `dvc repro` it starts: a
# file the stage command writes its name into when DVC really runs it (not
# when DVC skips it or restores it from its run-cache).
STAGE_RAN_ENV = "SHRINKFLOW_STAGE_RAN_FILE"


def telemetry_off(environ: dict) -> dict:
    """Set ``OFFLINE_ENV`` in ``environ`` (a dict, or ``os.environ``) where
    the user has not set the key; returns ``environ``."""
    for k, v in OFFLINE_ENV.items():
        environ.setdefault(k, v)
    return environ


def configure_env(project_dir: Path | str, environ: dict | None = None) -> dict:
    """The bootstrap: telemetry off, offline, Prefect's state (database,
    logs) in ``<project_dir>/.prefect``. Never overrides what the user set.

    ``environ``: the mapping to configure (default ``os.environ``; pass a
    copy to build a child process's environment). Must run before Prefect is
    imported in this process. Returns ``environ``.
    """
    from shrinkflow.paths import PREFECT_HOME

    env = telemetry_off(os.environ if environ is None else environ)
    env.setdefault("PREFECT_HOME", str(Path(project_dir).resolve() / PREFECT_HOME))
    # Ephemeral Prefect starts a local API per process: slow on a loaded 2-core box.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    return env


# The pid (and start time, in clock ticks since boot) of the shrinkflow
# process whose repro_stage started this stage's DVC: "PID:START".
STAGE_OWNER_ENV = "SHRINKFLOW_STAGE_OWNER"


def _start_ticks(pid: int) -> int | None:
    """A process's start time (``/proc/PID/stat`` field 22), None when it
    is gone: with the pid it names one process, whatever reuses the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def owner_token(pid: int | None = None) -> str:
    """``STAGE_OWNER_ENV``'s value for process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_ticks(pid)}"


def stop_with_owner(stage: str, environ: dict | None = None, poll_s: float = 1.0) -> bool:
    """Under ``repro_stage`` (``STAGE_OWNER_ENV`` set), watch on a daemon
    thread the shrinkflow process that started the stage's DVC, and end
    this stage process (exit 143) within ``poll_s`` of that process ending,
    however it ended: no stage outlives its run. A helper's finding: a
    SIGTERM to the whole process group (``timeout``, systemd) killed DVC at
    once while the stage, whose Prefect flow catches SIGTERM, went on
    writing after the run had released the project lock; after a
    ``kill -9`` of the run, DVC died at its next output line (a pipe to the
    dead run) and left the stage behind. Outputs are written atomically, so
    a stage ended here leaves none half-written, and DVC, gone, records
    nothing: the next run runs the stage again. Returns whether it watches."""
    import threading
    import time

    token = (os.environ if environ is None else environ).get(STAGE_OWNER_ENV, "")
    pid_text, _, ticks = token.partition(":")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)

    def watch() -> None:
        while str(_start_ticks(pid)) == ticks:
            time.sleep(poll_s)
        try:
            print(f"{stage}: stopped: the shrinkflow process that started it (pid {pid}) has ended",
                  file=sys.stderr, flush=True)
        except BaseException:  # noqa: BLE001 - DVC gone, the pipe is broken: end the stage all the same
            pass
        finally:
            os._exit(143)

    threading.Thread(target=watch, name="stage-owner-watchdog", daemon=True).start()
    return True


def mark_stage_ran(stage: str, environ: dict | None = None) -> None:
    """Tell ``repro_stage`` that DVC really ran ``stage``'s command (see
    ``STAGE_RAN_ENV``); does nothing when the stage was not started by it,
    or when its folder is gone (the ``shrinkflow`` that started it was
    killed, and a later one swept the folder: nobody is listening)."""
    path = (os.environ if environ is None else environ).get(STAGE_RAN_ENV)
    if path:
        try:
            Path(path).write_text(stage, encoding="utf-8")
        except FileNotFoundError:
            pass


def declared_params(stage: str, project_dir: Path | str = ".") -> frozenset[str]:
    """The params.yaml keys dvc.yaml lists for ``stage`` (its ``params:``)."""
    import yaml

    from shrinkflow.paths import DVC_YAML, PARAMS

    doc = yaml.safe_load((Path(project_dir) / DVC_YAML).read_text())
    try:
        entries = doc["stages"][stage].get("params") or []
    except KeyError:
        raise KeyError(f"dvc.yaml has no stage {stage!r}") from None
    keys: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            keys.add(entry)
        elif isinstance(entry, dict):  # {params.yaml: [keys]} form
            for file, names in entry.items():
                if Path(file) != PARAMS:
                    raise ValueError(f"stage {stage!r}: params from {file} are not supported")
                keys.update(names or [])
    return frozenset(keys)


def exit_without_teardown(code: int) -> NoReturn:
    """Exit the process with ``code`` as the interpreter would, but for its
    final teardown: non-daemon threads are joined, the ``atexit`` handlers
    run (logging's flush, Prefect's: its temporary server stopped, its logs
    and events sent; multiprocessing's reaping of its children), stdout and
    stderr are flushed, then ``os._exit``. What is skipped is freeing every
    module and object: with torch and transformers loaded, 1.3-1.6 s of a
    2-core CPU on each stage run and each CLI command, for nothing (the
    process is ending). Call it only once the work is done and saved."""
    import atexit
    import sys
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # closed, or a broken pipe: nothing more can be said
            pass
    os._exit(code)
