"""A cooperative stop for the long loops of a candidate build (distillation,
the teacher's pass over the training split, pruning's importance scores),
which run in a task runner's worker thread.

A signal reaches only a process's main thread. Prefect's flow engine turns a
SIGTERM there into ``TerminationSignal``, but its task runner then waits for
the running builds before the process can exit, and a worker thread running
torch keeps going until its loop ends: a compress stage sent SIGTERM 15 s
into a distillation exited 38 s later, when the distillation had finished
(and the lifecycle's ``stop_tree`` SIGKILLs a stage 10 s after its SIGTERM,
before its flow run could record a state). The flow that waits for the builds
(``flows.compress``) calls ``request_stop`` when it is interrupted; each
loop calls ``raise_if_stopped`` once per step, so a build ends within one
step, removing its unfinished files as any failed build does.

Importing this module has no side effect beyond creating one unset event.
"""

from __future__ import annotations

import threading

_STOP = threading.Event()


class StopRequested(BaseException):
    """The process was asked to stop (``request_stop``) while a build loop ran.

    A BaseException, as KeyboardInterrupt is: no ``except Exception`` takes
    a requested stop for an error to handle, while the builds' ``except
    BaseException`` clean-ups still remove their unfinished files; Prefect
    records the task as Crashed in one line, not Failed with a traceback."""


def request_stop() -> None:
    """Ask every loop that calls ``raise_if_stopped`` in this process to end
    at its next step. Idempotent; it stays set until ``clear_stop``."""
    _STOP.set()


def clear_stop() -> None:
    """Let loops run again (a new build in the same process, or a test)."""
    _STOP.clear()


def stop_requested() -> bool:
    """Whether ``request_stop`` was called (and not cleared since)."""
    return _STOP.is_set()


def raise_if_stopped(where: str) -> None:
    """Raises StopRequested naming ``where`` (e.g. "distillation") when a
    stop was requested; otherwise returns at once (one event read)."""
    if _STOP.is_set():
        raise StopRequested(f"{where} stopped: the process was asked to stop")
