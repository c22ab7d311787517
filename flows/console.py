"""What Prefect's console handler prints of a failure shrinkflow explains.

A stage that fails in ``shrinkflow run`` (or in a re-compression or retrain
that ``shrinkflow monitor`` starts) raises ``StageFailed``; Prefect's task
and flow engines log it at ERROR with two full tracebacks through their own
frames, and their "Finished in state Failed(...)" lines repeat the stage's
output as one escaped line of up to 3,000 characters. The stage's output has
already been streamed to the console above them, and the command ends with
one ``error: ...`` line that says what failed and why (``flows.cli``). So on
the console, and only there, such records are cut to their first line,
without the traceback. Prefect's API log handler gets the records whole: the
UI, and ``--debug`` on the console, keep every frame. An exception shrinkflow
does not know (a bug) keeps its traceback everywhere.
"""

from __future__ import annotations

import copy
import logging
import re

# Prefect's task and flow engines' wording for a run that failed
# (prefect/task_engine.py, prefect/flow_engine.py; Prefect 3).
_FAILURE_MESSAGE = re.compile(r"^(Task run failed with exception|Encountered exception|"
                              r"Finished in state (Failed|Crashed))")


def known_failures() -> tuple[type[BaseException], ...]:
    """The exceptions the CLI explains in one line (``flows.cli.crash_message``
    gives each its own wording): a stage that failed, a deploy that deployed
    nothing, params changed mid-run, a DVC remote, a missing input, the
    registry, a file that fails its hash, the prediction log."""
    from shrinkflow.dvcrun import StageFailed
    from shrinkflow.errors import DeploymentMissing, IntegrityError, MissingInput, ParamsChanged, RegistryError
    from shrinkflow.predlog import PredictionLogError
    from shrinkflow.remote import RemoteError

    return (StageFailed, DeploymentMissing, ParamsChanged, RemoteError, MissingInput, RegistryError,
            IntegrityError, PredictionLogError)


# What Prefect's task engine adds after the exception's repr when it retries
# or gives up (prefect/task_engine.py, handle_retry).
_RETRY_SUFFIX = re.compile(r" - (Retry \d+/\d+ will start .*|Retries are exhausted)$")


def first_line(message: str) -> str:
    """``message`` up to its first line break, real or escaped inside a repr
    (``\\n``), with " ..." where it was cut, and Prefect's closing
    " - Retry 1/2 will start 5 second(s) from now" (or " - Retries are
    exhausted") kept when the cut fell before it."""
    cuts = [i for i in (message.find("\n"), message.find("\\n")) if i >= 0]
    if not cuts:
        return message
    cut = min(cuts)
    retry = _RETRY_SUFFIX.search(message)
    return message[:cut] + " ..." + (retry.group(0) if retry and retry.start() >= cut else "")


class ShortKnownFailures(logging.Formatter):
    """Wraps a console handler's formatter: a record of a known failure
    (``known_failures``: by its exception, or for Prefect's state lines that
    carry none, by the exception's class name in the message) is formatted as
    a copy with its message cut to the first line and no traceback; every
    other record goes to ``inner`` unchanged."""

    def __init__(self, inner: logging.Formatter, known: tuple[type[BaseException], ...]):
        super().__init__()
        self.inner, self.known = inner, known
        self._names = tuple(k.__name__ for k in known)

    def _is_known(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or not record.name.startswith(("prefect.flow_runs", "prefect.task_runs")):
            return False
        if record.exc_info and record.exc_info[1] is not None:
            return isinstance(record.exc_info[1], self.known)
        message = record.getMessage()
        return bool(_FAILURE_MESSAGE.match(message)) and any(
            f"{name}(" in message or f"{name}:" in message for name in self._names)

    def format(self, record: logging.LogRecord) -> str:
        if self._is_known(record):
            record = copy.copy(record)
            record.msg, record.args = first_line(record.getMessage()), None
            record.exc_info = record.exc_text = record.stack_info = None
        return self.inner.format(record)


def shorten_known_failures_on_console() -> int:
    """Wrap the formatter of every Prefect console handler on the root logger
    in ``ShortKnownFailures`` (once), configuring Prefect's logging first if
    nothing in this process has (``import prefect`` alone is lazy). Returns
    how many handlers were wrapped now."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()

    known, n = known_failures(), 0
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, ShortKnownFailures):
            handler.setFormatter(ShortKnownFailures(handler.formatter or logging.Formatter(), known))
            n += 1
    return n
