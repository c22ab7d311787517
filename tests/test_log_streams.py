"""The suite's guard against a logging handler left on a closed stream
(tests/conftest.py: reopen_log_streams), on Prefect's own console handler."""

from __future__ import annotations

import io
import logging

from tests.conftest import reopen_log_streams


def test_a_prefect_console_handler_left_on_a_closed_stream_is_pointed_at_stderr_again(capsys):
    """What CI met: Prefect's console handler kept a stream a test had
    closed, and a flow run in the same worker failed on its logging."""
    from prefect.logging.handlers import PrefectConsoleHandler

    logger = logging.getLogger("shrinkflow.test.closed-stream")
    logger.propagate = False
    closed = io.StringIO()
    handler = PrefectConsoleHandler(stream=closed)
    logger.addHandler(handler)
    try:
        closed.close()
        broken = io.StringIO()
        handler.handleError = lambda record: broken.write("handleError\n")   # what the record would have met
        logger.warning("before")
        assert broken.getvalue() == "handleError\n"   # the test can fail: the closed stream does break it
        assert "shrinkflow.test.closed-stream" in reopen_log_streams()
        logger.warning("after the guard")
        assert broken.getvalue() == "handleError\n"   # no new error
        assert "after the guard" in capsys.readouterr().err
        assert reopen_log_streams() == []
    finally:
        logger.removeHandler(handler)


def test_a_plain_stream_handler_on_a_closed_stream_is_fixed_without_raising(capsys):
    """The first guard called setStream, which flushes the closed stream
    first and raised in 360 tests' setup of a fresh-clone run."""
    logger = logging.getLogger("shrinkflow.test.closed-plain")
    logger.propagate = False
    closed = io.TextIOWrapper(io.BytesIO())   # as a test's replaced stderr: flush raises once closed
    handler = logging.StreamHandler(closed)
    logger.addHandler(handler)
    try:
        closed.close()
        assert "shrinkflow.test.closed-plain" in reopen_log_streams()
        logger.warning("after the guard")
        assert "after the guard" in capsys.readouterr().err
    finally:
        logger.removeHandler(handler)
