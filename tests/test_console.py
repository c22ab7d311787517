"""Prefect's console lines of a failure the CLI explains: one line each, no
traceback; Prefect's API handler (its UI) still gets the record whole."""

from __future__ import annotations

import io
import logging

import pytest

from flows.console import ShortKnownFailures, first_line, known_failures
from shrinkflow.dvcrun import StageFailed

TAIL = "WARNING: something\nerror: data: data/user/t.csv: no column 'label'\nERROR: failed to reproduce 'data'\n"


@pytest.fixture()
def handlers():
    """A task-run logger with an "api" handler (plain) and a "console" one
    (wrapped), in that order, as Prefect's are: the API handler sees each
    record first."""
    fmt = logging.Formatter("%(levelname)s | %(message)s")
    streams = {"api": io.StringIO(), "console": io.StringIO()}
    logger = logging.getLogger("prefect.task_runs.test-console")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    made = []
    for name in ("api", "console"):
        h = logging.StreamHandler(streams[name])
        h.setFormatter(fmt if name == "api" else ShortKnownFailures(fmt, known_failures()))
        logger.addHandler(h)
        made.append(h)
    yield logger, streams
    for h in made:
        logger.removeHandler(h)


def _log_failure(logger: logging.Logger, exc: BaseException) -> None:
    try:
        raise exc
    except type(exc):
        # prefect/task_engine.py's wording
        logger.error("Task run failed with exception: %r - Retries are exhausted", exc, exc_info=True)


def test_a_known_failure_is_one_line_on_the_console_and_whole_for_the_api(handlers):
    logger, streams = handlers
    exc = StageFailed("data", 255, TAIL, "data: data/user/t.csv: no column 'label'", 1)
    _log_failure(logger, exc)
    console, api = streams["console"].getvalue(), streams["api"].getvalue()
    assert console == ("ERROR | Task run failed with exception: StageFailed(\"stage 'data' failed (its command "
                       "exited with 1): data: data/user/t.csv: no column 'label'; the end of its output: ... - Retries are "
                       "exhausted\n")
    assert "Traceback (most recent call last)" in api and "no column 'label'" in api
    assert api.count("\n") > 5 and repr(exc) in api
    # a Prefect state line names the exception without carrying it
    logger.info("Finished in state Failed('Task run encountered an exception StageFailed: %s')", str(exc))
    assert streams["console"].getvalue().splitlines()[-1] == (
        "INFO | Finished in state Failed('Task run encountered an exception StageFailed: stage 'data' failed (its "
        "command exited with 1): data: data/user/t.csv: no column 'label'; the end of its output: ...")
    assert streams["api"].getvalue().endswith("ERROR: failed to reproduce 'data'\n')\n")


def test_an_unknown_failure_keeps_its_traceback_on_the_console(handlers):
    logger, streams = handlers
    _log_failure(logger, ValueError("a bug\nsecond line"))
    console = streams["console"].getvalue()
    assert console == streams["api"].getvalue()
    assert "Traceback (most recent call last)" in console and "second line" in console
    logger.info("Finished in state Failed('Task run encountered an exception ValueError: a\\nb')")
    assert streams["console"].getvalue().endswith("ValueError: a\\nb')\n")


def test_other_loggers_and_other_messages_are_left_alone():
    fmt = logging.Formatter("%(name)s | %(message)s")
    short = ShortKnownFailures(fmt, known_failures())
    exc = StageFailed("data", 255, TAIL, None, 1)
    elsewhere = logging.LogRecord("shrinkflow.x", logging.ERROR, __file__, 1, "failed: %s", (exc,),
                                  (StageFailed, exc, None))
    assert short.format(elsewhere) == fmt.format(elsewhere)
    # a run's printed line (log_prints) that mentions StageFailed is not a state line
    printed = logging.LogRecord("prefect.flow_runs", logging.INFO, __file__, 1,
                                "what StageFailed: means\nsecond line", None, None)
    assert short.format(printed) == "prefect.flow_runs | what StageFailed: means\nsecond line"


def test_first_line_cuts_at_a_real_or_escaped_break():
    assert first_line("a\nb") == "a ..." and first_line("a\\nb\nc") == "a ..." and first_line("abc") == "abc"
    # Prefect's retry note after the exception's repr is kept, not cut with it
    retry = "Task run failed with exception: StageFailed(\"stage 'fetch' failed\\nend\") - Retry 1/2 will start " \
            "5 second(s) from now"
    assert first_line(retry) == "Task run failed with exception: StageFailed(\"stage 'fetch' failed ... - Retry 1/2 " \
                                "will start 5 second(s) from now"
    assert first_line("x(\"a\\nb\") - Retries are exhausted") == "x(\"a ... - Retries are exhausted"
    assert first_line("a - Retry 1/2 will start now\nb") == "a - Retry 1/2 will start now ..."


# `import prefect` alone configures no logging (its imports are lazy)
WRAP = """
import logging, prefect
from prefect.logging.handlers import PrefectConsoleHandler
from flows.console import ShortKnownFailures, shorten_known_failures_on_console
first, again = shorten_known_failures_on_console(), shorten_known_failures_on_console()
consoles = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
print(len(consoles), first, again, all(isinstance(h.formatter, ShortKnownFailures) for h in consoles))
"""


def test_the_root_console_handler_is_wrapped_once():
    """In a process as the CLI's (pytest puts its own handlers on the root
    logger, so Prefect configures none there): Prefect's console handler,
    once."""
    import subprocess
    import sys

    from tests.e2e import PROJECT_ROOT

    proc = subprocess.run([sys.executable, "-c", WRAP], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "0", "True"], proc.stdout


def test_after_a_crash_the_error_line_is_not_followed_by_the_temporary_servers_stop(capsys):
    """Prefect logs "Stopping temporary server on ..." on its "prefect"
    logger at exit, after the CLI's closing error line; once a command has
    crashed that line is dropped, and nothing else Prefect logs."""
    import tasks.dvc  # noqa: F401 - Prefect's import configures its loggers (handlers replaced): first
    from flows.cli import _crash, _not_a_server_stop

    prefect = logging.getLogger("prefect")
    seen = io.StringIO()
    handler = logging.StreamHandler(seen)
    prefect.addHandler(handler)
    try:
        prefect.warning("Stopping temporary server on http://127.0.0.1:1")   # no crash yet: kept
        _crash(StageFailed("data", 255, TAIL, "data: no column 'label'", 1), "the lifecycle", debug=False)
        prefect.warning("Stopping temporary server on http://127.0.0.1:2")
        prefect.warning("Finished in state Failed()")
        logging.getLogger("prefect.test-console-child").warning("Stopping temporary server on http://127.0.0.1:3")
    finally:
        prefect.removeHandler(handler)
        prefect.removeFilter(_not_a_server_stop)
    assert seen.getvalue().splitlines() == ["Stopping temporary server on http://127.0.0.1:1",
                                            "Finished in state Failed()",
                                            "Stopping temporary server on http://127.0.0.1:3"]
    # (Prefect's console handler may echo the records above to stderr too, or not: it depends on
    # which tests ran first in this process)
    assert any(line.startswith("error: the lifecycle failed: stage 'data' failed")
               for line in capsys.readouterr().err.splitlines())
