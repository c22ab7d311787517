"""The errors a stage reports as a clear message rather than a traceback,
and the exit codes every ``shrinkflow`` command shares.

Kept in one import-light module so that every stage command can name them
without importing (and so depending on) the modules that raise them.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What a ``shrinkflow`` command's exit status means, the same in every
    command (docs/exit-codes.md lists which command uses which, and
    tests/test_cli.py checks that page against this enum)."""

    OK = 0
    """It did what was asked (deployed, served, listed, rolled back, ...)."""
    REFUSED = 1
    """It ran to the end and the answer was no, with nothing crashed: the
    gates refused every candidate (production unchanged), or the server
    answered some requests with an error status."""
    USAGE = 2
    """Nothing was started: bad params, a bad flag, not inside a project, a
    name that does not exist, or params.yaml with uncommitted changes that
    ``--params`` would overwrite."""
    CRASH = 3
    """Something failed: a stage, a missing file, Prefect, a corrupted
    registry, an unreachable server. ``--debug`` prints the traceback."""
    NOTHING = 4
    """There is nothing to act on: nothing in production, no earlier version
    to roll back to, a version that was not re-compressed on a window."""
    INTERRUPTED = 130
    """Stopped by Ctrl-C before it finished (the shell's convention, 128 +
    SIGINT). ``schedule`` and ``ui`` run until stopped: for them Ctrl-C is
    the normal end, OK."""


class MissingInput(FileNotFoundError):
    """A file the project needs is not there yet, or a path the user gave
    points nowhere: a stage that has not run, a checkpoint without its
    config. Reported in one line. A bare ``FileNotFoundError`` is not: it is
    a path bug in the code, and its traceback is what finds it."""


class DataError(RuntimeError):
    """The raw data could not be obtained or parsed."""


class SourceUnreachable(DataError):
    """The data source did not answer (the package index or its download:
    no connection, a timeout, a reset, HTTP 408, 429 or 5xx): a later try may
    succeed. A stage exits with ``STAGE_EXIT_TRANSIENT`` for it, and the
    lifecycle retries the fetch stage for this failure only."""


# A stage command's exit status for a failure a retry may fix (sysexits.h's
# EX_TEMPFAIL); 1 is a handled error a retry would only repeat, 2 bad params
# (stages/common.py).
STAGE_EXIT_TRANSIENT = 75


class DataContractError(ValueError):
    """Prepared splits break the data contract; lists every violation."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("data contract violated:\n  " + "\n  ".join(problems))


class PromotionRefused(RuntimeError):
    """The candidate may not be deployed (failed gates, or bad artifacts)."""


class IntegrityError(RuntimeError):
    """A stored version's files do not match the hashes in its manifest."""


class RegistryError(RuntimeError):
    """The registry's own state is unusable (for example a bad alias)."""


class UnknownVersion(RegistryError):
    """The version to act on is not known: a name the registry does not
    hold, or no record of the previous production version (name one)."""


class NothingToRollBack(RegistryError):
    """Rollback has nothing to move to: nothing is in production, the
    production version is the only one, or the target already is production."""


class ParamsChanged(RuntimeError):
    """params.yaml changed while a run or stage was using it."""


class RemoteBuildError(RuntimeError):
    """A candidate built on a Dask worker that does not see the project
    (shrinkflow.compress.ship) cannot be trusted: a file sent to or from the
    worker does not match the sha256 it was sent with, a path in it escapes
    its directory, or the worker runs other shrinkflow code or model library
    versions than the client keyed the build with. Nothing was written to the
    candidate cache or the project."""


class ClusterUnreachable(RuntimeError):
    """The Dask scheduler named by ``compress.runner.dask_address`` does not
    accept a connection: nothing was built."""


class ModelError(ValueError):
    """A teacher checkpoint (or a compression step on it) shrinkflow cannot
    use: an unsupported architecture, pickle-only weights."""


# What a stage reports in one line (exit 1). Not FileNotFoundError: only the
# deliberate MissingInput is an expected absence.
HANDLED = (DataError, DataContractError, PromotionRefused, IntegrityError, RegistryError, ParamsChanged,
           MissingInput, ModelError, RemoteBuildError, ClusterUnreachable)


class DeploymentMissing(RuntimeError):
    """The deploy stage ran, yet the registry does not serve what it deployed."""
